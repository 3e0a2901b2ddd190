"""The demo (the README's main job) and the examples, in their small modes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sens.cli import main
from lightning_sens.demo import corrupt_labels, flagged_per_epoch, load_images
from lightning_sens.reporting import keys


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # few-batch runs warn about workers
def test_demo_writes_tensorboard_logs_and_finds_corrupted_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dataset", "digits", "--max-epochs", "2", "--out", str(tmp_path)]) == 0

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for split in ("train", "val"):
        assert keys.curve("true", split, "q99") in scalars
    assert keys.estimated_wrong("train") in scalars
    assert {"train/loss", "val/loss", "val/acc"} <= scalars
    assert keys.image("manhattan_train") in events.Tags()["images"]

    _, _, y_train, _, _ = load_images("digits", tmp_path)
    _, corrupted = corrupt_labels(y_train, 0.03, 1)
    results = flagged_per_epoch(tmp_path / "sensitivity", corrupted)
    assert [epoch for epoch, _, _ in results] == [0, 1]
    _, flagged, hits = results[-1]
    precision, recall = hits / flagged, hits / len(corrupted)  # 38 corrupted labels
    assert 2 * precision * recall / (precision + recall) >= 0.7  # F1 (0.80 in the benchmark)

    report = (tmp_path / "report.html").read_text()
    assert report.count("<tr><td class='text'>epoch ") == 2
    assert "data:image/png;base64," in report
    assert (tmp_path / "model.ckpt").exists()
    out = capsys.readouterr().out
    assert "of them corrupted" in out
    assert f"Last epoch: precision {hits / flagged:.2f}" in out
    assert f"recall {hits / len(corrupted):.2f}" in out
    assert f"Report: {tmp_path / 'report.html'}" in out
    assert f"tensorboard --logdir {tmp_path}" in out


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_quickstart(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    assert spec is not None
    assert spec.loader is not None
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    trainer = quickstart.main(str(tmp_path), epochs=1)
    tables = list(Path(trainer.log_dir).glob("sensitivity/flags_epoch0000.csv"))
    assert len(tables) == 1


def test_lightning_cli_config_configures_the_monitor(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(EXAMPLES / "lightning_cli" / "train.py"),
        "fit",
        "--config",
        str(EXAMPLES / "lightning_cli" / "config.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    subprocess.run(command, check=True, capture_output=True)
    (table,) = tmp_path.glob("lightning_logs/version_0/sensitivity/flags_epoch0000.csv")
    rows = table.read_text().splitlines()
    assert sum(",True," in row for row in rows if ",val," in row) == 5  # top_k: 5 from the YAML


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_paper_reproduction_small_mode(arch: str, tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / "paper" / "reproduce.py"), "--small", "--arch", arch]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, capture_output=True)
    for name in (
        "setup1_manhattan",
        "setup1_top5",
        "setup2_layers",
        "setup3_train_vs_test",
        "setup4_maps",
    ):
        pixels = imread(tmp_path / f"{name}.png")
        assert pixels.shape[0] > 100, name
        assert pixels.std() > 0.01, name  # a real picture, not a blank canvas
    results = (tmp_path / "results.md").read_text()
    assert "| 99 % |" in results
    assert "reach the closed form" in results
    assert "top-FI pixel" in results
