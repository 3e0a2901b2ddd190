"""The positions of consecutive batches, scored together (docs/tasks.md, "What scoring costs,
and every n-th position").

No Lightning here. Scoring a batch's positions takes some hundred small operations whatever its
size; on a model whose step lasts tens of milliseconds that alone is several percent of it. A
batch's step keeps only its positions (every n-th, :func:`~lightning_sens.core.strided.
stride_positions`: one gather); the positions of up to :data:`GROUP_STEPS` consecutive batches
are scored in one call, with one reference of what wrong labels look like made from them all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sens.core.layout import OutputLayout
from lightning_sens.core.strided import Strided, stride_positions
from lightning_sens.reporting.positions import PositionRows, position_rows, strided_rows

__all__ = ["GROUP_ENTRIES", "GROUP_STEPS", "PositionBuffer"]

GROUP_STEPS = 16
"""The most batches whose positions are scored together: a few steps, over which the model
barely changes (the reference of a group is made from all of them)."""

GROUP_ENTRIES = 1 << 22
"""The most logits (positions × classes) kept before they are scored: 16 MiB of float32. A batch
with a quarter of that alone (a language model's vocabulary) is scored where it lies, without
the copy that keeping it would take, with its own reference."""


class PositionBuffer:
    """Batches' positions kept until a group of them is scored (:meth:`add`, :meth:`rows`).

    Args:
        quantile: the upper quantile of a sample's positions' log FI that its row keeps.
    """

    def __init__(self, quantile: float = 0.9) -> None:
        self.quantile = quantile
        self._kept: list[tuple[Tensor, Strided]] = []
        self._entries = 0
        self._rows: list[PositionRows] = []

    def add(
        self,
        ids: Tensor,
        labels: Tensor,
        logits: Tensor,
        layout: OutputLayout,
        mask: Tensor | None,
        stride: int = 1,
        turn: int = 0,
    ) -> None:
        """Keep a batch's positions, every ``stride``-th of each sample from ``(id + turn) mod
        stride`` on; score the group once it is full. Multi-label outputs, and batches with
        :data:`GROUP_ENTRIES` / 4 logits or more, are scored at once."""
        if layout.task == "multilabel":
            self._rows.append(position_rows(ids, labels, logits, layout, mask, self.quantile))
            return
        if logits.numel() // stride >= GROUP_ENTRIES // 4:  # large enough alone: no copy
            self.flush()
            found = position_rows(ids, labels, logits, layout, mask, self.quantile, stride, turn)
            self._rows.append(found)
            return
        offset = ids.detach().to(labels.device).long() + turn
        kept = stride_positions(logits, labels, layout, mask, offset, stride)
        if self._kept and not self._kept[-1][1].joins(kept):
            self.flush()
        self._kept.append((ids.detach(), kept))
        self._entries += kept.logits.numel()
        if len(self._kept) >= GROUP_STEPS or self._entries >= GROUP_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Score the positions kept so far."""
        if not self._kept:
            return
        ids = [i.to(kept.labels.device) for i, kept in self._kept]
        joined = Strided.cat([kept for _, kept in self._kept])
        self._kept, self._entries = [], 0
        self._rows.append(strided_rows(torch.cat(ids), joined, self.quantile))

    def rows(self) -> PositionRows | None:
        """Every row scored since the last call, the kept positions scored first; None where
        there are none."""
        self.flush()
        found, self._rows = self._rows, []
        return PositionRows.cat(found) if found else None

    def clear(self) -> None:
        """Drop everything kept and scored."""
        self._kept, self._entries, self._rows = [], 0, []
