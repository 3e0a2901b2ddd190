"""benchmarks/token_noise.py: its tags are the tokens' roles, its corruptions change what they
say, and the small run writes a table whose flags were read from the monitor's positions table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "token_noise.py"


def _benchmark() -> ModuleType:
    name = "token_noise"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))  # it imports segmentation_noise's scoring
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_token_is_tagged_with_its_role() -> None:
    bench = _benchmark()
    found = bench.tagged("def f(x):\n    return x.real + g(1)  # done\n")
    assert found == [
        ("def", "keyword"), ("f", "definition"), ("(", "operator"), ("x", "name"),
        (")", "operator"), (":", "operator"), ("\n", "newline"), ("return", "keyword"),
        ("x", "name"), (".", "operator"), ("real", "attribute"), ("+", "operator"),
        ("g", "call"), ("(", "operator"), ("1", "number"), (")", "operator"),
        ("# done", "comment"), ("\n", "newline"),
    ]  # fmt: skip
    assert bench.tagged("s = 'a'\n")[2] == ("<string>", "string")
    assert bench.tagged('x = """never closed\n') == []  # does not tokenize: left out


def test_corruptions_change_one_to_three_tags_of_the_chosen_sentences() -> None:
    bench = _benchmark()
    tags = torch.randint(0, len(bench.TAGS), (40, bench.LENGTH), generator=torch.Generator())
    for kind in bench.KINDS:
        out, changed = bench.corrupt(tags, 0.25, kind, seed=0)
        assert int(changed.sum()) == 10
        assert torch.equal(out[~changed], tags[~changed])
        differ = (out != tags).sum(1)[changed]
        assert ((differ >= 1) & (differ <= 3)).all()
        if kind == "similar":
            where = out != tags
            for old, new in zip(tags[where].tolist(), out[where].tolist(), strict=True):
                assert bench.TAGS[new] == bench.SIMILAR[bench.TAGS[old]]


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
    rows = [line for line in out.read_text().splitlines() if line.startswith("| none")]
    rows += [line for line in out.read_text().splitlines() if line.startswith("| random")]
    assert len(rows) == 2
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert int(cells[1][2]) > 0  # wrong sentences
    assert int(cells[1][3]) == 1  # tags are judged: 32 tokens are scored whole
    assert int(cells[1][4]) >= 1  # decisions
    assert float(cells[1][5].split("/")[2].strip(" *")) > 0, rows[1]  # flags found some
    assert 0.5 < float(cells[1][7]) <= 1.0, rows[1]  # the evidence ranks them above chance
    costs = [line for line in out.read_text().splitlines() if line.endswith("× |")]
    assert len(costs) == 1
