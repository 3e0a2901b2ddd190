"""Every n-th position of each sample, for scoring a share of a model's many positions
(docs/tasks.md, "What scoring costs, and every n-th position").

Scoring every token or pixel of every training step costs a fixed share of a step whatever the
model's width; on narrow models it is a large one. :func:`stride_positions` keeps every
``stride``-th position of each sample, starting at ``offset mod stride`` (the monitor's offset
is the sample's id plus the epoch), so that ``stride`` consecutive epochs score each position
of a sample once. What it keeps goes to :func:`~lightning_sens.core.outputs.position_scores`
and :func:`~lightning_sens.core.references.label_reference` as a batch with ``m`` positions
per sample and no shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sens.core.layout import OutputLayout, canonical_logits

__all__ = ["Strided", "stride_positions"]


@dataclass(frozen=True)
class Strided:
    """A batch's positions, every ``stride``-th of each sample (:func:`stride_positions`).

    Attributes:
        logits: ``(B, m, K)`` for a softmax (in the class-first memory order of a segmentation
            model's logits where they came so), ``(B, m)`` for one sigmoid per position.
        labels: ``(B, m)``.
        mask: ``(B, m)`` bool, the kept positions that count (valid in the batch, not past the
            sample's last position).
        layout: the layout of the kept positions: ``(m,)`` positions, no shift, not
            flattened.
        index: ``(B, m)`` each kept position's flat index among the sample's positions (after
            a causal language model's shift: position t scores the label at t + 1).
        counted: ``(B,)`` the positions of each sample that count, before striding.
    """

    logits: Tensor
    labels: Tensor
    mask: Tensor
    layout: OutputLayout
    index: Tensor
    counted: Tensor

    @property
    def classes_first(self) -> bool:
        """Whether the kept logits lie classes first in memory (``(B, K, m)`` underneath)."""
        return self.logits.dim() == 3 and self.logits.transpose(1, 2).is_contiguous()

    def joins(self, other: Strided) -> bool:
        """Whether :meth:`cat` can join the two: the same positions, classes and memory order."""
        mine, theirs = self.logits, other.logits
        return (
            self.layout == other.layout
            and mine.shape[1:] == theirs.shape[1:]
            and mine.dtype == theirs.dtype
            and mine.device == theirs.device
            and self.classes_first == other.classes_first
        )

    @staticmethod
    def cat(parts: list[Strided]) -> Strided:
        """The batches as one (each pair :meth:`joins`), classes first where they were."""
        if len(parts) == 1:
            return parts[0]
        if parts[0].classes_first:
            logits = torch.cat([p.logits.transpose(1, 2) for p in parts]).transpose(1, 2)
        else:
            logits = torch.cat([p.logits for p in parts])
        return Strided(
            logits,
            torch.cat([p.labels for p in parts]),
            torch.cat([p.mask for p in parts]),
            parts[0].layout,
            torch.cat([p.index for p in parts]),
            torch.cat([p.counted for p in parts]),
        )


def stride_positions(
    logits: Tensor,
    labels: Tensor,
    layout: OutputLayout,
    mask: Tensor | None,
    offset: Tensor,
    stride: int,
) -> Strided:
    """Every ``stride``-th position of each sample, from ``offset mod stride`` on.

    Args:
        logits: the model's output, as :func:`~lightning_sens.core.layout.read_layout` read
            it (one class or one sigmoid per position, not multi-label).
        labels: the positions' class indices.
        layout: its layout.
        mask: ``(B, *positions)``, nonzero where a position counts, or None.
        offset: ``(B,)`` integers: sample b keeps positions ``offset[b] mod stride`` +
            ``stride · j``.
        stride: at least 1.

    Example:
        >>> from lightning_sens.core.layout import read_layout
        >>> z, y = torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long)
        >>> kept = stride_positions(z, y, read_layout(z, y), None, torch.tensor([0, 3]), 2)
        >>> kept.index, kept.mask
        (tensor([[0, 2, 4],
                [1, 3, 4]]), tensor([[ True,  True,  True],
                [ True,  True, False]]))
    """
    if layout.task == "multilabel" or not layout.dense:
        raise ValueError(
            f"stride_positions keeps positions of a model with one class or one sigmoid per "
            f"position, got a {layout.describe()} layout."
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}.")
    B = labels.shape[0]
    z = canonical_logits(logits.detach(), layout)  # (B, P, K), or (B, P) for sigmoids
    y = labels.detach().to(z.device).reshape(B, -1)
    valid = y != layout.ignore_index[0]  # a comparison per value: isin costs more on a step
    for ignored in layout.ignore_index[1:]:
        valid &= y != ignored
    if mask is not None:
        valid &= mask.to(z.device).reshape(B, -1).bool()
    if layout.shift:
        z, y, valid = z[:, :-1], y[:, 1:], valid[:, 1:]
    P = y.shape[1]
    m = math.ceil(P / stride)
    first = offset.to(device=z.device, dtype=torch.long).remainder(stride)
    index = first.unsqueeze(1) + stride * torch.arange(m, device=z.device)
    inside = index < P
    index = index.clamp(max=P - 1)
    if z.dim() == 2:
        kept = z.gather(1, index)
    elif z.transpose(1, 2).is_contiguous():  # classes first in memory: keep them first
        K = z.shape[-1]
        kept = z.transpose(1, 2).gather(2, index.unsqueeze(1).expand(B, K, m)).transpose(1, 2)
    else:
        kept = z.gather(1, index.unsqueeze(-1).expand(B, m, z.shape[-1]))
    narrowed = OutputLayout(
        layout.task,
        -1 if layout.task == "multiclass" else None,
        (m,),
        ignore_index=layout.ignore_index,
    )
    return Strided(
        kept,
        y.gather(1, index),
        valid.gather(1, index) & inside,
        narrowed,
        index,
        valid.sum(-1),
    )
