"""Examples are documentation that runs: their small modes, with TensorBoard output read back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sens.reporting import keys

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # few-batch runs warn about workers
def test_monitor_digits_writes_tensorboard_logs_and_finds_corrupted_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load("monitor_digits")
    assert example.main(["--max-epochs", "2", "--out", str(tmp_path)]) == 0

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for split in ("train", "val", "train_all"):
        assert keys.curve("true", split, "q99") in scalars
    assert {"train/loss", "val/loss", "val/acc"} <= scalars
    assert keys.image("manhattan_train_all") in events.Tags()["images"]

    results = example.flagged_per_epoch(
        tmp_path / "sensitivity", example.digits_data(0.03, 0)["corrupted"]
    )
    assert [epoch for epoch, _, _ in results] == [0, 1]
    _, flagged, hits = results[-1]
    assert flagged >= 10  # 38 corrupted labels; after 2 epochs most stand out
    assert hits >= 0.8 * flagged  # and what is flagged is mostly corrupted

    out = capsys.readouterr().out
    assert "of them corrupted" in out
    assert f"tensorboard --logdir {tmp_path}" in out
