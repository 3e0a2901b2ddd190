"""The demo (the README's main job) and the examples, in their small modes."""

from __future__ import annotations

import csv
import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from lightning_sens.cli import main
from lightning_sens.demos.data import corrupt_labels, load_images
from lightning_sens.demos.run import flagged_per_epoch
from lightning_sens.reporting import keys
from lightning_sens.reporting.writers import read_scalars
from tests.logged import epoch_table, read_logged

ROOT = Path(__file__).resolve().parent.parent


def _readme_command(program: str) -> list[str]:
    """The README's set-up command that runs ``program`` (the part after the last ``&&``)."""
    readme = (ROOT / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("python3 -m venv") and program in x]
    return shlex.split(line.rsplit("&&", 1)[1])


def _script(name: str) -> str:
    found = Path(sys.executable).parent / name  # the console script of this environment
    return str(found) if found.exists() else shutil.which(name) or pytest.skip(f"no {name}")


def test_readme_demo_then_the_evaluate_command_it_prints(tmp_path: Path) -> None:
    """The README's main command (two epochs of the digits, to keep the suite fast), then the
    evaluate command it prints, run as printed: evaluate's validation curves, flag counts,
    loss and accuracy are the training run's, step by step."""
    command = _readme_command("lightning-sens demo")
    assert command[:2] == ["lightning-sens", "demo"]
    out = "runs/demo"
    assert command[command.index("--out") + 1] == out
    command = [_script("lightning-sens"), *command[1:], "--max-epochs", "2", "--dataset", "digits"]
    demo = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)

    printed = demo.stdout.splitlines()
    again = printed[printed.index(next(x for x in printed if x.startswith("Measure"))) + 1]
    evaluate = shlex.split(again)
    for page in ("README.md", "docs/cli.md"):  # the docs show this very command
        assert again.strip() in (ROOT / page).read_text(), page
    assert evaluate[:2] == ["lightning-sens", "evaluate"]
    subprocess.run(
        [_script("lightning-sens"), *evaluate[1:]], cwd=tmp_path, capture_output=True, check=True
    )

    training = read_scalars(tmp_path / out / "training")
    evaluated = read_scalars(tmp_path / out / "evaluate")
    compared = [k for k in training if keys.route(k)[0] == "val"]
    assert keys.curve("true", "val", "median") in compared
    assert keys.flag_count("val") in compared
    assert keys.accuracy("val") in compared
    for key in compared:  # the exact probes too: the same samples (seed), the same weights
        assert evaluated[key] == training[key], key  # the same steps, the same float32 values
    steps = [step for step, _ in training[keys.flag_count("val")]]
    assert len(steps) == 2
    for key in ("val/loss", "val/acc"):  # the module's own metrics: at the checkpoints' steps
        assert [step for step, _ in evaluated[key]] == steps, key

    again_demo = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again_demo.returncode == 2  # a second run would mix its logs with the first
    assert "exists and is not empty" in again_demo.stderr
    assert "--overwrite" in again_demo.stderr

    table = epoch_table(tmp_path / out / "training", "flags", 1)
    with table.open() as f:
        rows = list(csv.DictReader(f))
    flagged = sum(r["split"] == "train" and r["flagged"] == "True" for r in rows)
    assert f"epoch  1: {flagged:4d} flagged" in demo.stdout
    with (tmp_path / out / "corrupted.csv").open() as f:  # the flags can be checked from files
        corrupted = {int(r["sample"]) for r in csv.DictReader(f)}
    hits = sum(
        r["split"] == "train" and r["flagged"] == "True" and int(r["sample"]) in corrupted
        for r in rows
    )
    assert f"precision {hits / flagged:.2f} ({hits} of {flagged} flags" in demo.stdout
    assert training[keys.flag_count("train")][-1][1] == flagged  # terminal = table = TensorBoard
    report = (tmp_path / out / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert len(list((tmp_path / out / "checkpoints").glob("*.ckpt"))) == 2


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # few-batch runs warn about workers
def test_demo_writes_tensorboard_logs_and_finds_corrupted_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dataset", "digits", "--max-epochs", "2", "--out", str(tmp_path)]) == 0

    logged = read_logged(tmp_path / "training")
    assert logged.runs == {"train", "val"}
    for split in ("train", "val"):
        assert keys.curve("true", split, "q99") in logged.scalars
    assert keys.estimated_wrong("train") in logged.scalars
    assert {"train/loss", "val/loss", "val/acc"} <= set(logged.scalars)
    assert not any("hp_metric" in key for key in logged.scalars)
    assert keys.image("manhattan", "train") in logged.images

    _, _, y_train, _, _ = load_images("digits", tmp_path)
    _, corrupted = corrupt_labels(y_train, 0.03, 1)
    results = flagged_per_epoch(tmp_path / "training", corrupted)
    assert [epoch for epoch, _, _ in results] == [0, 1]
    _, flagged, hits = results[-1]
    precision, recall = hits / flagged, hits / len(corrupted)  # 38 corrupted labels
    assert 2 * precision * recall / (precision + recall) >= 0.7  # F1 (0.80 in the benchmark)

    report = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert (tmp_path / "config.yaml").exists()
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
    assert epoch_table(Path(trainer.log_dir), "flags", 0).is_file()


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
    table = epoch_table(tmp_path / "lightning_logs/version_0", "flags", 0)
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
