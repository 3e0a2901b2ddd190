"""The monitor's time budget: its arithmetic on a fake clock, and the monitor keeping it."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import MonitorConfig, SensitivityMonitor
from lightning_sens.callbacks.budget import TimeBudget
from lightning_sens.callbacks.planner import SECOND_FORWARD, SETUP_CHECK, TRAIN_STEPS, Planner
from lightning_sens.callbacks.policy import Failures
from lightning_sens.callbacks.train_scores import LogitsHook, TrainScores
from lightning_sens.reporting import keys
from tests.logged import epoch_table


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_counts_nested_blocks_once_and_allows_its_share_of_the_rest() -> None:
    clock = Clock()
    budget = TimeBudget(0.1, clock)
    budget.start()
    clock.now += 10.0  # training alone
    with budget.timed():
        clock.now += 0.5
        with budget.timed("exact probes", units=5):  # nested: charged once
            clock.now += 0.5
        assert budget.used == pytest.approx(1.0)  # the open block counts while it runs
    assert budget.spent == pytest.approx(1.0)
    assert budget.unit_cost["exact probes"] == pytest.approx(0.1)
    assert budget.cost_share == pytest.approx(1.0 / 10.0)
    assert budget.allowance == pytest.approx(0.1 * 10.0 - 1.0)  # exactly at its share
    clock.now += 20.0  # 30 s of training: 3 s allowed, 1 s spent
    budget.add(0.5)  # e.g. the figure thread's CPU time
    assert budget.allowance == pytest.approx(0.1 * (31.0 - 1.5) - 1.5)

    fit = budget.fit("exact probes", wanted=32, minimum=4)
    assert fit.units == 14  # 1.45 s left at 0.1 s per sample
    assert fit.reduced
    assert "32 would take about 3.2 s" in fit.reason
    assert budget.fit("exact probes", 32, minimum=4, reserve=1.1).units == 0  # 3 < minimum
    assert budget.fit("exact probes", 8).units == 8  # all of it fits
    assert not budget.fit("exact probes", 8).reduced
    assert budget.fit("figures", 10, minimum=10, prior=0.2).units == 0  # 2 s do not fit
    assert budget.fit("scan", 1).units == 1  # unmeasured, no prior: measures itself once


def test_no_budget_always_fits_and_still_measures() -> None:
    clock = Clock()
    budget = TimeBudget(None, clock)
    budget.start()
    with budget.timed():
        clock.now += 3.0
    clock.now += 1.0
    assert budget.fit("exact probes", 32, prior=100.0).units == 32
    assert budget.cost_share == pytest.approx(3.0)
    assert math.isinf(budget.allowance)


def test_the_first_look_and_decisions_are_planned_over_the_whole_run() -> None:
    """On a fake clock: the first look may borrow from the budget of the whole run as planned
    (at least a minute of it), once per part and on one split; decisions that would exceed the
    budget come less often on runs of a minute or more, never on shorter ones."""
    clock = Clock()
    budget = TimeBudget(0.05, clock)
    planner = Planner(budget, Failures(strict=False))
    planner.active = True
    budget.start()
    clock.now += 10.0  # 10 s of training, 0.5 s allowed so far
    with budget.timed():
        clock.now += 0.4
    planner.progress = 0.05  # 10 s of the rest of training so far: a run planned at 200 s
    assert planner.planned_seconds() == pytest.approx(200.0)
    assert planner.run_allowance() == pytest.approx(10.0)  # 5 % of it
    figures = planner.fit("figures", 10, 10, prior=0.5)  # 5 s: beyond now, within the run
    assert figures.units == 10
    assert figures.first_look
    assert planner.fit("figures", 10, 10, prior=0.5).units == 0  # the first look was taken
    assert not planner.fit("exact probes", 8, 8, prior=2.0).first_look  # 16 s: not even once
    planner.progress = 0.5  # a short run (20 s): the first look may still take 3 s
    assert planner.fit("exact probes", 8, 8, prior=0.3).first_look

    planner.decision_cost = None
    assert planner.decision_fits()  # before a decision was measured
    planner.decision_cost = 1.0
    assert planner.decision_fits()  # a run planned under a minute decides every time
    planner.progress = 0.05
    assert not planner.decision_fits()  # 1 s of decision, 0.1 s left
    clock.now += 100.0  # the allowance grows with training time
    assert planner.decision_fits()
    budget.spent += 6.0  # 5.1 s allowed, 6.4 s spent
    planner.progress = None  # a run of unknown length that has lasted a minute and more
    assert not planner.decision_fits()
    planner.active = False
    budget.spent = 1e9
    assert planner.decision_fits()  # outside fit, or without a budget


def test_budget_is_validated() -> None:
    for bad in (0, -0.1, True, "5%", float("inf")):
        with pytest.raises(ValueError, match="budget must be a positive number"):
            MonitorConfig(budget=bad)  # type: ignore[arg-type]
    assert MonitorConfig(budget=None).budget is None


class Net(pl.LightningModule):
    """A small classifier of 8-dim vectors (inputs that are not images: flagged samples are
    pictured as text through ``describe_fn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loaders(n: int = 256) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def _trainer(tmp_path: Path, monitor: SensitivityMonitor, epochs: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor, *kw.pop("callbacks", [])],
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kw,
    )


class SlowSteps(pl.Callback):
    """Counts training steps, each made to last 20 ms."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(0.02)
        self.count += 1


def test_training_steps_proceed_while_a_slow_figure_is_drawn(tmp_path: Path) -> None:
    """The first picture of a flagged sample waits until training has taken 8 more steps: drawn
    on the training thread it could never see them (it would time out, seeing no progress)."""
    steps = SlowSteps()
    seen: list[tuple[str, int]] = []

    def slow_describe(inputs: Any) -> str:
        start = steps.count
        deadline = time.monotonic() + (30.0 if not seen else 0.0)
        while steps.count < start + 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append((threading.current_thread().name, steps.count - start))
        return "a sample"

    monitor = SensitivityMonitor(
        budget=None, flag_rule="top_k", top_k=1, num_images=1, describe_fn=slow_describe
    )
    train, val = _loaders()
    _trainer(tmp_path, monitor, epochs=4, callbacks=[steps]).fit(Net(), train, val)
    assert seen, "no flagged sample was pictured"
    thread, progress = seen[0]
    assert thread != threading.main_thread().name
    assert progress >= 8  # training went on while the figure was being drawn
    assert monitor.figure_sets_drawn == 4  # and every epoch's figures reached the logs at the end


def test_a_tight_budget_skips_the_optional_parts_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With almost no budget: the closed-form scores, flags and tables every epoch, no exact
    probes, no figures, one line per scaled-down part, and the cost share logged."""
    monitor = SensitivityMonitor(budget=1e-9, score_training_steps=False, train_probe_size=64)
    train, val = _loaders()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, monitor, epochs=3).fit(Net(), train, val)
    assert len(monitor.history) == 3
    for epoch, row in enumerate(monitor.history):
        assert row[keys.exact_probe_size()] == 0
        assert keys.closed_form_holds("val") not in row  # the exact probes did not run
        assert keys.curve("true", "val", "median") in row  # the free scores did
        assert keys.flag_count("val") in row
        assert row[keys.cost_share()] > 1e-9
        assert epoch_table(tmp_path / "lightning_logs/version_0", "flags", epoch).is_file()
    assert monitor.figure_sets_drawn == 0
    notices = [r.getMessage() for r in caplog.records if "SensitivityMonitor (budget=" in r.message]
    # the training probe, the exact probes, the figures, and what is never skipped, once each
    assert len(notices) == 4, notices
    # what is never skipped, part by part, each with its fix
    (never,) = [n for n in notices if "on what it never skips, more than its budget" in n]
    assert "the scores of every validation sample" in never
    assert any("skipped the exact probes at epoch 0" in n for n in notices)
    assert any("skipped the 2 figures" in n for n in notices)  # val: manhattan, flagged
    assert any("scored 0 of 64 probe samples" in n for n in notices)


def test_the_logged_cost_share_is_the_time_the_monitor_took(tmp_path: Path) -> None:
    """A monitor made slow on purpose (a slow batch_fn, 0.05 s per validation batch): the time
    is charged, and the run's cost share is logged at the end of fit; validate after fit is not
    budgeted (the exact probes run whatever the budget)."""
    slow = 0.05

    def batch_fn(batch: Any) -> Any:
        time.sleep(slow)
        return batch[0], batch[1], None

    monitor = SensitivityMonitor(budget=1e-9, batch_fn=batch_fn, log_images=False)
    train, val = _loaders()
    begin = time.perf_counter()
    trainer = _trainer(tmp_path, monitor, epochs=2)
    trainer.fit(Net(), train, val)
    total = time.perf_counter() - begin
    budget = monitor.budget
    assert budget.spent >= slow * 2 * 2  # 2 validation batches per epoch, 2 epochs
    assert budget.totals[SETUP_CHECK] >= slow * 2  # the first batch of each split, charged too
    assert 0 < budget.elapsed <= total
    share = budget.spent / (budget.elapsed - budget.spent)
    assert budget.cost_share == share  # frozen at the end of training
    events = EventAccumulator(str(tmp_path / "lightning_logs/version_0"))  # the Trainer's run
    events.Reload()
    logged = [event.value for event in events.Scalars(keys.cost_share())]
    assert logged[-1] == pytest.approx(share, rel=1e-6)  # float32 in the event file
    assert len(logged) == 3  # two epochs and the end of fit

    trainer.validate(monitor_model(trainer), val)
    assert monitor.history[-1][keys.closed_form_holds("val")] >= 0  # the exact probe ran
    assert keys.cost_share() not in monitor.history[-1]


def monitor_model(trainer: pl.Trainer) -> pl.LightningModule:
    assert trainer.lightning_module is not None
    return trainer.lightning_module


class Silent(Net):
    """A validation step that returns nothing (it logs its loss), and a forward that takes
    30 ms in eval mode: the monitor's second forward of every validation batch is its cost."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            time.sleep(0.03)
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_a_second_validation_forward_is_charged_and_named_with_its_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where validation_step returns no logits, the monitor runs the model once more per
    validation batch: that time is charged to the budget (the logged share is the truth) and,
    when it alone exceeds the budget, the one line about it names the fix."""
    monitor = SensitivityMonitor(log_images=False)
    train, val = _loaders()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, monitor, epochs=2).fit(Silent(), train, val)
    assert monitor.budget.totals[SECOND_FORWARD] >= 0.03 * 2 * 2  # 2 batches, 2 epochs
    (never,) = [r.getMessage() for r in caplog.records if "never skips" in r.getMessage()]
    assert never.index("a second forward pass of every validation batch") < never.index("; ")
    assert "validation_step returns no logits: return them" in never


def test_the_training_hook_inside_the_users_forward_is_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward hook that keeps the training step's logits runs inside the user's forward,
    outside every callback hook: its time is charged to the training steps all the same (the
    reading of the logits, made slow here, runs in the hook and once more on the step's output
    at the end of each step)."""
    slow, calls = 0.01, []
    keep = TrainScores._as_logits

    def slow_keep(self: TrainScores, output: Any) -> Tensor | None:
        calls.append(output)
        time.sleep(slow)
        return keep(self, output)

    monkeypatch.setattr(TrainScores, "_as_logits", slow_keep)
    monitor = SensitivityMonitor(log_images=False)
    train, val = _loaders()
    trainer = _trainer(tmp_path, monitor, epochs=2)
    trainer.fit(Net(), train, val)
    hooked = [output for output in calls if isinstance(output, Tensor)]
    assert len(hooked) >= trainer.global_step >= 4
    assert monitor.budget.totals[TRAIN_STEPS] >= slow * len(calls)


def test_every_second_the_monitor_takes_on_the_training_thread_is_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logged share is the truth only if nothing the monitor does escapes the budget: every
    Lightning hook of the monitor and the forward hook inside the user's step, timed from
    outside, add up to what the budget charged (within what the outside timers' own calls
    cost). A validation step without logits (the second forward), no time limit (every part
    runs: exact probes, training probe, tables); no figures (their thread is charged its CPU
    time, tested above)."""
    outside = [0.0]

    def timed_from_outside(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                outside[0] += time.perf_counter() - begin

        return call

    monkeypatch.setattr(LogitsHook, "__call__", timed_from_outside(LogitsHook.__call__))
    monitor = SensitivityMonitor(budget=None, log_images=False)
    hooks = [name for name in vars(SensitivityMonitor) if name.startswith("on_")]
    hooks += ["setup", "teardown"]
    for name in hooks:
        setattr(monitor, name, timed_from_outside(getattr(monitor, name)))
    train, val = _loaders()
    _trainer(tmp_path, monitor, epochs=3).fit(Silent(), train, val)
    budget = monitor.budget
    assert budget.totals[SECOND_FORWARD] >= 0.03 * 2 * 3  # the slow eval forward ran
    assert budget.totals[TRAIN_STEPS] > 0
    # the outside timers hold the budget's blocks: never less; and not much more
    assert budget.spent <= outside[0]
    assert budget.spent >= 0.95 * outside[0], (budget.spent, outside[0], budget.totals)
