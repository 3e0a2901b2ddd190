"""benchmarks/lm_damage.py: the small run end to end, and how it scores a ranking."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lm_damage.py"


def _benchmark() -> ModuleType:
    name = "lm_damage_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_rankings_are_scored_by_spearman_and_the_top_layer() -> None:
    bench = _benchmark()
    assert bench.rank_scores([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == (1.0, True)
    rho, top = bench.rank_scores([3.0, 2.0, 1.0], [10.0, 20.0, 30.0])
    assert rho == -1.0
    assert not top


def test_small_run_writes_finite_tables(tmp_path: Path) -> None:
    out = tmp_path / "lm_damage_small.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Written by `python benchmarks/lm_damage.py --small" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "-bit" in line]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(math.isfinite(float(c)) for c in cells[1:3]), row
        assert cells[3].endswith("/1"), row
        assert cells[4].endswith("/1"), row
