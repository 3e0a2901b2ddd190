"""Which dataset samples a training batch holds, when the batch does not say.

A DataLoader over a map-style dataset delivers its batches in the order its batch sampler deals
the indices, also with workers (which receive the indices in that order and return the batches
in that order). :class:`IndexRecorder` makes the loader's batch sampler remember what it deals,
from the loader's first iterator on (:class:`~lightning_sens.callbacks.internals.LoaderTap`
hands it every training loader before Lightning iterates it), so the batches the workers
prefetch before training starts are known too. The first batch of every epoch is checked against
the dataset's labels: a loader that reorders its batches turns the recording off instead of
mislabelling samples.

A loader over an ``IterableDataset`` has no indices to deal (its sampler deals ``None``); its
samples can only be identified by ids in the batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from lightning_sens.callbacks.rng import preserved_rng

__all__ = ["IndexRecorder", "indexable"]

_QUEUE = "_lightning_sens_indices"


def indexable(loader: object) -> bool:
    """A DataLoader over a dataset that can be indexed and measured (not an IterableDataset):
    the monitor can identify, fetch and probe its samples."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    try:
        len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return False
    return callable(getattr(loader.dataset, "__getitem__", None))


def _recording_iter(self: Any) -> Iterator[Any]:
    queue: deque[np.ndarray] = getattr(self, _QUEUE)
    queue.clear()  # a new iterator: an epoch starts, or the previous one was left unfinished
    for indices in super(type(self), self).__iter__():
        queue.append(np.asarray(indices, dtype=np.int64))  # a list or a tensor; microseconds
        yield indices


class IndexRecorder:
    """The indices the training loaders' batch samplers deal, in delivery order.

    Attributes:
        loader: the last loader recorded (its dataset checks the first batch of each epoch).
    """

    def __init__(self) -> None:
        self.queue: deque[np.ndarray] = deque()
        self.loader: DataLoader | None = None
        self._samplers: list[Any] = []

    @property
    def recording(self) -> bool:
        return self.loader is not None

    def watch(self, loader: object) -> bool:
        """Record ``loader``'s batch sampler from its next iterator on; False where it cannot be
        recorded (not a map-style DataLoader with a batch sampler)."""
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is None or not indexable(loader):
            return False
        if not hasattr(sampler, _QUEUE):
            # A subclass made for this object only: the sampler keeps its state, its class's
            # behaviour and isinstance checks, and gets its own class back in release().
            base = type(sampler)
            recording = type(f"Recording{base.__name__}", (base,), {"__iter__": _recording_iter})
            try:
                setattr(sampler, _QUEUE, self.queue)
                sampler.__class__ = recording
            except (AttributeError, TypeError):  # __slots__, or a class defined in C
                if hasattr(sampler, _QUEUE):
                    delattr(sampler, _QUEUE)
                return False
            self._samplers.append(sampler)
        self.loader = loader  # type: ignore[assignment]
        return True

    def next_batch(self) -> Tensor | None:
        """The indices of the batch the loader delivered next, ``(B,)`` int64 on the CPU; None
        when none was recorded."""
        return torch.from_numpy(self.queue.popleft()) if self.queue else None

    def release(self) -> None:
        """Give every recorded sampler its own class back."""
        for sampler in self._samplers:
            sampler.__class__ = type(sampler).__mro__[1]
            delattr(sampler, _QUEUE)
        self._samplers = []
        self.queue.clear()
        self.loader = None

    def labels_match(
        self, indices: Tensor, labels: Tensor, read: Callable[[Any], tuple[Any, Tensor, Any]]
    ) -> bool:
        """Whether the dataset's labels of ``indices`` are the batch's ``labels`` (the first 32,
        each sample collated alone, so that a collate_fn that reorders cannot hide a
        mismatch)."""
        loader = self.loader
        if loader is None:
            return False
        check = indices[: min(len(indices), 32)].tolist()
        collate = loader.collate_fn or default_collate
        with preserved_rng():  # a dataset's random augmentations must not move training's RNG
            expected = [read(collate([loader.dataset[i]]))[1] for i in check]
        return torch.equal(torch.cat(expected).cpu(), labels[: len(check)].cpu())
