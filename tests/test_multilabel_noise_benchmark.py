"""benchmarks/multilabel_noise.py: its tags are facts of each image's class, its corruptions
flip one tag of the chosen samples, and the small run writes a table whose flags were read from
the monitor's positions table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "multilabel_noise.py"


def _benchmark() -> ModuleType:
    name = "multilabel_noise"
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


def test_tags_are_facts_of_the_class() -> None:
    bench = _benchmark()
    digits = bench.tags_of(torch.arange(10), bench.DIGIT_TAGS)
    names = list(bench.DIGIT_TAGS)
    assert digits[7].tolist() == [float(n in ("large", "prime", "straight")) for n in names]
    assert digits[8].tolist() == [float(n in ("even", "large", "loop")) for n in names]
    fashion = bench.tags_of(torch.tensor([1, 4, 9]), bench.FASHION_TAGS)  # trouser, coat, boot
    names = list(bench.FASHION_TAGS)
    assert fashion[0].tolist() == [float(n == "legs") for n in names]
    assert fashion[1].tolist() == [float(n in ("top", "sleeves", "warm")) for n in names]
    assert fashion[2].tolist() == [float(n in ("footwear", "warm")) for n in names]


def test_corruptions_flip_one_tag_of_the_chosen_samples() -> None:
    bench = _benchmark()
    targets = bench.tags_of(torch.arange(40) % 10, bench.DIGIT_TAGS)
    out, bad = bench.corrupt(targets, 0.25, seed=0)
    assert int(bad.sum()) == 10
    assert torch.equal(out[~bad], targets[~bad])
    assert ((out != targets).sum(1)[bad] == 1).all()


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
    rows = [line for line in lines if line.startswith("| digits")]
    assert len(rows) == 3, lines  # clean, corrupted, and the costs
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[:2]]
    assert cells[0][2] == "0.0 %"
    assert int(cells[1][3]) > 0  # wrong samples
    assert float(cells[1][4].split("/")[2].strip(" *")) > 0, rows[1]  # flags found some
    assert 0.5 < float(cells[1][6]) <= 1.0, rows[1]  # the evidence ranks them above chance
    assert rows[2].endswith("× |")
