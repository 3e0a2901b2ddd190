"""What wrong and right labels look like to a model, per class, from one batch's logits: the
references of the flags for labels with many positions (docs/tasks.md, "Flags: which samples'
labels look wrong"). :meth:`~lightning_sens.core.outputs.PositionScores.wrong_share` compares
each position with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_sens.core.layout import OutputLayout, canonical_logits

REFERENCE_POSITIONS = 8192
"""The most positions of a batch that :func:`label_reference` scores under every label (evenly
spaced over the batch's valid positions)."""

MAX_FLAG_CLASSES = 1024
"""The most classes for which :func:`label_reference` is computed: beyond it (a language
model's vocabulary) a wrong label is not a question of which class, and no reference is made."""

_SELECT_COLUMNS = 64  # up to this many classes, a median is a selection per class, not a sort

__all__ = [
    "MAX_FLAG_CLASSES",
    "REFERENCE_POSITIONS",
    "FlagKind",
    "LabelReference",
    "flag_kind",
    "label_reference",
]

FlagKind = Literal["labels", "documents", "ranking"]
"""What the flags of a model with many positions find (:func:`flag_kind`)."""


def flag_kind(layout: OutputLayout, classes: int) -> FlagKind:
    """What a model's flags find, from its layout and number of classes: ``"labels"`` (samples
    whose labels look wrong, :func:`label_reference`) up to :data:`MAX_FLAG_CLASSES` classes;
    ``"documents"`` (samples the model finds unlike the rest, by their loss) beyond, where
    the classes are a language model's vocabulary; ``"ranking"`` for one sigmoid per class
    (multi-label): every sample's estimated share of wrong labels is written, but nothing is
    flagged, as the rule is not yet quiet on clean multi-label data (docs/tasks.md, "Flags:
    which samples' labels look wrong").

    Example:
        >>> from lightning_sens.core.layout import OutputLayout
        >>> flag_kind(OutputLayout("multiclass", -1, (32,)), 50_000)
        'documents'
    """
    if layout.task == "multilabel":
        return "ranking"
    if layout.task == "binary":
        return "labels"
    return "labels" if classes <= MAX_FLAG_CLASSES else "documents"


@dataclass(frozen=True)
class LabelReference:
    """What wrong and right labels look like to a model, per class (:func:`label_reference`).

    Attributes:
        wrong: ``(K,)`` the median log FI under label k of the positions labelled otherwise
            (+inf where there are none: then no position of class k looks wrong by it). One
            sigmoid per output (multi-label): ``(P, 2)``, per output p and label value v, the
            median log FI under v of the samples whose target at p is the other value.
        right: ``(K,)`` the median log FI of the positions labelled k under their label (−inf
            where there are none); ``(P, 2)`` for one sigmoid per output.
    """

    wrong: Tensor
    right: Tensor


def label_reference(
    logits: Tensor, labels: Tensor, layout: OutputLayout, mask: Tensor | None = None
) -> LabelReference | None:
    """What wrong and right labels look like to the model, per class, from one batch: the
    median log FI under label k of the valid positions labelled otherwise (what a position
    would score were its label wrongly k: the classification rule's reference, docs/flags.md,
    taken per position) and of those labelled k. Up to :data:`REFERENCE_POSITIONS` positions,
    evenly spaced, are scored under every class. One sigmoid per position (``"binary"``) is the
    two-class softmax of logits (0, z). One sigmoid per output of a sample (``"multilabel"``):
    every output is its own two-class question, with its references per label value from the
    batch's samples (their targets rounded to 0 or 1). None where it is not made: more than
    :data:`MAX_FLAG_CLASSES` classes.

    Example:
        >>> from lightning_sens.core.layout import read_layout
        >>> z = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
        >>> y = torch.tensor([[0, 1]])
        >>> reference = label_reference(z, y, read_layout(z, y))
        >>> reference.wrong.round(decimals=6), reference.right.round(decimals=6)
        (tensor([4., 4.], dtype=torch.float64), tensor([-4., -4.], dtype=torch.float64))
    """
    from lightning_sens.label_noise import label_log_fi

    if layout.task == "multilabel":
        return _output_reference(logits, labels, layout, mask)
    B = labels.shape[0]
    z = canonical_logits(logits.detach(), layout)
    if layout.task == "binary":
        z = torch.stack([torch.zeros_like(z), z], dim=-1)
    if z.shape[-1] > MAX_FLAG_CLASSES:
        return None
    y = labels.detach().to(z.device).reshape(B, -1).long()
    valid = ~torch.isin(y, torch.tensor(layout.ignore_index, device=y.device, dtype=y.dtype))
    if mask is not None:
        valid &= mask.to(z.device).reshape(B, -1).bool()
    if layout.shift:
        z, y, valid = z[:, :-1], y[:, 1:], valid[:, 1:]
    rows = torch.nonzero(valid.flatten()).flatten()
    if len(rows) > REFERENCE_POSITIONS:
        rows = rows[torch.linspace(0, len(rows) - 1, REFERENCE_POSITIONS).long().to(rows.device)]
    classes, width = z.shape[-1], z.shape[1]
    scores = label_log_fi(z[rows // width, rows % width])  # (R, K) float64, no copy of z
    kept = y.flatten()[rows]
    own = kept.unsqueeze(-1) == torch.arange(classes, device=kept.device)
    return LabelReference(
        _column_medians(scores, ~own, float("inf")), _column_medians(scores, own, float("-inf"))
    )


def _output_reference(
    logits: Tensor, labels: Tensor, layout: OutputLayout, mask: Tensor | None
) -> LabelReference:
    """One sigmoid per output p: log FI under label 1 is −z and under label 0 is z (exactly,
    docs/derivations.md), so the references of output p are medians of ±z over the batch's
    samples, by their rounded target, ``(P, 2)``."""
    z = canonical_logits(logits.detach(), layout).double()  # (B, P)
    one = labels.detach().to(z.device).reshape(z.shape).double() > 0.5
    valid = torch.ones_like(one) if mask is None else mask.to(z.device).reshape(z.shape).bool()
    wrong, right = [], []
    for value, under in ((False, z), (True, -z)):  # log FI of every output under 0, under 1
        own = one == value
        wrong.append(_column_medians(under, valid & ~own, float("inf")))
        right.append(_column_medians(under, valid & own, float("-inf")))
    return LabelReference(torch.stack(wrong, -1), torch.stack(right, -1))


def _column_medians(values: Tensor, keep: Tensor, empty: float) -> Tensor:
    """The lower median of each column's kept entries; ``empty`` for a column without any.
    A selection per column where there are few columns (three times faster than a sort),
    one sort of the rows of the transpose where there are many."""
    masked = values.masked_fill(~keep, float("inf")).t().contiguous()
    count = keep.sum(0)
    middle = (count - 1).clamp(min=0) // 2
    if len(masked) <= _SELECT_COLUMNS:
        median = torch.stack(
            [
                row.kthvalue(int(m) + 1).values
                for row, m in zip(masked, middle.tolist(), strict=True)
            ]
        )
    else:
        median = masked.sort(dim=-1).values.gather(-1, middle.unsqueeze(-1)).squeeze(-1)
    return torch.where(count > 0, median, torch.full_like(median, empty))
