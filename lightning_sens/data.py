"""A dataset wrapper that hands each sample's index to the monitor with the batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithIndex"]


class WithIndex(Dataset):
    """``dataset[i]`` with ``i`` appended: ``(x, y)`` becomes ``(x, y, i)``, and a dict sample
    gains ``"sample_id": i``.

    The monitor reads sample ids from such batches (third element, or ``sample_id``), so it can
    score every training sample in its training step even when the training loader has no batch
    sampler whose order it could record (a custom ``IterableDataset`` over a map-style one, or a
    loader that reorders batches). A ``training_step`` that unpacks ``x, y = batch`` must then
    unpack ``x, y, _ = batch``; with dict samples nothing changes.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, "sample_id": index}
        if isinstance(item, tuple | list):
            return (*item, index)
        raise TypeError(
            f"WithIndex wraps datasets whose samples are tuples or dicts; sample {index} is a "
            f"{type(item).__name__}."
        )
