"""SensitivityMonitor: the Lightning callback. It translates the Trainer's hooks into calls on the
Lightning-free :class:`~lightning_sens.tracking.SensitivityTracker` (update, gather, compute,
reset, state_dict) and on the parts that run the model and write (:mod:`.epoch`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from lightning_sens.callbacks.batches import Batch, Reader, default_batch_fn, trainer_loaders
from lightning_sens.callbacks.checking import check_setup
from lightning_sens.callbacks.epoch import EpochRunner
from lightning_sens.callbacks.internals import planned_loader
from lightning_sens.callbacks.planner import (
    DECISION_PARTS,
    FLAGS,
    SECOND_FORWARD,
    SETUP_CHECK,
    TRAIN_STEPS,
    VALIDATION_SCORES,
)
from lightning_sens.callbacks.policy import Failures
from lightning_sens.callbacks.position_buffer import PositionBuffer
from lightning_sens.callbacks.sample_ids import indexable
from lightning_sens.callbacks.setup import MonitorSetupError
from lightning_sens.callbacks.stride import PositionStride
from lightning_sens.callbacks.train_scores import TrainScores
from lightning_sens.config import MonitorConfig
from lightning_sens.reporting.images import Describe
from lightning_sens.tracking import SensitivityTracker

__all__ = ["MonitorSetupError", "SensitivityMonitor", "default_batch_fn"]


class SensitivityMonitor(Callback):
    """Sensitivity (the influence measure FI of Shu & Zhu, AAAI 2019) logged during training.

    It decides (scores, probes, flags, writes and draws) at every monitored validation
    (``every_n_epochs``), at the end of a training epoch whose training steps no validation has
    decided on (every epoch without a validation loop), and at the end of ``fit`` for the steps
    after the last decision, so that every training sample lands in a table of its epoch. Each
    decision scores every validation sample it has and every training sample since the previous
    decision (from its training steps, or a fixed probe) with the closed form of whole-input FI,
    runs the exact engine on small probes (input maps, per-layer FI and damage), flags
    high-influence samples with persistence, writes the flag and layer tables under
    ``<log_dir>/sensitivity/`` and logs curves, histograms and figures; optionally it scans the
    whole training set. Within ``budget`` it runs the optional parts only as far as they fit,
    after a first look at all of them. What it logs, key by key, and every option:
    docs/monitor.md, "Output" and "Options".

    Args:
        config: a :class:`~lightning_sens.config.MonitorConfig`; keyword options override its
            fields (``SensitivityMonitor(every_n_epochs=2)``).
        batch_fn: batch → (inputs, labels, sample ids or None), for batches that
            :func:`default_batch_fn` cannot read.
        forward_fn: (module, inputs) → logits, for modules whose forward returns something
            else than logits or an output with a ``logits`` attribute or key.
        train_dataloader: where the training probe comes from when the Trainer has no training
            loader (``trainer.validate``, post-hoc evaluation).
        describe_fn: one sample's inputs (a batch of one) → a line of text, for pictures of
            samples that are not images.
        post_hoc: evaluating saved checkpoints (``lightning-sens evaluate``): every validation
            is monitored, at ``position``, and the state is kept apart from a training run's.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        batch_fn: Callable[[Any], Batch] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        train_dataloader: DataLoader | None = None,
        describe_fn: Describe | None = None,
        post_hoc: bool = False,
        **options: Any,
    ) -> None:
        c = self.config = MonitorConfig.with_options(config, options)
        self.train_dataloader, self.post_hoc = train_dataloader, post_hoc
        post = {"post_hoc": True} if post_hoc else {}
        self._state_key = self._generate_state_key(
            seed=c.seed, every_n_epochs=c.every_n_epochs, **post
        )
        self.position: tuple[int, int] | None = None  # (epoch, step) of a post-hoc evaluation
        self.class_names = c.class_names
        self.reader = Reader(batch_fn, forward_fn)
        self.reader.quantile = c.position_quantile
        self.reader.task, self.reader.ignore_index = c.task, c.ignore_index
        self.reader.stride = c.position_stride or 1  # every n-th position (fit: measured)
        self.tracker = SensitivityTracker(c)
        self.failures = Failures(c.strict)
        self.runner = EpochRunner(c, self.reader, self.tracker, self.failures, describe_fn)
        self.budget = self.runner.budget
        timed = partial(self.budget.timed, TRAIN_STEPS)
        self._train = TrainScores(self.reader, self.failures.warn_once, timed, self._stride())
        self._active, self._seen = False, 0
        self._val_positions = PositionBuffer(c.position_quantile)  # validation's, a few at a time
        self._decisions = 0  # made in this fit, on every rank alike
        self._decision_began = 0.0  # the never-skipped seconds when this decision began
        self._checked: set[tuple[str, int]] = set()  # (stage, trainer) whose setup was checked

    def _stride(self) -> PositionStride:
        """How many positions of each sample the training steps score: measured in each fit."""
        c, tell = self.config, self.failures.info_once
        return PositionStride(
            c.position_stride, self.budget, TRAIN_STEPS, tell, c.position_flag_share
        )

    @property
    def history(self) -> list[dict[str, float]]:
        """One row of metrics per decision (with ``epoch`` and ``step``)."""
        return self.tracker.history

    @property
    def figure_sets_drawn(self) -> int:
        """Decisions whose figures were drawn to the end (the time budget skips some)."""
        return self.runner.drawing.drawn

    @property
    def state_key(self) -> str:
        """From the constructor's arguments only; computed once (Lightning reads it at every
        hook it calls, several times per training step)."""
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changes = self.tracker.load_state_dict(state_dict)  # what changed, and what it reset
        if changes:
            self.failures.warn_once("resume", f"SensitivityMonitor resumes {changes}.")

    # -- setup: the precision's input conversion, and errors in seconds ------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.reader.convert = trainer.precision_plugin.convert_input

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.budget.start()  # from here: the set-up check is part of the monitor's cost
        self._decisions = 0
        self._train.stride = self._stride()  # measured anew each fit (or the option's)
        self.reader.stride = self._train.stride.stride
        with self.budget.timed(SETUP_CHECK):
            loops = {"train": trainer.fit_loop, "val": trainer.fit_loop.epoch_loop.val_loop}
            found = {split: planned_loader(loop) for split, loop in loops.items()}
            # a stream is not read ahead of training: its first batch is checked when it comes
            self._check(trainer, pl_module, "fit", {k: v for k, v in found.items() if indexable(v)})
            if self.config.score_training_steps:
                self._train.start(trainer, pl_module, self.reader.sample_shape)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # trainer.validate: its loaders are set up
            self._check(trainer, pl_module, "validate", self._loaders(trainer))

    def _check(self, trainer: Trainer, module: LightningModule, stage: str, loaders: Any) -> None:
        if (stage, id(trainer)) not in self._checked:  # every rank checks: all raise, none waits
            self._checked.add((stage, id(trainer)))
            deferrable = stage == "fit" and self.config.score_training_steps
            found = check_setup(
                self.reader, module, loaders, self.runner.prober, self.failures, deferrable
            )
            self.class_names = self.class_names or found

    def _loaders(self, trainer: Trainer, validation: bool = True) -> dict[str, DataLoader]:
        """The loaders the probes, the scan and the pictures fetch samples from (indexable
        ones only), without the validation loader where this decision has no validation."""
        found = trainer_loaders(trainer, self.train_dataloader)
        return {k: v for k, v in found.items() if indexable(v) and (validation or k != "val")}

    # -- training steps ---------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.runner.planner.active = self.config.budget is not None
        if not trainer.enable_validation:
            self.failures.info_once(
                "no-validation",
                "SensitivityMonitor: this run has no validation loop, so it scores, flags and "
                "draws the training split at the end of every training epoch; the validation "
                "curves and flags, the train-vs-validation gap and the validation probe need "
                "one (val_dataloaders, with limit_val_batches > 0).",
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.budget.timed(TRAIN_STEPS):
            self._train.on_epoch_start()
            self.reader.turn = trainer.current_epoch  # which n-th positions this epoch scores

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with self.budget.timed(TRAIN_STEPS):
            self._train.on_batch_start(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        with self.budget.timed(TRAIN_STEPS):
            self._train.score(trainer, pl_module, outputs, batch, self.config.strict)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The training steps no validation decided on: every epoch (with ``every_n_epochs``
        > 1, only without a validation loop, every n-th epoch)."""
        n = self.config.every_n_epochs
        if not trainer.enable_validation:  # the same on every rank
            due = trainer.current_epoch % n == 0
        else:
            due = n == 1 and self._any_rank(self._train.pending > 0, trainer)
        if due and not self._thinned(trainer):
            with self.budget.timed():
                self._decision_began = self._mandatory()
                self._decide(trainer, pl_module, (trainer.current_epoch, trainer.global_step))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The steps after the last decision (``max_steps``, ``check_val_every_n_epoch``)."""
        if self._any_rank(self._train.pending > 0, trainer):
            with self.budget.timed():
                self._decide(trainer, pl_module, (self._train.last_epoch, trainer.global_step))
        self._train.stop()
        self.runner.close(trainer, end_of_fit=True)

    def on_exception(self, *args: Any) -> None:
        self._train.stop()
        self.runner.drawing.wait()  # the figures drawn so far reach the logs; errors don't matter

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._train.stop()
        self.runner.close(trainer, end_of_fit=False)

    @staticmethod
    def _any_rank(here: bool, trainer: Trainer) -> bool:
        """Whether ``here`` holds on some rank: every rank takes the same branch into the
        collectives that follow (a rank that went its own way would leave the others waiting)."""
        return bool(trainer.strategy.reduce_boolean_decision(here, all=False))

    # -- validation ---------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self.budget.timed():
            self._active = False
            if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate: asked for, so done
                self._active = True
            elif not trainer.sanity_checking:
                count = self.tracker.validations
                self.tracker.validations += 1
                due = count % self.config.every_n_epochs == 0
                self._active = due and not self._thinned(trainer)
            self._decision_began = self._mandatory()
            self._seen = 0
            self._val_positions.clear()
            self.runner.planner.start_clock()
            self.tracker.reset()
            self.tracker.validation.to(pl_module.device)
            self.tracker.validation_positions.to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:  # the first validation loader only
            return
        with self.budget.timed(), self.failures.epoch(trainer.current_epoch) as failed:
            with self.budget.timed(VALIDATION_SCORES):
                inputs, labels, ids = self.reader.validation_batch(batch, self._seen, trainer)
                self._seen += len(labels)
                logits = self.reader.returned_logits(outputs, len(labels))
            if logits is None:  # the step returns no logits: one more forward, charged apart
                with self.budget.timed(SECOND_FORWARD):
                    logits = self.reader.forward(pl_module, inputs)
            with self.budget.timed(VALIDATION_SCORES):
                if self.reader.layout is not None:  # many positions per sample
                    self.reader.keep_positions(self._val_positions, ids, inputs, labels, logits)
                else:
                    self.tracker.update(ids, labels, logits)
        self._active = not failed[0]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with self.budget.timed():
            if self._active:  # the last batches' positions, kept to be scored together
                epoch = trainer.current_epoch
                with self.budget.timed(VALIDATION_SCORES), self.failures.epoch(epoch) as failed:
                    rows = self._val_positions.rows()
                    if rows is not None:
                        self.tracker.update_positions(rows)
                self._active = not failed[0]
            if self._active and self._seen:
                self.runner.planner.stop_clock(self._seen)
            # a validation batch that failed on one rank skips the decision on every rank
            agreed = bool(trainer.strategy.reduce_boolean_decision(self._active, all=True))
            if agreed:
                at = self.position or (trainer.current_epoch, trainer.global_step)
                self._decide(trainer, pl_module, at, validation=True)
            elif self._active:
                rank_zero_warn(
                    f"SensitivityMonitor skipped the monitoring of epoch {trainer.current_epoch}:"
                    " a validation batch failed on another process (the processes skip it "
                    "together)."
                )
            self.tracker.reset()

    def _decide(
        self,
        trainer: Trainer,
        module: LightningModule,
        at: tuple[int, int],
        validation: bool = False,
    ) -> None:
        """Fold the training steps since the last decision into the evidence and run the
        decision at ``at`` = (epoch, step) on every rank (a collective)."""
        if self._train.started:
            with self.failures.part("the training-step scores"), self.budget.timed(FLAGS):
                self._train.fold_into(self.tracker, trainer.is_global_zero)  # a collective
        loaders, names = self._loaders(trainer, validation), self.class_names
        self.runner.planner.progress = _progress(trainer)
        self.runner.end(trainer, module, at, loaders, self._train.started, names)
        self._decisions += 1
        self.runner.planner.decision_cost = self._mandatory() - self._decision_began

    def _mandatory(self) -> float:
        """The seconds spent so far on what every decision does."""
        return sum(self.budget.totals.get(part, 0.0) for part in DECISION_PARTS)

    def _thinned(self, trainer: Trainer) -> bool:
        """Whether to leave out a decision that is due: on a run of a minute or more, where its
        never-skipped work would exceed the budget now (the first decision of a fit is always
        made). Rank zero's budget decides for every rank (a collective)."""
        if self._decisions == 0 or trainer.state.fn != TrainerFn.FITTING:
            return False
        planner = self.runner.planner
        planner.progress = _progress(trainer)
        fits = bool(trainer.strategy.broadcast(planner.decision_fits(), src=0))
        if not fits:
            cost = planner.decision_cost or 0.0
            self.failures.info_once(
                "budget:decisions",
                f"SensitivityMonitor (budget={self.budget.share:g}) decides less often than at "
                f"every validation from epoch {trainer.current_epoch} on: the scores, flags and "
                f"tables of every sample take {cost:.2g} s per decision, more than the budget "
                "allows now. No training sample is left out: the next decision's table holds "
                "every one trained since the last. every_n_epochs=n decides at every n-th "
                "validation; budget=None at every one.",
            )
        return not fits


def _progress(trainer: Trainer) -> float | None:
    """The share of the run's optimizer steps done, where Lightning knows the run's length."""
    if trainer.state.fn != TrainerFn.FITTING:
        return None
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # a loader without a length, or an unbounded run: the length is unknown
        return None
    if not 0 < total < float("inf"):
        return None
    return min(max(trainer.global_step, 1) / total, 1.0)
