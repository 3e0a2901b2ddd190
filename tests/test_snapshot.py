"""The monitor logs exactly what it logged when the record was made (``tests/snapshot.py``):
refactors of the callback, the accumulator and the reporting change no logged value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.snapshot import RECORD, RUNS, differences, monitored_run, snapshot


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_monitored_run_logs_what_was_recorded(tmp_path: Path, name: str) -> None:
    """Every scalar and histogram at every step, the images and texts, the flag and layer tables
    and the figures' files of a float64 run (which also shows that the monitor feeds the batches
    it reads itself through the Trainer's precision, 64-true here)."""
    recorded = json.loads(RECORD.read_text())[name]
    got = snapshot(*monitored_run(tmp_path, name))
    for part in ("scalars", "histograms", "images", "tables", "history"):
        assert got[part], part  # a record of something
    found = differences(got, recorded, name)
    assert not found, "\n".join(found[:20])
