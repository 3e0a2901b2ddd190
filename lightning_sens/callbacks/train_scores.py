"""Training-set scores for free: log FI of every label from the logits of the training steps.

No extra pass. During each training step a forward hook keeps the logits: those the step returns
(a dict with ``"logits"``), or the output of the module that computes them: the LightningModule
itself (``self(x)``) or, found on the first step, the outermost submodule whose output has the
model's ``(batch, classes)`` shape (``self.net(x)``, or ``self.forward(x)``, which bypasses the
LightningModule's own hooks). The hooks are registered at the start of each training step and
removed at its end, so a checkpoint, a pickle or a copy of the module made outside a training
step never holds one; a copy made inside a step holds an inert one (:class:`LogitsHook`).

Sample ids come from the batch (``(x, y, ids)`` or a dict with ``sample_id``/``idx``) or from the
training loader's batch sampler (:mod:`~lightning_sens.callbacks.sample_ids`). The logits are
train-mode logits (dropout on, augmented inputs), as AUM uses them.

Each rank keeps its own rows on its device, in a torchmetrics ``Metric``
(:class:`~lightning_sens.tracking.Samples`); :meth:`TrainScores.collect` gathers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sens.callbacks.batches import Reader
from lightning_sens.callbacks.internals import LoaderTap
from lightning_sens.callbacks.position_buffer import PositionBuffer
from lightning_sens.callbacks.sample_ids import IndexRecorder, indexable
from lightning_sens.callbacks.setup import MonitorSetupError, class_labels
from lightning_sens.callbacks.stride import PositionStride, least_scored
from lightning_sens.core.inputs import found_logits, logits_of
from lightning_sens.core.layout import read_layout
from lightning_sens.core.outputs import position_scores
from lightning_sens.core.references import flag_kind
from lightning_sens.label_noise import MAX_ENTRIES, label_log_fi
from lightning_sens.reporting.positions import PositionRows
from lightning_sens.tracking import Samples, SensitivityTracker

__all__ = ["LogitsHook", "TrainScores"]


class LogitsHook:
    """A forward hook that hands a module's output to ``sink(name, output)``.

    A copy of it (``copy.deepcopy`` or ``pickle`` of a module during a training step) does
    nothing: the copy must neither feed the monitor nor keep it alive.
    """

    def __init__(self, name: str, sink: Callable[[str, Any], None] | None) -> None:
        self.name = name
        self.sink = sink

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.sink is not None:
            self.sink(self.name, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> LogitsHook:
        return LogitsHook(self.name, None)

    def __reduce__(self) -> tuple[type[LogitsHook], tuple[str, None]]:
        return LogitsHook, (self.name, None)


def _depth(name: str) -> int:
    """0 for the LightningModule itself, 1 for its children, and so on."""
    return 0 if name == "" else name.count(".") + 1


class TrainScores:
    """Collects (ids, labels, logits) of the training batches on each rank.

    A model with many positions per sample (the reader's ``layout``) has each step's positions
    kept (every position, or every n-th of each sample where scoring them all costs more than
    the budget leaves to it: ``stride``) and scored and reduced per sample a few steps at a time
    (:class:`~lightning_sens.callbacks.position_buffer.PositionBuffer`), so that no step's
    ``(B, T, V)`` logits are kept whole.

    Args:
        reader: reads a batch (inputs, labels, ids or None) and, for many positions, scores it.
        warn: one-time warnings (key, message).
        timed: a context charging its block to the budget's training steps.
        stride: chooses how many positions of each sample to score (the reader's ``stride``);
            None: every position.

    Attributes:
        sample_shape: one sample's logits as the model returns them (``(K,)``, or ``(1,)`` or
            ``()`` for one binary logit), from the set-up check: outputs of other shapes are not
            the logits.
        pending: rows kept on this rank since the last :meth:`collect`.
        last_epoch: the epoch of the last training step scored or seen.
    """

    def __init__(
        self,
        reader: Reader,
        warn: Callable[[str, str], None],
        timed: Callable[[], AbstractContextManager[object]] = nullcontext,
        stride: PositionStride | None = None,
    ) -> None:
        self.reader = reader
        self.stride = stride  # how many positions of a sample to score: the reader's stride
        self.read = reader.read
        self.warn = warn
        self.timed = timed  # charges the hook's work inside the user's forward to the budget
        self.sample_shape: tuple[int, ...] | None = None
        self.active = self.started = False
        self.pending = 0
        self.last_epoch = 0
        self._rows = Samples({"ids": torch.long, "labels": torch.long, "logits": torch.float64})
        # each step's (ids, labels, logits), handed to ``_rows`` once per decision: a metric's
        # update per step costs more than the rest of the step's scoring on a small model
        self._steps: list[tuple[Tensor, Tensor, Tensor]] = []
        self._positions = Samples(PositionRows.dtypes())  # many positions: per sample
        self._position_steps = PositionBuffer(reader.quantile)  # scored a few steps at a time
        self._ids = IndexRecorder()
        self._tap: LoaderTap | None = None
        self._handles: list[Any] = []
        self._found: list[tuple[str, Tensor]] = []
        self._module: str | None = None  # the module whose output is the logits; None: search
        self._check_labels = True
        self._streamed = False  # a training loader whose samples have no index
        self._strict = False  # the monitor's strict: errors raise

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self, trainer: Trainer, module: LightningModule, sample_shape: tuple[int, ...] | None
    ) -> None:
        """Before the fit loop builds its training loader: watch for it."""
        self.active = self.started = True
        self.sample_shape, self.pending, self._module = sample_shape, 0, None
        self._rows.to(module.device)
        self._positions.to(module.device)
        self._tap = LoaderTap(trainer, self._on_loader)

    def _on_loader(self, loader: object) -> None:
        if not self._ids.watch(loader):
            self._streamed = not indexable(loader)

    def stop(self) -> None:
        """Remove everything attached to the Trainer, the loaders and the module."""
        self._unhook()
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self._ids.release()
        self._forget()
        self.active = self.started = False

    def on_epoch_start(self) -> None:
        self._check_labels = True

    # -- one training batch ------------------------------------------------------------------

    def on_batch_start(self, module: LightningModule) -> None:
        """Hook the module that computes the logits (every module, on the first batch)."""
        self._found = []
        if not self.active:
            return
        if self._module is None:
            watched = dict(module.named_modules())
        else:
            watched = {self._module: module.get_submodule(self._module)}
        self._handles = [
            m.register_forward_hook(LogitsHook(name, self._keep)) for name, m in watched.items()
        ]

    def _keep(self, name: str, output: Any) -> None:
        with self.timed():
            logits = self._as_logits(output)
            if logits is not None:
                self._found.append((name, logits))

    def _as_logits(self, output: Any) -> Tensor | None:
        """``(B, K)`` logits where ``output`` holds a tensor of the model's logits' shape (one
        binary logit z as ``(0, z)``), else None."""
        raw = found_logits(output)
        dense = self.reader.deferred or self.reader.layout is not None
        if dense and isinstance(raw, tuple | list):  # (logits, hidden state)
            raw = next((t for t in raw if isinstance(t, Tensor)), None)
        if not isinstance(raw, Tensor) or raw.dim() == 0:
            return None
        if self.reader.deferred:  # the layout is read from this first batch (_read_layout)
            return raw.detach() if raw.is_floating_point() else None
        if self.reader.layout is not None:
            return raw.detach() if tuple(raw.shape[1:]) == self.sample_shape else None
        if self.sample_shape is None and raw.dim() != 2:
            return None
        if self.sample_shape is not None and tuple(raw.shape[1:]) != self.sample_shape:
            return None
        return logits_of(raw.detach())

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def score(
        self,
        trainer: Trainer,
        module: LightningModule,
        outputs: Any,
        batch: Any,
        strict: bool,
    ) -> None:
        """Keep the logits of a training step; on an error, stop scoring the training steps
        with a warning (``strict``: raise)."""
        self._strict = strict
        recorded = self._ids.next_batch()  # every batch takes its indices, scored or not
        if not isinstance(trainer.train_dataloader, DataLoader):
            recorded = None  # several training loaders: their samplers' records interleave
        self._unhook()
        self.last_epoch = trainer.current_epoch
        if not self.active:
            return
        try:
            self._keep_batch(module, outputs, batch, recorded)
        except Exception as error:
            if strict:
                raise
            self._disable(
                "error",
                f"SensitivityMonitor stopped scoring the training steps ({type(error).__name__}: "
                f"{error}); the training curves come from the probe (strict=True raises).",
            )
        finally:
            self._found = []

    def _keep_batch(
        self, module: LightningModule, outputs: Any, batch: Any, recorded: Tensor | None
    ) -> None:
        inputs, labels, ids = self.read(batch)
        size = len(labels)
        if ids is None:
            ids = self._recorded_ids(recorded, labels)
            if ids is None:
                return
        self._check_labels = False
        deferred = self.reader.deferred
        logits = self._logits(module, outputs, size, labels, inputs)
        if logits is None:
            return
        if deferred and self.reader.layout is None:  # one class per sample after all
            labels = class_labels(labels, "a training batch")
        layout = self.reader.layout
        if layout is not None:
            self.reader.keep_positions(self._position_steps, ids, inputs, labels, logits)
            self.pending += size
            if self.stride is not None and layout.task != "multilabel":
                positions = math.prod(layout.positions) - int(layout.shift)
                classes = logits.shape[1 if layout.class_dim == 1 else -1]
                least = least_scored(flag_kind(layout, classes), self.stride.flag_share)
                self.reader.stride = self.stride.step(positions, least)
            return
        if self.pending == 0 and not self._fits(logits.shape[-1]):
            return self._disable(
                "memory",
                f"SensitivityMonitor does not score the training steps: the training set × "
                f"{logits.shape[-1]} classes exceeds the {MAX_ENTRIES:,} scores the evidence "
                "keeps.",
            )
        # the scores are computed at collect(), for all rows in one call: a few small kernels
        # per step cost more than the scores themselves on small models
        self._steps.append((ids, labels, logits))
        self.pending += size

    def _recorded_ids(self, recorded: Tensor | None, labels: Tensor) -> Tensor | None:
        """The batch's ids from the batch sampler's record; None (the steps are no longer
        scored, with a warning) where there is none or it disagrees with the batch."""
        if recorded is None:
            if self._streamed:
                reason = (
                    "the training loader's dataset is an IterableDataset, whose samples have no "
                    "index, and its batches carry no ids (yield (x, y, id), or a dict with "
                    "'sample_id')"
                )
            else:
                reason = (
                    "its batches carry no sample ids and its loader's order could not be "
                    "recorded (a loader without a batch sampler, or several training loaders; "
                    "wrap the dataset in lightning_sens.WithIndex to hand the ids over)"
                )
            self._disable("ids", f"SensitivityMonitor cannot score the training steps: {reason}.")
            return None
        if len(recorded) != len(labels):
            self._disable(
                "ids",
                "SensitivityMonitor cannot score the training steps: the training loader's "
                f"sampler dealt {len(recorded)} indices for a batch of {len(labels)} samples.",
            )
            return None
        if self._check_labels and not self._ids.labels_match(recorded, labels, self.read):
            self._disable(
                "ids",
                "SensitivityMonitor cannot score the training steps: the labels of the indices "
                "the training sampler dealt differ from the batch's labels (a loader that "
                "reorders its batches?).",
            )
            return None
        return recorded

    def _read_layout(self, outputs: Any, labels: Tensor, inputs: Any) -> Tensor | None:
        """A module without forward(): the outermost module output of this first training
        step that reads as logits against the labels (:func:`read_layout`) is the logits from
        now on; None (the steps are not scored, with a warning) where none does."""
        found = [(i, name, z) for i, (name, z) in enumerate(self._found)]
        returned = self._as_logits(outputs) if isinstance(outputs, dict) else None
        if returned is not None:
            found.append((-1, "", returned))
        task, ignore = self.reader.task, self.reader.ignore_index
        for _, name, z in sorted(found, key=lambda item: (_depth(item[1]), -item[0])):
            try:
                layout = read_layout(z, labels, inputs, task, ignore)
                if layout.dense:
                    position_scores(z, labels, layout)
                else:
                    class_labels(labels)
            except (TypeError, ValueError, MonitorSetupError):
                continue
            self.reader.deferred = False
            self.reader.layout = layout if layout.dense else None
            self.reader.sample_shape = self.sample_shape = tuple(z.shape[1:])
            self._module = name
            return z if layout.dense else logits_of(z)
        self.reader.deferred = False
        self._disable(
            "logits",
            "SensitivityMonitor found no logits that meet the labels in the first training "
            "step's module outputs, so it cannot score the training steps.",
        )
        return None

    def _logits(
        self, module: LightningModule, outputs: Any, size: int, labels: Tensor, inputs: Any
    ) -> Tensor | None:
        """The training step's logits: returned in its output, or seen by the forward hook."""
        if self.reader.deferred:
            return self._read_layout(outputs, labels, inputs)
        rows = self.reader.rows(size)  # (B · T, V) logits: the positions folded into the batch
        returned = self._as_logits(outputs) if isinstance(outputs, dict) else None
        if returned is not None and len(returned) == rows:
            return returned
        matching = [(i, name, z) for i, (name, z) in enumerate(self._found) if len(z) == rows]
        if self._module is None:  # the first batch watched every module: keep the outermost
            if not matching:
                known = self.sample_shape
                dims = ["batch", *map(str, known)] if known is not None else ["batch", "classes"]
                shape = f"({', '.join(dims)})"
                self._disable(
                    "logits",
                    f"SensitivityMonitor found no {shape} logits in the training step's forward "
                    "calls, so it cannot score the training set for free; the training curves "
                    "come from the probe (scan_train_set=True scores every sample).",
                )
                return None
            # outermost first; among modules as deep, the last called (the head, not a part)
            _, name, _ = min(matching, key=lambda found: (_depth(found[1]), -found[0]))
            self._module = name
            return next(z for _, n, z in matching if n == name)
        return next((z for _, n, z in matching if n == self._module), None)

    def _disable(self, key: str, message: str) -> None:
        self.active = False
        self._forget()
        self._unhook()
        self.warn(f"train-{key}", message)

    # -- at a decision: every rank calls this together ---------------------------------------

    def collect(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Everything kept since the last call, from every rank, on the CPU: (ids, labels, log
        FI of every label); None where no rank kept anything. A collective: every rank calls
        it."""
        if self._steps:
            ids, labels, logits = (torch.cat(column) for column in zip(*self._steps, strict=True))
            self._rows.update(ids=ids.to(logits.device), labels=labels, logits=logits)
        found = self._rows.gathered()
        self._forget()
        if found is None:
            return None
        return found["ids"], found["labels"], label_log_fi(found["logits"])

    def collect_positions(self) -> PositionRows | None:
        """:meth:`collect` for a model with many positions: every rank's per-sample rows since
        the last call, on the CPU; None where no rank kept any. A collective."""
        try:  # the last steps' positions; a failure leaves this rank out, not the collective
            rows = self._position_steps.rows()
        except Exception as error:
            if self._strict:
                raise
            rows = None
            self._disable(
                "error",
                f"SensitivityMonitor stopped scoring the training steps ({type(error).__name__}: "
                f"{error}); the training curves come from the probe (strict=True raises).",
            )
        if rows is not None:
            self._positions.update(**{name: getattr(rows, name) for name in rows.names()})
        found = self._positions.gathered()
        self._forget()
        return None if found is None else PositionRows(**found)

    def fold_into(self, tracker: SensitivityTracker, here: bool) -> None:
        """:meth:`collect`, and where ``here`` (rank zero) fold it into the tracker's evidence;
        one warning per run where no training step was scored."""
        if self.reader.layout is not None:
            rows = self.collect_positions()
            if rows is None and self.active:
                self._nothing_scored()
            if rows is not None and here:
                tracker.fold_positions(rows)
            return
        found = self.collect()
        if found is None and self.active:
            self._nothing_scored()
        if found is not None and here:
            tracker.fold(*found)

    def _nothing_scored(self) -> None:
        self.warn(
            "train-none",
            "SensitivityMonitor scored no training step since its last decision (no batch "
            "of the training loader reached it with its sample ids); the training curves "
            "come from the probe.",
        )

    def _forget(self) -> None:
        """Drop the rows kept since the last :meth:`collect`."""
        self._steps = []
        self._rows.reset()
        self._position_steps.clear()
        self._positions.reset()
        self.pending = 0

    def _fits(self, num_classes: int) -> bool:
        """Whether the evidence of the whole training set stays under its memory cap."""
        loader = self._ids.loader
        if loader is None:
            return True
        return len(loader.dataset) * num_classes <= MAX_ENTRIES  # type: ignore[arg-type]
