"""The command line on real checkpoints written in tmp_path."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tests.cli_models
from lightning_sens.callbacks.monitor import default_batch_fn
from lightning_sens.cli import EVALUATE_OPTIONS, NOT_EXPOSED, _monitor_config, _parser, main
from lightning_sens.cli_checks import check_data, first_batch
from lightning_sens.config import MonitorConfig
from lightning_sens.core.inputs import default_forward
from lightning_sens.quantization import quantization_report
from lightning_sens.reporting import keys
from lightning_sens.reporting.paths import split_run
from lightning_sens.reporting.writers import read_scalars
from tests.cli_models import TinyData, TinyModule
from tests.logged import epoch_figure, epoch_table

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


def _train(folder: Path, data: TinyData, epochs: int = 3) -> Path:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(TinyModule(), datamodule=data)
    return folder


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of a TinyModule that learnt TinyData(signal=3): right on its val labels,
    wrong on shifted ones."""
    return _train(tmp_path_factory.mktemp("learned"), TinyData(signal=3.0))


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def _one_line(err: str) -> str:
    """The error line; the rest of stderr must be empty (no usage dump, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-sens: error: "), err
    return lines[0]


def test_evaluate_a_directory_of_checkpoints(checkpoints: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoints), "--output", str(out), *SMALL, "--", *MODEL]) == 0

    scalars = read_scalars(out)  # event files written in the temporary folder, read after rename
    curve = scalars[keys.curve("pred", "val", "median")]
    assert [step for step, _ in curve] == [4, 8, 12]  # global steps of the checkpoints, in order
    assert keys.curve("pred", "train", "median") in scalars
    events = EventAccumulator(str(split_run(out, "val")), size_guidance={"images": 0})
    events.Reload()
    assert keys.route(keys.image("manhattan", "val"))[1] in events.Tags()["images"]
    for epoch in range(3):
        assert epoch_table(out, "flags", epoch).exists()
        assert epoch_figure(out, "manhattan", "val", epoch).exists()
    report = (out / "report.html").read_text()
    assert report.count("<tr><td class='text'>epoch=") == 3  # one row per checkpoint
    assert "data:image/png;base64," in report
    assert "<h2>Flagged samples" in report


def test_refuses_to_overwrite_unless_asked(checkpoints: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one = str(sorted(checkpoints.glob("*.ckpt"))[0])
    assert main(["evaluate", one, "--output", str(out), *SMALL, "--", *MODEL]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["evaluate", one, "--output", str(out), "--overwrite", *SMALL, "--", *MODEL]) == 0
    assert not (out / "keep.txt").exists()
    assert (out / "report.html").exists()
    assert _leftovers(out) == []


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
    prefix = keys.layer_kl_noise("val", "")
    layers = {k[len(prefix) :] for k in read_scalars(out) if k.startswith(prefix)}
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


# evaluate's flags that are not MonitorConfig fields: the output, the run, the quantisation report
EVALUATE_OWN = {
    "--output",
    "--overwrite",
    "--device",
    "--limit-batches",
    "--quantization",
    "--bits",
    "--damage-samples",
    "--measure-damage",
}
# Per exposed field: the words after its flag, and the value MonitorConfig must then hold (none
# of them the default, so that each shows that its flag reached the config).
NON_DEFAULT: dict[str, tuple[list[str], object]] = {
    "train_probe_size": (["7"], 7),
    "exact_probe_size": (["0"], 0),
    "windows": (["3", "5"], (3, 5)),
    "layers": (["net.0", "net.4"], ("net.0", "net.4")),
    "exclude_layers": (["encoder.*.attn"], ("encoder.*.attn",)),
    "damage_noise": (["0.25"], 0.25),
    "damage_bits": (["8"], 8),
    "flag_rule": (["top_k"], "top_k"),
    "flag_threshold": (["2"], 2.0),
    "top_k": (["3"], 3),
    "persistence": (["2"], 2),
    "scan_train_set": ([], True),
    "scan_every_n_epochs": (["3"], 3),
    "chunk_size": (["16"], 16),
    "num_images": (["2"], 2),
    "class_names": (["cat", "dog"], ("cat", "dog")),
    "task": (["multilabel"], "multilabel"),
    "ignore_index": (["255"], 255),
    "position_quantile": (["0.5"], 0.5),
    "position_flag_share": (["0.1"], 0.1),
    "seed": (["5"], 5),
}


def _command(name: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_evaluate_exposes_each_monitor_config_field_or_says_why_not() -> None:
    fields = [f.name for f in dataclasses.fields(MonitorConfig)]
    hidden = [name for name, _ in NOT_EXPOSED]
    assert sorted([*EVALUATE_OPTIONS, *hidden]) == sorted(fields)  # each field exactly once
    assert all(len(reason.splitlines()) == 1 and reason.strip() for _, reason in NOT_EXPOSED)
    assert all(len(text.splitlines()) == 1 and text.strip() for text in EVALUATE_OPTIONS.values())
    evaluate = _command("evaluate")
    spelled = {"--" + field.replace("_", "-") for field in EVALUATE_OPTIONS}
    assert _flags(evaluate) == spelled | EVALUATE_OWN  # no other flag
    assert not spelled & EVALUATE_OWN
    options = {a.dest: a.option_strings for a in evaluate._actions}
    for field in EVALUATE_OPTIONS:
        assert options[field] == ["--" + field.replace("_", "-")], field
    defaults = evaluate.parse_args(["a.ckpt", "--output", "out"])
    for field in EVALUATE_OPTIONS:
        assert getattr(defaults, field) == getattr(MonitorConfig(), field), field
    config = _monitor_config(defaults)
    assert config == MonitorConfig(save_figures=True, strict=True)  # the rest: the defaults


def test_each_evaluate_flag_parses_to_the_value_its_field_holds() -> None:
    assert set(NON_DEFAULT) == set(EVALUATE_OPTIONS)  # every exposed flag is tried
    words = ["a.ckpt", "--output", "out"]
    for field, (values, _) in NON_DEFAULT.items():
        words += ["--" + field.replace("_", "-"), *values]
    parsed = _command("evaluate").parse_args(words)
    for field, (_, want) in NON_DEFAULT.items():
        assert want != getattr(MonitorConfig(), field), field
        value = getattr(parsed, field)
        if isinstance(want, tuple):  # a list of the element type, made a tuple by MonitorConfig
            assert isinstance(value, list), field
            assert [type(v) for v in value] == [type(v) for v in want], field
            value = tuple(value)
        assert value == want, field
        assert type(value) is type(want), field
    built = MonitorConfig(**{field: getattr(parsed, field) for field in EVALUATE_OPTIONS})
    config = _monitor_config(parsed)
    for field, (_, want) in NON_DEFAULT.items():
        for got in (getattr(built, field), getattr(config, field)):
            assert got == want, field
            assert type(got) is type(want), field
    assert (config.save_figures, config.strict, config.budget) == (True, True, 0.05)


def test_monitor_options_that_monitor_config_refuses_are_usage_errors(
    tmp_path: Path, capsys
) -> None:
    out = str(tmp_path / "out")
    for bad, message in (
        (["--damage-bits", "1"], "damage_bits must be an integer >= 2"),
        (["--windows", "1", "4"], "windows must be odd positive integers"),
    ):
        assert main(["evaluate", "a.ckpt", "--output", out, *bad, "--", *MODEL]) == 2
        assert message in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _section(text: str, heading: str) -> str:
    """The part of a markdown page under ``heading`` (a level-2 heading), to the next one."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_docs_cli_md_documents_every_flag() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for command in ("evaluate", "demo"):
        section = _section(page, f"`lightning-sens {command}`")
        flags = _flags(_command(command))
        assert len(flags) >= 6
        for flag in sorted(flags):  # as `--flag` or `--flag VALUE`, not a prefix of another
            assert re.search(rf"`{re.escape(flag)}(?![\w-])", section), (command, flag)
    evaluate = _section(page, "`lightning-sens evaluate`")
    for field, _ in NOT_EXPOSED:  # the fields without a flag, and why
        assert f"`{field}`" in evaluate, field


def _script(name: str) -> str:
    found = Path(sys.executable).parent / name  # the console script of this environment
    return str(found) if found.exists() else shutil.which(name) or pytest.skip(f"no {name}")


def test_console_script_imports_from_the_current_folder(checkpoints: Path, tmp_path: Path) -> None:
    """Issue 11.4.1: like `python -m lightning_sens`, the console script finds the user's module
    in the folder it runs from (Python puts that folder on sys.path only for -m)."""
    shutil.copy(tests.cli_models.__file__, tmp_path / "mymod.py")
    one = str(sorted(checkpoints.glob("*.ckpt"))[-1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [_script("lightning-sens"), "evaluate", one, "--output", "out", *SMALL]
    command += ["--", "--model", "mymod.TinyModule", "--data", "mymod.TinyData"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize(
    ("lightning_args", "expected"),
    [
        (
            ["--model", "tests.cli_models.TinyModul", "--data", "tests.cli_models.TinyData"],
            "--model: module 'tests.cli_models' has no class 'TinyModul'; did you mean "
            "'TinyModule'",
        ),
        (
            ["--model=tests.cli_models.TinyModule", "--data=tests.cli_models.TinyDat"],
            "has no class 'TinyDat'; did you mean 'TinyData'?",
        ),
        (
            ["--model", "tests.cli_modelz.TinyModule", "--data", "tests.cli_models.TinyData"],
            "cannot import module 'tests.cli_modelz' (ModuleNotFoundError: No module named "
            "'tests.cli_modelz'); run from the folder that contains it or install it.",
        ),
        (
            ["--model", "tests.cli_models.TinyData", "--data", "tests.cli_models.TinyData"],
            "tests.cli_models.TinyData is not a LightningModule (it is a LightningDataModule: "
            "pass it as --data).",
        ),
        (
            [*MODEL, "--model.init_args.wdth", "3"],
            "after '--': Parser key \"model\": Problem with given class_path "
            "'tests.cli_models.TinyModule': Option 'wdth' is not accepted",
        ),
        (
            [*MODEL, "--model.init_args.width", "abc"],
            "Parser key \"width\": Expected a <class 'int'>. Got value: abc",
        ),
        (["--config", "missing.yaml"], "File does not exist"),
    ],
)
def test_lightning_argument_errors_are_one_line(
    checkpoints: Path, tmp_path: Path, capsys, lightning_args: list[str], expected: str
) -> None:
    """Issue 11.4.2: a typo after '--' gives one line with the fix, not a 59-line usage dump."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoints), "--output", str(out), "--", *lightning_args]) == 2
    assert expected in _one_line(capsys.readouterr().err)
    assert not out.exists()
    assert _leftovers(out) == []


def test_class_path_typo_in_a_config_file(checkpoints: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: tests.cli_models.TinyModle\ndata: tests.cli_models.TinyData\n"
    )
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoints), "--output", str(out), "--", "-c", str(config)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"model: in {config}: module 'tests.cli_models' has no class 'TinyModle'" in line
    assert "did you mean 'TinyModule'" in line


@pytest.mark.parametrize(
    ("lightning_args", "expected"),
    [
        (
            [*MODEL, "--model.init_args.width", "8"],
            "does not fit tests.cli_models.TinyModule: 7 shape mismatches (net.0.weight: "
            "checkpoint (4, 1, 3, 3), model (8, 1, 3, 3), ",
        ),
        (
            ["--model", "tests.cli_models.ExtraModule", "--data", "tests.cli_models.TinyData"],
            "does not fit tests.cli_models.ExtraModule: 2 missing keys (extra.weight, "
            "extra.bias); pass the --model (and its init args) the checkpoint was trained with "
            "(it saved the init args width=4, classes=4).",
        ),
    ],
)
def test_checkpoints_of_another_model(
    checkpoints: Path, tmp_path: Path, capsys, lightning_args: list[str], expected: str
) -> None:
    """Issue 11.4.3: one line before any work (and before the output folder), not a traceback."""
    line = _refused_before_work(checkpoints, tmp_path, capsys, lightning_args)
    assert line.startswith("lightning-sens: error: checkpoint ")
    assert "(and 2 more checkpoints)" in line
    assert expected in line


def _refused_before_work(
    checkpoints: Path, tmp_path: Path, capsys, lightning_args: list[str]
) -> str:
    """Run evaluate, expect exit status 2 and no output folder; the one line on stderr."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(checkpoints), "--output", str(out), "--", *lightning_args]) == 2
    line = _one_line(capsys.readouterr().err)
    assert not out.exists()
    assert _leftovers(out) == []
    return line


@pytest.mark.parametrize(
    ("lightning_args", "expected"),
    [
        (
            [*MODEL, "--data.init_args.size", "12"],
            "the model cannot read the data: the first validation batch gives inputs of shape "
            "(16, 1, 12, 12); the forward raised RuntimeError: ",
        ),
        (
            [*MODEL, "--data.init_args.classes", "6"],
            "the validation labels range over [0, 5] but the model returns K=4 logits "
            "(classes 0 to 3)",
        ),
        (
            ["--model", "tests.cli_models.TinyModule3D", "--data", "tests.cli_models.TinyData"],
            "the model returns (16, 4, 1) on the first validation batch",
        ),
    ],
)
def test_data_the_model_cannot_read(
    checkpoints: Path, tmp_path: Path, capsys, lightning_args: list[str], expected: str
) -> None:
    """Issue 11.4.4: data of another shape or other classes: one line before any work."""
    assert expected in _refused_before_work(checkpoints, tmp_path, capsys, lightning_args)


def _logits(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return default_forward(module, inputs)


def test_accuracy_at_chance_warns_on_the_issue_s_data(learned: Path) -> None:
    """Issue 11.4.4, as found: a CNN that adaptive pooling lets read DigitsData's 8 × 8 images
    without an error, trained on other (28 × 28) data, is at chance on them: a warning."""
    from lightning_sens.demos.data import DigitsData
    from lightning_sens.demos.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = model.state_dict()
    batch = first_batch(DigitsData().val_dataloader())
    warning = check_data(model, batch, default_batch_fn, _logits, lambda i: state, 1)
    assert warning is not None
    assert "on the first validation batch (250 samples" in warning
    assert "chance is 1/10: is --data the data this model was trained on?" in warning
    # The same check is silent where the model knows the data.
    last = sorted(learned.glob("*.ckpt"))[-1]
    weights = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    loader = TinyData(signal=3.0, val_batch=32).val_dataloader()
    model = TinyModule()
    assert (
        check_data(model, first_batch(loader), default_batch_fn, _logits, {0: weights}.get, 1)
        is None
    )


def test_accuracy_at_chance_warns_and_goes_on(learned: Path, tmp_path: Path, capsys) -> None:
    """Issue 11.4.4: the validation labels disagree with what the model learnt: a loud warning
    on stderr, and the evaluation still runs."""
    out = tmp_path / "eval"
    data = ["--data.init_args.signal", "3", "--data.init_args.shift", "1"]
    data += ["--data.init_args.val_batch", "32"]
    assert main(["evaluate", str(learned), "--output", str(out), *SMALL, "--", *MODEL, *data]) == 0
    err = capsys.readouterr().err
    assert "lightning-sens: warning: accuracy 0 on the first validation batch (32 samples" in err
    assert "with the last checkpoint, chance is 1/4: is --data the data" in err
    assert (out / "report.html").exists()


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_failed_run_leaves_no_output(
    checkpoints: Path, tmp_path: Path, capsys, interrupt: bool
) -> None:
    """Issue 11.4.5: the results go to a temporary sibling folder, renamed to --output on
    success only: a failure (an error, Ctrl+C) leaves an earlier output untouched, and the
    rerun is not refused."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    failing = ["--model", "tests.cli_models.FailingModule", "--data", "tests.cli_models.TinyData"]
    failing += ["--model.init_args.interrupt", str(interrupt).lower()]
    command = ["evaluate", str(checkpoints), "--output", str(out), "--overwrite", *SMALL]
    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning turns Ctrl+C into SystemExit(1), and ignores SIGINT from then on
        with pytest.raises(SystemExit if interrupt else RuntimeError):
            main([*command, "--", *failing])
    finally:
        signal.signal(signal.SIGINT, handler)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(out) == []
    shutil.rmtree(out)
    capsys.readouterr()
    assert main([*command, "--", *MODEL]) == 0
    printed = capsys.readouterr().out
    assert f"Report: {out / 'report.html'}" in printed
    assert ".partial" not in printed
    assert (out / "report.html").exists()
    assert _leftovers(out) == []
