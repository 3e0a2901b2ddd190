"""Reading batches and logits for the monitor: the Trainer's batches, and the samples it fetches
itself from a dataset (the probes, the scan, the first batch of the setup check, pictures)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from lightning_sens.callbacks.position_buffer import PositionBuffer
from lightning_sens.callbacks.setup import MonitorSetupError, class_labels, shape_of
from lightning_sens.core.inputs import Inputs, default_forward, found_logits, logits_of, to_device
from lightning_sens.core.layout import OutputLayout
from lightning_sens.reporting.positions import PositionRows, position_rows
from lightning_sens.reporting.summary import SplitScores, split_scores

__all__ = [
    "ID_KEYS",
    "LABEL_KEYS",
    "Batch",
    "Reader",
    "default_batch_fn",
    "default_ids",
    "first_loader",
    "trainer_loaders",
]

Batch = tuple[Inputs, Tensor, Tensor | None]

# Keys of a dict batch (Hugging Face style) that are not model inputs.
LABEL_KEYS = ("labels", "label")
ID_KEYS = ("sample_id", "idx")


def default_batch_fn(batch: Any) -> Batch:
    """``(inputs, labels)``, ``(inputs, labels, sample_ids)``, or a dict batch.

    Inputs are a tensor or a dict of tensors. A dict batch (Hugging Face style) holds its labels
    under ``"labels"`` or ``"label"`` and optionally sample ids under ``"sample_id"`` or
    ``"idx"``; every other entry is passed to the model as a keyword argument.
    """
    pair = isinstance(batch, list | tuple) and len(batch) in (2, 3)
    if pair and isinstance(batch[0], Tensor | Mapping) and isinstance(batch[1], Tensor):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    if isinstance(batch, Mapping):
        found = [k for k in LABEL_KEYS if isinstance(batch.get(k), Tensor)]
        if found:
            ids = next((batch[k] for k in ID_KEYS if isinstance(batch.get(k), Tensor)), None)
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS + ID_KEYS}
            return inputs, batch[found[0]], ids
        raise MonitorSetupError(
            f"SensitivityMonitor cannot find the labels of a dict batch (keys {sorted(batch)}); "
            f"it reads them from {' or '.join(map(repr, LABEL_KEYS))}. Pass batch_fn=lambda "
            "batch: (inputs, labels, ids_or_None)."
        )
    raise MonitorSetupError(
        f"SensitivityMonitor cannot read a batch of type {type(batch).__name__}; it expects "
        "(inputs, labels), (inputs, labels, sample_ids) or a dict with 'labels'. Pass "
        "batch_fn=lambda batch: (inputs, labels, ids_or_None)."
    )


def _unchanged(batch: Any) -> Any:
    return batch


class Reader:
    """Batches → inputs, labels, ids (:meth:`read`); inputs → logits.

    Labels are one class index per sample, int64 ``(B,)``; a binary classifier's 0/1 labels
    (int, float or bool, ``(B,)`` or ``(B, 1)``) are class 0 and 1 of its two-class model, whose
    logits are ``(0, z)`` for its one logit z (docs/monitor.md, "Supported models"). A model
    with many positions (tokens, pixels, multi-label outputs; ``layout`` set by the set-up
    check) keeps its labels and logits as they are (docs/tasks.md).

    Args:
        batch_fn: batch → (inputs, labels, sample ids or None).
        forward_fn: (module, inputs) → logits, or None for the module's forward.
    """

    def __init__(
        self,
        batch_fn: Callable[[Any], Batch] | None,
        forward_fn: Callable[[nn.Module, Any], Any] | None,
    ) -> None:
        self.batch_fn = batch_fn or default_batch_fn
        self.forward_fn = forward_fn
        # what the Trainer's precision does to a batch before the model sees it (64-true: to
        # float64), for the batches the monitor reads itself; set by the callback's setup
        self.convert: Callable[[Any], Any] = _unchanged
        # the shape of one sample's logits as the model returns them ((K,), (1,) or () for one
        # binary logit), from the first forward: what a validation step's output must match
        self.sample_shape: tuple[int, ...] | None = None
        # how the logits meet the labels where a sample has many positions (set by the set-up
        # check from the first batch); None: one class per sample
        self.layout: OutputLayout | None = None
        self.quantile = 0.9  # the upper quantile of a sample's positions that is kept
        # every n-th position of a sample is scored, from (id + turn) mod n on: n from the
        # monitor's PositionStride, the turn its epoch (docs/tasks.md)
        self.stride, self.turn = 1, 0
        self.task: str = "auto"  # MonitorConfig.task and .ignore_index, for read_layout
        self.ignore_index: int | None = None
        # a module without forward(): the first training step's outputs give the layout
        self.deferred = False
        # forward(inputs, target) takes the labels too (teacher forcing): their names
        self.label_arguments: tuple[str, str] | None = None

    def with_labels(self, inputs: Inputs, labels: Tensor) -> Inputs:
        """The inputs the model is called with: ``{inputs name: inputs, labels name: labels}``
        for a forward that takes the labels too, else the inputs as they are."""
        if self.label_arguments is None or not isinstance(inputs, Tensor):
            return inputs
        first, second = self.label_arguments
        return {first: inputs, second: labels}

    def raw(self, batch: Any) -> Batch:
        """(inputs, labels, ids or None) of a batch as ``batch_fn`` returns them."""
        inputs, labels, ids = self.batch_fn(batch)
        if not isinstance(labels, Tensor):
            raise MonitorSetupError(
                f"batch_fn returned labels of type {type(labels).__name__}; it must return "
                "(inputs, labels, ids_or_None) with the labels a tensor."
            )
        return inputs, labels, ids

    def rows(self, size: int) -> int:
        """The first dimension of the logits of ``size`` samples (their positions folded into
        the batch where the model returns ``(B · T, V)``)."""
        layout = self.layout
        if layout is not None and layout.flattened:
            return size * math.prod(layout.positions)
        return size

    def mask(self, inputs: Inputs, labels: Tensor) -> Tensor | None:
        """The ``attention_mask`` of dict inputs, where it has the labels' shape."""
        found = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if isinstance(found, Tensor) and found.shape == labels.shape:
            return found
        return None

    def position_rows(
        self, ids: Tensor, inputs: Inputs, labels: Tensor, logits: Tensor
    ) -> PositionRows:
        """A batch's positions (every :attr:`stride`-th of each sample) scored and reduced per
        sample (:attr:`layout` set)."""
        assert self.layout is not None, "the set-up check reads the layout first"
        mask = self.mask(inputs, labels)
        layout, quantile = self.layout, self.quantile
        return position_rows(ids, labels, logits, layout, mask, quantile, self.stride, self.turn)

    def keep_positions(
        self, buffer: PositionBuffer, ids: Tensor, inputs: Inputs, labels: Tensor, logits: Tensor
    ) -> None:
        """:meth:`position_rows`, kept in ``buffer`` to be scored with the next batches."""
        assert self.layout is not None, "the set-up check reads the layout first"
        mask = self.mask(inputs, labels)
        buffer.add(ids, labels, logits, self.layout, mask, self.stride, self.turn)

    def read(self, batch: Any, where: str = "a batch") -> Batch:
        """(inputs, labels, ids or None) of a batch: ``batch_fn``, then the labels as one class
        index per sample, int64 ``(B,)`` (0/1 float or bool labels and ``(B, 1)`` labels
        converted). Labels that are not one class per sample raise :class:`MonitorSetupError`
        with the fix (multi-label (B, K) targets, float labels other than 0 and 1), saying
        ``where`` the batch comes from (``"a training batch"``)."""
        raw = self.layout is not None or self.deferred
        inputs, labels, ids = self.raw(batch) if raw else self.batch_fn(batch)
        inputs = self.with_labels(inputs, labels)
        if raw:
            return inputs, labels, ids
        return inputs, class_labels(labels, where), ids

    def forward(self, module: nn.Module, inputs: Inputs) -> Tensor:
        """The model's ``(B, K)`` logits, without gradients (one binary logit z, ``(B,)`` or
        ``(B, 1)``, as ``(0, z)``); a clear error where there are none."""
        with torch.no_grad():
            output = (self.forward_fn or default_forward)(module, inputs)
        if self.layout is not None:
            found = found_logits(output)
            if not isinstance(found, Tensor) or tuple(found.shape[1:]) != self.sample_shape:
                raise MonitorSetupError(
                    f"The module's forward returned {shape_of(found)}, not logits of the shape "
                    f"it returned on the first batch, (batch, {self.sample_shape}). Pass "
                    "SensitivityMonitor(forward_fn=lambda module, x: ...) that returns the logits."
                )
            return found
        logits = logits_of(output)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise MonitorSetupError(
                f"The module's forward returned {shape_of(logits)}, not (B, K) logits (or one "
                "binary logit, (B,) or (B, 1)) or an output with a `logits` attribute. Pass "
                "SensitivityMonitor(forward_fn=lambda module, x: ...) that returns the logits."
            )
        self.sample_shape = tuple(found_logits(output).shape[1:])
        return logits

    def validation_batch(
        self, batch: Any, seen: int, trainer: Any
    ) -> tuple[Inputs, Tensor, Tensor]:
        """(inputs, labels, ids) of a validation batch; ids by position in the dataset where
        the batch carries none (the ``seen`` samples before it on this process)."""
        inputs, labels, ids = self.read(batch, "a validation batch")
        if ids is None:
            where = (trainer.global_rank, trainer.world_size, trainer.val_dataloaders)
            ids = default_ids(seen, len(labels), *where)
        return inputs, labels, ids

    def returned_logits(self, outputs: Any, size: int) -> Tensor | None:
        """The logits a validation step returned, ``(B, K)`` (one binary logit z as ``(0, z)``),
        or None where it returned none. A returned tensor counts when it has the shape of the
        model's own logits (one sample's shape as :meth:`forward` saw it), so that a step
        returning per-sample losses ``(B,)`` is not read as binary logits."""
        found = found_logits(outputs) if outputs is not None else None
        if not isinstance(found, Tensor) or found.dim() == 0 or found.shape[0] != self.rows(size):
            return None
        if self.layout is not None:
            return found if tuple(found.shape[1:]) == self.sample_shape else None
        expected = self.sample_shape
        logits = logits_of(found)
        if expected is not None and tuple(found.shape[1:]) != expected:
            return None
        return logits if logits.dim() == 2 else None

    def logits(self, outputs: Any, module: nn.Module, inputs: Inputs, size: int) -> Tensor:
        """The validation step's logits where it returned them (:meth:`returned_logits`);
        otherwise one more forward."""
        found = self.returned_logits(outputs, size)
        return found if found is not None else self.forward(module, inputs)

    def fetch(
        self, loader: DataLoader, indices: Tensor, device: torch.device
    ) -> tuple[Inputs, Tensor, Tensor]:
        """The samples ``indices`` of the loader's dataset, collated as the loader does."""
        samples = [loader.dataset[i] for i in indices.tolist()]
        batch = self.convert((loader.collate_fn or default_collate)(samples))
        inputs, labels, _ = self.read(batch)
        return to_device(inputs, device), labels.to(device), indices

    def first(self, loader: DataLoader, split: str, device: torch.device) -> tuple[Inputs, Tensor]:
        """The first batch, its samples fetched from the dataset (no workers started), or the
        loader's first batch where the dataset cannot be indexed; its labels as ``batch_fn``
        returns them (the set-up check reads them against the logits)."""
        dataset = loader.dataset
        try:
            size = min(loader.batch_size or 2, len(dataset))  # type: ignore[arg-type]
            samples = [dataset[i] for i in range(size)]
            batch = (loader.collate_fn or default_collate)(samples)
        except (TypeError, NotImplementedError, AttributeError):
            batch = next(iter(loader))
        try:
            inputs, labels, _ = self.raw(self.convert(batch))
        except MonitorSetupError:
            raise
        except Exception as error:
            raise MonitorSetupError(
                f"SensitivityMonitor cannot read the first {split} batch with batch_fn: "
                f"{type(error).__name__}: {error}"
            ) from error
        return to_device(inputs, device), labels.to(device)

    def scan(
        self, loader: DataLoader, module: nn.Module, device: torch.device, quiet: bool
    ) -> SplitScores:
        """Closed-form FI of every sample of the loader's dataset, in dataset order, one eval
        forward pass per batch (Setup 1 on the whole training set: docs/method.md, "The paper's
        four setups")."""
        ordered = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or 256,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        parts, seen = [], 0
        for batch in tqdm(
            ordered, desc="sensitivity: scanning the training set", leave=False, disable=quiet
        ):
            inputs, labels, ids = self.read(self.convert(batch), "a training batch")
            if ids is None:
                ids = torch.arange(seen, seen + len(labels))
            seen += len(labels)
            inputs = to_device(inputs, device)
            parts.append(split_scores(ids, labels, self.forward(module, inputs)))
        return SplitScores.cat(parts)


def default_ids(seen: int, size: int, rank: int, world_size: int, loader: Any) -> Tensor:
    """Dataset indices of an unshuffled validation loader's next ``size`` samples after ``seen``
    on this process, also under DistributedSampler, which deals indices round-robin and pads by
    wrapping around to the start."""
    position = torch.arange(seen, seen + size)
    if world_size == 1:
        return position
    loader = loader[0] if isinstance(loader, list | tuple) else loader
    total = len(loader.dataset)
    return (rank + world_size * position) % total


def first_loader(held: Any) -> DataLoader | None:
    """The first DataLoader of what a Trainer holds (a loader, or a list of them)."""
    loader = held[0] if isinstance(held, list | tuple) and held else held
    return loader if isinstance(loader, DataLoader) else None


def trainer_loaders(trainer: Any, train: DataLoader | None = None) -> dict[str, DataLoader]:
    """The Trainer's first training and validation loader (``train`` where it has no training
    loader: ``trainer.validate``)."""
    running = first_loader(trainer.train_dataloader)  # no `or`: a stream's loader has no len
    found = {
        "train": running if running is not None else first_loader(train),
        "val": first_loader(trainer.val_dataloaders),
    }
    return {split: loader for split, loader in found.items() if loader is not None}
