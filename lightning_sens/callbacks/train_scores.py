"""Training-set scores for free: log FI of every label from the logits of the training step.

No extra pass: a forward hook keeps the logits of the training step's forward (the module itself,
or the submodule whose output is the logits), and the sample ids come from the batch
(``(x, y, ids)`` or a dict with ``sample_id``/``idx``) or from the order in which the training
loader's batch sampler dealt the indices (a DataLoader delivers batches in that order, also with
workers; the first batch of every epoch is checked against the dataset's labels). The logits are
train-mode logits (dropout on, augmented inputs), as AUM uses them.

Each rank keeps its own shard on its device, in a torchmetrics ``Metric``
(:class:`~lightning_sens.tracking.Samples`); :meth:`TrainScores.collect` gathers them (uneven
shards allowed) when the monitor folds them into the evidence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from lightning_sens.callbacks.rng import preserved_rng
from lightning_sens.callbacks.setup import MonitorSetupError
from lightning_sens.core.inputs import logits_of
from lightning_sens.label_noise import MAX_ENTRIES, label_log_fi
from lightning_sens.tracking import Samples, SensitivityTracker

__all__ = ["TrainScores"]

Batch = tuple[Any, Tensor, Tensor | None]
_QUEUE = "_lightning_sens_batches"


def _recording_iter(self: Any) -> Iterator[Any]:
    queue: deque[list[int] | None] = getattr(self, _QUEUE)
    queue.clear()  # a new iterator: an epoch starts (or the previous one was abandoned)
    for indices in super(type(self), self).__iter__():
        queue.append([int(i) for i in indices])
        yield indices


def _record(loader: DataLoader) -> deque[list[int] | None] | None:
    """Make the loader's batch sampler remember the indices it deals (None: it has none)."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None:
        return None
    queue = getattr(sampler, _QUEUE, None)
    if queue is None:
        queue = deque()
        base = type(sampler)
        setattr(sampler, _QUEUE, queue)
        recording = type(f"Recording{base.__name__}", (base,), {"__iter__": _recording_iter})
        sampler.__class__ = recording
    return queue


def _unrecord(loader: DataLoader) -> None:
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is not None and hasattr(sampler, _QUEUE):
        sampler.__class__ = type(sampler).__mro__[1]
        delattr(sampler, _QUEUE)


class TrainScores:
    """Collects (ids, labels, log FI of every label) of the training batches on each rank.

    Args:
        batch_fn: batch → (inputs, labels, ids or None).
        warn: one-time warnings (key, message).
    """

    def __init__(self, batch_fn: Callable[[Any], Batch], warn: Callable[[str, str], None]):
        self.batch_fn = batch_fn
        self.warn = warn
        self.active = False
        self.started = False
        self._rows = Samples({"ids": torch.long, "labels": torch.long, "logits": torch.float64})
        self._hooks: list[Any] = []
        self._found: list[tuple[str, Tensor]] = []
        self._module: str | None = ""  # "" is the LightningModule itself; None: not found
        self._queue: deque[list[int] | None] | None = None
        self._loader: DataLoader | None = None
        self._check_labels = True
        self._searching = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, trainer: Trainer, module: LightningModule) -> None:
        self.active = self.started = True
        self._rows.to(module.device)
        self._watch({"": module})
        loader = trainer.train_dataloader
        loader = loader[0] if isinstance(loader, list | tuple) and loader else loader
        if isinstance(loader, DataLoader):
            self._loader = loader
            self._queue = _record(loader)
            if self._queue is not None:
                self._record_running(trainer, self._queue)

    @staticmethod
    def _record_running(trainer: Trainer, queue: deque[list[int] | None]) -> None:
        """The fit loop made this epoch's iterator before any callback ran, and may have drawn
        batches from the sampler already: record the rest of the epoch as it is dealt, with a
        gap for the batches drawn so far (their ids are unknown, they go unscored). Nothing is
        drawn again, so the training order and its random stream stay as they are."""
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        loader = getattr(fetcher, "iterator", None)  # the CombinedLoader
        combined = getattr(getattr(loader, "_iterator", None), "iterators", None)
        running = combined[0] if isinstance(combined, list) and combined else None
        sampler_iter = getattr(running, "_sampler_iter", None)
        if sampler_iter is None:
            return
        drawn = getattr(running, "_send_idx", getattr(running, "_num_yielded", 0))

        def recording() -> Iterator[Any]:
            for indices in sampler_iter:
                queue.append([int(i) for i in indices])
                yield indices

        queue.clear()
        queue.extend([None] * int(drawn))
        running._sampler_iter = recording()  # type: ignore[union-attr]

    def stop(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._loader is not None:
            _unrecord(self._loader)
        self._loader = self._queue = None
        self._rows.reset()
        self.active = self.started = False

    def on_epoch_start(self) -> None:
        self._check_labels = True

    def _watch(self, modules: dict[str, nn.Module]) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]
        self._searching = len(modules) > 1

    def _hook(self, name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            found = logits_of(output)
            if isinstance(found, Tensor) and found.dim() == 2:
                self._found.append((name, found.detach()))

        return keep

    # -- one training batch ------------------------------------------------------------------

    def on_batch_start(self) -> None:
        self._found = []

    def score(
        self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any, strict: bool
    ) -> None:
        """Keep the logits of a training step (:meth:`on_batch_end`); on an error, stop scoring
        the training steps with a warning (``strict``: raise)."""
        if not self.active:
            return
        try:
            self.on_batch_end(trainer, module, outputs, batch)
        except Exception as error:
            if strict or isinstance(error, MonitorSetupError):
                raise
            self.active = False
            self.warn(
                "train-error",
                f"SensitivityMonitor stopped scoring the training steps ({type(error).__name__}: "
                f"{error}); the training curves come from the probe (strict=True raises).",
            )

    def on_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any
    ) -> None:
        recorded = self._queue.popleft() if self._queue else None
        if not self.active:
            return
        _, labels, ids = self.batch_fn(batch)
        if ids is None and recorded is None and self._queue is not None:
            return  # drawn before the monitor could record it
        size = len(labels)
        if ids is None and recorded is not None:
            if len(recorded) != size:
                return self._disable(
                    "ids",
                    f"the training loader's sampler dealt {len(recorded)} indices for a batch of "
                    f"{size} samples",
                )
            ids = torch.tensor(recorded)
            if self._check_labels and not self._labels_match(recorded, labels):
                return self._disable(
                    "ids",
                    "the labels of the indices the training sampler dealt differ from the "
                    "batch's labels (a loader that reorders batches?)",
                )
        self._check_labels = False
        if ids is None:
            return self._disable(
                "ids",
                "the training batches carry no sample ids and the loader has no batch sampler "
                "(wrap the dataset in lightning_sens.WithIndex to hand them over with the batch)",
            )
        logits = self._logits(module, outputs, size)
        if logits is None:
            return
        if self._rows.update_count == 0 and not self._fits(logits.shape[-1]):
            return self._disable(
                "memory",
                f"the training set × {logits.shape[-1]} classes exceeds the {MAX_ENTRIES:,} "
                "scores the evidence keeps",
            )
        # the scores are computed at collect(), for the whole epoch in one call: a few small
        # kernels per step cost more than the scores themselves on small models
        self._rows.update(ids=ids.to(logits.device), labels=labels, logits=logits)

    def _labels_match(self, indices: list[int], labels: Tensor) -> bool:
        loader = self._loader
        if loader is None:
            return False
        check = indices[: min(len(indices), 32)]
        collate = loader.collate_fn or default_collate
        with preserved_rng():  # a dataset's random augmentations must not move training's RNG
            # one sample at a time: a collate_fn that reorders a batch must not hide a mismatch
            expected = [self.batch_fn(collate([loader.dataset[i]]))[1] for i in check]
        return torch.equal(torch.cat(expected).cpu(), labels[: len(check)].cpu())

    def _logits(self, module: LightningModule, outputs: Any, size: int) -> Tensor | None:
        """The training step's logits: returned in its output, or seen by the forward hook."""
        returned = logits_of(outputs) if isinstance(outputs, dict) else None
        if isinstance(returned, Tensor) and returned.dim() == 2 and returned.shape[0] == size:
            return returned.detach()
        matching = [(name, z) for name, z in self._found if z.shape[0] == size > 0]
        if self._searching:  # this batch watched every submodule: keep the outermost
            if not matching:
                self._module = None
                self.warn(
                    "train-logits",
                    "SensitivityMonitor found no (batch, classes) logits in the training step's "
                    "forward calls, so it cannot score the training set for free; the training "
                    "curves come from the probe (scan_train_set=True scores every sample).",
                )
                self.active = False
                self._watch({})
                return None
            name = min(matching, key=lambda found: found[0].count(".") + (found[0] != ""))[0]
            self._module = name
            self._watch({name: module.get_submodule(name)})
            return next(z for n, z in matching if n == name)
        if not matching:
            if self._module == "":  # the step calls a submodule: find it on the next batch
                self._watch(dict(module.named_modules()))
            return None
        return matching[0][1]

    def _disable(self, key: str, reason: str) -> None:
        self.active = False
        self._rows.reset()
        self.warn(
            f"train-{key}",
            f"SensitivityMonitor does not score the training set from the training steps: "
            f"{reason}. The training curves come from the probe; scan_train_set=True scores "
            "every training sample with an extra pass.",
        )

    # -- epoch end: every rank calls this together -------------------------------------------

    def collect(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Everything kept since the last call, from every rank, on the CPU: (ids, labels, log
        FI of every label); None where no rank kept anything. A collective: every rank calls
        it."""
        found = self._rows.gathered()
        self._rows.reset()
        if found is None:
            return None
        return found["ids"], found["labels"], label_log_fi(found["logits"])

    def fold_into(self, tracker: SensitivityTracker, here: bool) -> None:
        """:meth:`collect`, and where ``here`` (rank zero) fold it into the tracker's evidence;
        one warning per run where no training step was scored."""
        found = self.collect()
        if found is None and self.active:
            self.warn(
                "train-none",
                "SensitivityMonitor scored no training step since the last validation (no "
                "batch of the training loader reached it with its sample ids); the training "
                "curves come from the probe.",
            )
        if found is not None and here:
            tracker.fold(*found)

    def _fits(self, num_classes: int) -> bool:
        """Whether the evidence of the whole training set stays under its memory cap."""
        try:
            size = len(self._loader.dataset)  # type: ignore[union-attr, arg-type]
        except TypeError:
            return True
        return size * num_classes <= MAX_ENTRIES
