"""benchmarks/lm_noise.py: its documents are windows of a real corpus, its corruptions garble
the chosen documents only, and the small run writes a table whose flags were read from the
monitor's positions table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "lm_noise.py"


def _benchmark() -> ModuleType:
    name = "lm_noise"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))  # it imports the other benchmarks' helpers
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_documents_are_windows_of_the_corpus_in_its_vocabulary() -> None:
    bench = _benchmark()
    tokens = bench.stdlib_tokens(3 * (bench.LENGTH + 1) + 5)
    docs = bench.documents(tokens)
    assert docs.shape == (3, bench.LENGTH + 1)
    assert int(docs.max()) < bench.VOCAB
    assert int(docs.min()) >= 0
    # equal tokens have equal ids, different ones different ids
    flat = docs.flatten().tolist()
    for i, j in ((0, 1), (5, 40), (7, 100)):
        assert (flat[i] == flat[j]) == (tokens[i] == tokens[j])


def test_corruptions_garble_the_chosen_documents_only() -> None:
    bench = _benchmark()
    g = torch.Generator().manual_seed(0)
    docs = torch.randint(1, bench.VOCAB, (40, bench.LENGTH + 1), generator=g)
    for kind in bench.KINDS:
        out, bad = bench.corrupt(docs, 0.25, kind, seed=0)
        assert int(bad.sum()) == 10
        assert torch.equal(out[~bad], docs[~bad])
        for i in torch.nonzero(bad).flatten().tolist():
            if kind == "shuffle":  # the same tokens in another order
                assert torch.equal(out[i].sort().values, docs[i].sort().values)
                assert not torch.equal(out[i], docs[i])
            else:  # at most 30 % of the tokens replaced
                changed = int((out[i] != docs[i]).sum())
                assert 0 < changed <= round(bench.REPLACED * docs.shape[1])


def test_small_run_writes_the_flags_the_monitor_logged(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| stdlib")]
    assert len(rows) == 3, lines  # clean, corrupted, and the costs
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[:2]]
    assert cells[0][1] == "none"
    assert cells[1][1] == "replace"
    assert int(cells[1][3]) > 0  # corrupted documents
    assert int(cells[1][4]) == 1  # documents are scored at every token
    assert int(cells[1][5]) >= 1  # decisions
    assert float(cells[1][6].split("/")[2].strip(" *")) > 0, rows[1]  # flags found some
    assert 0.5 < float(cells[1][8]) <= 1.0, rows[1]  # the evidence ranks them above chance
    assert rows[2].endswith("× |")
