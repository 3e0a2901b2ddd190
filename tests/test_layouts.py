"""A default ``SensitivityMonitor()`` on real project layouts (tests/layouts.py): it completes,
writes complete tables, shows per-layer curves and figures at least once, and leaves training
bit for bit as it was.

Each test reproduces a failure found on projects this package had never seen (a crash at the
first checkpoint, flags silently dropped under common Trainer settings, nothing logged without a
validation loop, files outside the run's folder) and fails on the code before its fix.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
import pickle
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.callbacks import MonitorSetupError
from lightning_sens.reporting import keys, paths
from tests import layouts
from tests.logged import read_logged

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),  # few-batch and worker hints
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*weights_only.*"),
]


@dataclass
class Run:
    trainer: pl.Trainer
    module: pl.LightningModule
    monitor: SensitivityMonitor | None
    log_dir: Path


def _fit(
    tmp_path: Path,
    make: Callable[[], pl.LightningModule],
    loaders: tuple[DataLoader, DataLoader | None],
    monitored: bool = True,
    callbacks: tuple[Callback, ...] = (),
    **trainer: Any,
) -> Run:
    """``trainer.fit`` of the module ``make()`` builds, as a user runs it (checkpoints and the
    default logger on), seeded before the module is built, with or without a default monitor."""
    monitor = SensitivityMonitor() if monitored else None
    options: dict[str, Any] = {
        "default_root_dir": tmp_path / ("monitored" if monitored else "plain"),
        "max_epochs": 3,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        **trainer,
    }
    fit = pl.Trainer(callbacks=[*callbacks, *([monitor] if monitor else [])], **options)
    pl.seed_everything(0, verbose=False)
    module = make()
    train, val = loaders
    fit.fit(module, train, val)
    return Run(fit, module, monitor, Path(fit.log_dir or fit.default_root_dir))


def _same_training(monitored: Run, plain: Run) -> None:
    """Bit for bit the same weights and buffers with and without the monitor."""
    got, expected = layouts.weights(monitored.module), layouts.weights(plain.module)
    assert got.keys() == expected.keys()
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, f"the monitor changed training: {different}"


def _train_rows(log_dir: Path) -> dict[int, dict[int, int]]:
    """epoch → training sample id → how many flag tables of that epoch hold it."""
    found: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for table in paths.flag_tables(log_dir):
        with table.open(newline="") as stream:
            for row in csv.DictReader(stream):
                if row["split"] == "train":
                    found[int(row["epoch"])][int(row["sample"])] += 1
    return found


def _assert_complete(log_dir: Path, epochs: range, samples: int = layouts.TRAIN) -> None:
    """Every training sample is in a table of every epoch it was trained in."""
    rows = _train_rows(log_dir)
    for epoch in epochs:
        missing = sorted(set(range(samples)) - set(rows.get(epoch, {})))
        assert not missing, f"epoch {epoch}: training samples in no table: {missing}"


def _assert_first_look(run: Run) -> None:
    """Per-layer curves and one set of figures at least once, at the monitor's defaults."""
    assert run.monitor is not None
    layer_keys = {k for row in run.monitor.history for k in row if "/kl_noise/" in k}
    assert layer_keys, "no per-layer curve was logged"
    assert run.monitor.figure_sets_drawn >= 1, "no figure was drawn"
    logged = read_logged(run.log_dir)
    assert any(k.startswith(keys.IMAGES) for k in logged.images), sorted(logged.images)
    assert any("/kl_noise/" in k for k in logged.scalars), "no per-layer curve in TensorBoard"


def _no_hooks_left(module: nn.Module) -> None:
    hooked = [name for name, m in module.named_modules() if m._forward_hooks]
    assert not hooked, f"forward hooks left behind on {hooked}"


class CopiesTheModule(Callback):
    """What EMA and weight-averaging callbacks do inside a training step: copy the module."""

    def __init__(self) -> None:
        self.copies = 0

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        copy.deepcopy(module)
        pickle.dumps(module.net)
        self.copies += 1


def _hydra() -> pl.LightningModule:
    return layouts.HydraModule(layouts.Net())


def test_hydra_template_layout_checkpoints_and_copies(tmp_path: Path) -> None:
    """The net stored in the hyperparameters is pickled into every checkpoint: the monitor's
    forward hook must not break that, nor a deepcopy or ``torch.save`` of the module inside a
    training step or after fit (it crashed with "Can't pickle local object" at epoch 0)."""
    copier = CopiesTheModule()
    run = _fit(tmp_path, _hydra, layouts.image_loaders(), callbacks=(copier,))
    plain = _fit(tmp_path, _hydra, layouts.image_loaders(), monitored=False)
    _same_training(run, plain)
    assert copier.copies == 12
    _no_hooks_left(run.module)
    buffer = io.BytesIO()
    torch.save(run.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _no_hooks_left(loaded)
    checkpoint = run.trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    restored = layouts.HydraModule.load_from_checkpoint(checkpoint, weights_only=False)
    assert torch.equal(restored.net.model[0].weight, run.module.net.model[0].weight)
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)


def _cli(tmp_path: Path, monitored: bool) -> Run:
    """A LightningCLI run configured as users write its YAML: the monitor and Lightning's
    BackboneFinetuning (the backbone frozen at the start, unfrozen at epoch 1) as callbacks."""
    from lightning.pytorch.cli import LightningCLI

    callbacks: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.callbacks.BackboneFinetuning",
            "init_args": {"unfreeze_backbone_at_epoch": 1, "verbose": False},
        }
    ]
    if monitored:
        callbacks.append({"class_path": "lightning_sens.SensitivityMonitor"})
    root = tmp_path / ("monitored" if monitored else "plain")
    cli = LightningCLI(
        layouts.FineTuned,
        layouts.ImageData,
        seed_everything_default=0,
        run=False,
        args={
            "trainer": {
                "max_epochs": 3,
                "accelerator": "cpu",
                "default_root_dir": str(root),
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "log_every_n_steps": 1,
                "callbacks": callbacks,
            }
        },
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    found = [c for c in cli.trainer.callbacks if isinstance(c, SensitivityMonitor)]  # type: ignore[attr-defined]
    trainer = cli.trainer
    return Run(trainer, cli.model, found[0] if found else None, Path(trainer.log_dir or root))


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")  # Lightning's
def test_lightning_cli_with_a_backbone_unfrozen_at_epoch_1(tmp_path: Path) -> None:
    """The per-layer curves cover the head while the backbone is frozen and the backbone too
    once BackboneFinetuning unfreezes it."""
    run, plain = _cli(tmp_path, monitored=True), _cli(tmp_path, monitored=False)
    _same_training(run, plain)
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)
    assert run.monitor is not None
    measured = {
        int(row["epoch"]): {k.rsplit("/", 1)[-1] for k in row if "/kl_noise/" in k}
        for row in run.monitor.history
    }
    # the first look comes at epoch 0, with the backbone frozen: only the head is measured
    assert measured[0] == {"head"}, measured


def test_hugging_face_model_in_a_lightning_module(tmp_path: Path) -> None:
    """A Hugging Face classifier called as ``self.model(**batch)`` in the training step: its
    training steps are scored (the model found as the submodule with logits)."""
    run = _fit(tmp_path, layouts.HuggingFace, layouts.token_loaders())
    plain = _fit(tmp_path, layouts.HuggingFace, layouts.token_loaders(), monitored=False)
    _same_training(run, plain)
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)


def test_a_binary_classifier_with_one_logit(tmp_path: Path) -> None:
    """One logit, BCEWithLogitsLoss and float (B, 1) targets: the two-class model (0, z),
    in the training steps, the validation scores, the exact probes and the flags."""
    run = _fit(tmp_path, layouts.Binary, layouts.binary_loaders())
    plain = _fit(tmp_path, layouts.Binary, layouts.binary_loaders(), monitored=False)
    _same_training(run, plain)
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)
    assert run.monitor is not None
    evidence = run.monitor.tracker.evidence
    assert evidence is not None
    assert evidence.total.shape == (layouts.TRAIN, 2)


@pytest.mark.parametrize("ids", [True, False])
def test_an_iterable_training_dataset(tmp_path: Path, ids: bool) -> None:
    """A training stream without indices: scored where its samples carry ids, one warning
    otherwise, never a crash; validation is monitored either way."""
    val = layouts.image_loaders()[1]
    stream = DataLoader(layouts.Stream(ids=ids), batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _fit(tmp_path, layouts.Plain, (stream, val))
    said = [str(w.message) for w in caught if "IterableDataset" in str(w.message)]
    assert run.monitor is not None
    if ids:
        assert not said
        _assert_complete(run.log_dir, range(3))
    else:
        assert len(said) == 1, said
        assert not _train_rows(run.log_dir)
    assert any(k.startswith("sensitivity/val/") for k in run.monitor.history[-1])


def test_no_validation_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without validation the monitor still scores, flags and draws the training split, at the
    end of every training epoch, and says once what needs a validation loop (it logged nothing,
    without a word, before)."""
    train = layouts.image_loaders()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _fit(tmp_path, _hydra, (train, None), limit_val_batches=0)
    assert run.monitor is not None
    assert "no validation loop" in caplog.text
    assert [int(row["epoch"]) for row in run.monitor.history] == [0, 1, 2]
    assert all(keys.flag_count("train") in row for row in run.monitor.history)
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)
    plain = _fit(tmp_path, _hydra, (train, None), limit_val_batches=0, monitored=False)
    _same_training(run, plain)


def test_validation_twice_per_epoch(tmp_path: Path) -> None:
    """``val_check_interval=0.5``: two decisions per epoch, two tables that overwrite nothing
    (half the training set's rows were lost before), together every training sample."""
    run = _fit(tmp_path, _hydra, layouts.image_loaders(), val_check_interval=0.5)
    plain = _fit(tmp_path, _hydra, layouts.image_loaders(), val_check_interval=0.5, monitored=False)
    _same_training(run, plain)
    assert len(paths.flag_tables(run.log_dir)) == 6
    rows = _train_rows(run.log_dir)
    assert all(set(per.values()) == {1} for per in rows.values()), "a sample in two tables"
    _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)


@pytest.mark.parametrize(
    "schedule",
    [{"check_val_every_n_epoch": 2}, {"max_steps": 10}],
    ids=["every-2nd-epoch", "max-steps"],
)
def test_steps_after_the_last_validation(tmp_path: Path, schedule: dict[str, int]) -> None:
    """Training steps that no validation follows (``check_val_every_n_epoch=2`` with 3 epochs;
    ``max_steps`` in the middle of an epoch after its validation) are decided at the end of
    the epoch or of fit, in a table of their epoch."""
    run = _fit(tmp_path, _hydra, layouts.image_loaders(), **schedule)
    plain = _fit(tmp_path, _hydra, layouts.image_loaders(), monitored=False, **schedule)
    _same_training(run, plain)
    rows = _train_rows(run.log_dir)
    if "max_steps" in schedule:  # epochs 0 and 1 whole, then 2 of the 4 batches of epoch 2
        _assert_complete(run.log_dir, range(2))
        assert len(rows[2]) == 32, sorted(rows[2])
    else:
        _assert_complete(run.log_dir, range(3))
    _assert_first_look(run)


def test_logger_false_writes_only_under_the_root_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``Trainer(logger=False)``: the tables go under ``default_root_dir``, nothing is written
    elsewhere (the working directory included), and the one line about it is true."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    before = os.getcwd()
    os.chdir(elsewhere)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = _fit(tmp_path, _hydra, layouts.image_loaders(), logger=False)
    finally:
        os.chdir(before)
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())
    root = tmp_path / "monitored"
    assert run.log_dir == root
    assert paths.flag_tables(root)
    written = {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()}
    assert written <= {"sensitivity", "checkpoints"}, written
    said = [str(w.message) for w in caught] + [caplog.text]
    assert not any("still go to the loggers" in line for line in said), said
    assert f"with no logger at all, its tables go under {paths.folder(root)}" in caplog.text


def test_batches_prefetched_by_workers_are_scored(tmp_path: Path) -> None:
    """With workers, the loader deals the indices of the first batches before each epoch
    starts; they are scored too (every sample once per epoch: the first epoch's in its flag
    table, the second's in the evidence, which the first epoch has left), as is the first
    batch of a module that calls its network as ``self.forward(x)``."""
    run = _fit(tmp_path, _hydra, layouts.image_loaders(workers=2), max_epochs=2)
    assert run.monitor is not None
    evidence = run.monitor.tracker.evidence
    assert evidence is not None
    assert evidence.ids.tolist() == list(range(layouts.TRAIN))
    assert evidence.seen.tolist() == [1] * layouts.TRAIN
    first: dict[int, int] = {}
    for table in paths.flag_tables(run.log_dir):
        with table.open(newline="") as stream:
            for row in csv.DictReader(stream):
                if row["split"] == "train" and row["epoch"] == "0":
                    first[int(row["sample"])] = int(row["seen"])
    assert first == dict.fromkeys(range(layouts.TRAIN), 1)


class NoForward(layouts.Plain):
    """The steps call ``self.net(x)``; the module defines no ``forward``, as many do."""

    forward = pl.LightningModule.forward  # type: ignore[assignment]


def test_a_module_without_forward_is_scored_from_its_steps_and_told_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The training steps are scored from the logits they compute (Lightning's own demo LSTM
    has no forward() either); the parts that run the model say once what to add. Without
    scored training steps there is nothing to read, and the monitor refuses before the first
    step, with the line to add or the option to pass (it failed with "missing the required
    forward function" and a pointer to batch_fn)."""
    with caplog.at_level(logging.INFO):
        run = _fit(tmp_path, NoForward, layouts.image_loaders())
    assert "NoForward has no forward()" in caplog.text
    assert "def forward(self, x): return self.net(x)" in caplog.text
    _assert_complete(run.log_dir, range(3))
    trainer = pl.Trainer(
        default_root_dir=tmp_path / "steps_off",
        max_epochs=1,
        accelerator="cpu",
        callbacks=[SensitivityMonitor(score_training_steps=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(MonitorSetupError) as caught:
        trainer.fit(NoForward(), *layouts.image_loaders())
    message = str(caught.value)
    assert "NoForward has no forward()" in message
    assert "def forward(self, x): return self.net(x)" in message
    assert "forward_fn=lambda module, x: module.net(x)" in message


def test_a_model_at_chance_flags_nothing_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A binary fine-tuning run that learns nothing (labels independent of the images, 24
    validation samples): no validation sample is flagged (the rule as it was flagged 6 of the
    24 at every epoch, correct labels all), the undecided classes are counted, and one line
    says why."""
    g = torch.Generator().manual_seed(10)  # one where the rule as it was flagged 6 of 24
    x = torch.randn(64 + 24, 1, 8, 8, generator=g)
    y = torch.randint(0, 2, (64 + 24,), generator=g).float().unsqueeze(1)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=24)
    with caplog.at_level(logging.INFO):
        run = _fit(tmp_path, layouts.Binary, (train, val))
    assert run.monitor is not None
    for row in run.monitor.history:
        assert row[keys.flag_count("val")] == 0, row
        assert row[keys.undecided_classes("val")] == 2, row
    assert "flags no val sample of the classes 0, 1" in caplog.text
