"""benchmarks/segmentation_noise.py: its corruptions do what they say, and the small run writes
a table whose flags were read from the monitor's positions table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "segmentation_noise.py"


def _benchmark() -> ModuleType:
    name = "segmentation_noise_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _masks() -> torch.Tensor:
    masks = torch.zeros(20, 28, 28, dtype=torch.long)
    for i in range(20):
        masks[i, 8:20, 6:22] = i % 10 + 1  # a 12 × 16 item of class i % 10
    return masks


@pytest.mark.parametrize("kind", ["class", "shift", "erode"])
def test_each_corruption_changes_the_chosen_masks_as_it_says(kind: str) -> None:
    bench = _benchmark()
    masks = _masks()
    out, changed = bench.corrupt(masks, 0.25, kind, seed=0)
    assert int(changed.sum()) == 5
    assert torch.equal(out[~changed], masks[~changed])
    for i in torch.nonzero(changed).flatten().tolist():
        before, after = masks[i], out[i]
        if kind == "class":  # the same region, another class
            assert torch.equal(after > 0, before > 0)
            assert int(after.max()) != int(before.max())
        elif kind == "shift":  # the same item, 3 pixels off on both axes
            assert int((after > 0).sum()) == int((before > 0).sum())
            rows = torch.nonzero(after.any(1)).flatten()
            assert abs(int(rows[0]) - 8) == 3
        else:  # 2 pixels of border gone: 8 × 12 left of 12 × 16
            assert int((after > 0).sum()) == 8 * 12
            assert int(after.max()) == int(before.max())


def test_flags_are_scored_against_the_corrupted_masks() -> None:
    bench = _benchmark()
    bad = np.array([True, True, False, False, False])
    flagged = np.array([True, False, True, False, False])
    precision, recall, f1, clean = bench.scores(flagged, bad)
    assert (precision, recall, f1) == (0.5, 0.5, 0.5)
    assert clean == pytest.approx(1 / 3)
    assert bench.auroc(np.array([3.0, 2.0, 1.0, 0.0, np.nan]), bad) == 1.0


def test_small_run_writes_the_flags_the_monitor_logged(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in out.read_text().splitlines() if line.startswith("| Fashion")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    rows = [row for row, c in zip(table, cells, strict=True) if len(c) == 13]
    costs = [c for c in cells if len(c) == 4]
    cells = [c for c in cells if len(c) == 13]
    assert len(rows) == 2
    assert len(costs) == 1
    assert costs[0][2].endswith("×")
    assert cells[0][1] == "none"
    assert cells[1][1] == "mixed"
    assert int(cells[1][3]) > 0  # wrong masks
    assert int(cells[1][4]) in (1, 2)  # every n-th pixel, n from the cost (200 pixels left)
    assert 1 <= int(cells[1][5]) <= 6  # decisions: at most one per epoch
    ours_f1 = float(cells[1][6].split("/")[2].strip(" *"))
    assert ours_f1 > 0, rows[1]  # the monitor's flags found some of them
    assert 0.5 < float(cells[1][8]) <= 1.0, rows[1]  # its evidence ranks them above chance
