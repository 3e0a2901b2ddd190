"""The command line on real checkpoints written in tmp_path."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sens.cli import main
from lightning_sens.damage import quantization_report
from lightning_sens.reporting import keys
from tests.cli_models import TinyData, TinyModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

MODEL = ["--model", "tests.cli_models.TinyModule", "--data", "tests.cli_models.TinyData"]
SMALL = ["--train-probe-size", "32", "--exact-probe-size", "4", "--windows", "1", "3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three checkpoints of a real run, one per epoch."""
    folder = tmp_path_factory.mktemp("ckpts")
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(TinyModule(), datamodule=TinyData())
    return folder


def test_evaluate_a_directory_of_checkpoints(checkpoints: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoints), "--output", str(out), *SMALL, "--", *MODEL]) == 0

    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    curve = events.Scalars(keys.curve("pred", "val", "median"))
    assert [e.step for e in curve] == [4, 8, 12]  # global steps of the checkpoints, in order
    assert keys.curve("pred", "train", "median") in events.Tags()["scalars"]
    assert keys.image("manhattan_val") in events.Tags()["images"]
    for epoch in range(3):
        assert (out / "sensitivity" / f"flags_epoch{epoch:04d}.csv").exists()
        assert (out / "sensitivity" / "figures" / f"manhattan_val_epoch{epoch:04d}.png").exists()
    report = (out / "report.html").read_text()
    assert report.count("<tr><td class='text'>epoch=") == 3  # one row per checkpoint
    assert "data:image/png;base64," in report
    assert "Flagged samples of the last checkpoint" in report


def test_refuses_to_overwrite_unless_asked(checkpoints: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one = str(sorted(checkpoints.glob("*.ckpt"))[0])
    assert main(["evaluate", one, "--output", str(out), *SMALL, "--", *MODEL]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["evaluate", one, "--output", str(out), "--overwrite", *SMALL, "--", *MODEL]) == 0


def test_config_file_and_globs(checkpoints: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: tests.cli_models.TinyModule\n  init_args:\n    width: 4\n"
        "data:\n  class_path: tests.cli_models.TinyData\n"
    )
    pattern = str(checkpoints / "epoch=2*.ckpt")
    out = tmp_path / "eval"
    assert (
        main(["evaluate", pattern, "--output", str(out), *SMALL, "--", "--config", str(config)])
        == 0
    )
    assert (out / "report.html").exists()


def test_exclude_layers(checkpoints: Path, tmp_path: Path) -> None:
    one = str(sorted(checkpoints.glob("*.ckpt"))[-1])
    out = tmp_path / "eval"
    skip = ["--exclude-layers", "net.0", "net.[1]"]
    assert main(["evaluate", one, "--output", str(out), *SMALL, *skip, "--", *MODEL]) == 0
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    prefix = keys.layer_kl_noise("val", "")
    layers = {t[len(prefix) :] for t in events.Tags()["scalars"] if t.startswith(prefix)}
    assert layers == {"net.4"}


def test_quantization_report_ranks_layers_by_measured_and_predicted_damage(
    checkpoints: Path, tmp_path: Path, capsys
) -> None:
    """The report's predictions are the engine's on the last checkpoint; measured KL is real."""
    last = sorted(checkpoints.glob("*.ckpt"))[-1]
    out = tmp_path / "eval"
    options = ["--quantization", "--bits", "4", "8", "--damage-samples", "16", "--measure-damage"]
    assert main(["evaluate", str(last), "--output", str(out), *SMALL, *options, "--", *MODEL]) == 0
    printed = capsys.readouterr().out
    assert "Quantisation sensitivity of" in printed
    with (out / "quantization.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    model = TinyModule.load_from_checkpoint(last)
    data = TinyData()
    data.setup("fit")
    x = torch.stack([data.val_dataloader().dataset[i][0] for i in range(16)])
    want = quantization_report(model, x, (4, 8))
    assert [(r["bits"], r["steps"], r["layer"]) for r in rows] == [
        (str(w["bits"]), w["steps"], w["layer"]) for w in want
    ]
    for row, w in zip(rows, want, strict=True):
        assert float(row["predicted_kl"]) == pytest.approx(float(w["predicted_kl"]), rel=1e-9)
        assert float(row["measured_kl"]) >= 0
    four = [r for r in rows if r["bits"] == "4" and r["steps"] == "channel"]
    assert [int(r["rank"]) for r in four] == list(range(1, len(four) + 1))
    predicted = [float(r["predicted_kl"]) for r in four]
    assert predicted == sorted(predicted, reverse=True)
    eight = {r["layer"]: float(r["measured_kl"]) for r in rows if r["bits"] == "8"}
    assert all(eight[r["layer"]] < float(r["measured_kl"]) for r in four)  # 8 bits hurt less


def test_usage_errors(checkpoints: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "none*.ckpt"),
                "--output",
                str(tmp_path / "o"),
                "--",
                *MODEL,
            ]
        )
        == 2
    )
    assert "no checkpoint found" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoints), "--output", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sens", "evaluate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--limit-batches" in result.stdout
