"""Outputs with many positions or many sigmoids, scored from the logits alone.

A language model scores every token (logits ``(B, T, V)``, labels ``(B, T)``), a segmentation
model every pixel (``(B, K, H, W)``, ``(B, H, W)``), a multi-label model every class with its own
sigmoid (``(B, K)``, float targets ``(B, K)``). Given the input the positions are independent,
so the metric of the perturbation manifold of a sample's joint likelihood is the sum of its
positions' metrics, and each position has the classifier's closed form: log FI_t =
log((1 − p_t) / p_t), p_t the probability the model gives position t's label
(docs/derivations.md, "Many positions and many sigmoids"). :func:`read_layout` decides from one
batch how the logits meet the labels; :func:`position_scores` scores every position;
:meth:`PositionScores.summary` reduces them per sample; with the references of
:mod:`lightning_sens.core.references`, :meth:`PositionScores.wrong_share` estimates how many of a
sample's labels are wrong (docs/tasks.md, "Flags: which samples' labels look wrong").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_sens.core.layout import OutputLayout, canonical_logits

if TYPE_CHECKING:
    from lightning_sens.core.references import LabelReference

_CHUNK = 2**23  # float64 entries per chunk of (positions × classes): 64 MiB

__all__ = ["PositionScores", "SampleSummary", "position_scores"]


@dataclass(frozen=True)
class SampleSummary:
    """Per sample, its positions' log FI reduced (:meth:`PositionScores.summary`).

    Attributes:
        mean: the mean of log FI over the valid positions ``(B,)``.
        upper: its upper quantile (``quantile`` of :meth:`PositionScores.summary`) ``(B,)``: a
            few wrong pixels of a large mask move it where they leave the mean.
        pred_mean: the mean of log FI with the most probable class ``(B,)``.
        total: log Σ_t FI_t ``(B,)``: the closed form of the sample's joint likelihood, the
            largest FI of any family, reached by one that moves every position's logits
            independently (a multi-label model's output bias does).
        loss: the mean negative log-likelihood of the labels over the valid positions ``(B,)``.
        accuracy: the share of valid positions whose most probable class is the label ``(B,)``.
        count: the valid positions ``(B,)``.
        worst: the flat index of the position with the largest log FI ``(B,)`` (−1: none).

    Samples without a valid position have NaN scores and count 0.
    """

    mean: Tensor
    upper: Tensor
    pred_mean: Tensor
    total: Tensor
    loss: Tensor
    accuracy: Tensor
    count: Tensor
    worst: Tensor


@dataclass(frozen=True)
class PositionScores:
    """Every position's closed form, ``(B, P)`` with P = the product of ``positions``.

    Attributes:
        log_fi: log FI = log((1 − p_t) / p_t) of each position with its label, float64; NaN at
            the positions skipped.
        log_fi_pred: log FI with the most probable class instead of the label (Setup 3 of
            docs/method.md, "The paper's four setups"), float64; NaN where skipped.
        log_p: log p_t, the log-probability of the label, float64; NaN where skipped.
        correct: whether the most probable class is the label (for a sigmoid: whether
            sigmoid(z) > ½ agrees with a target above ½).
        valid: the positions scored (not ignored, not masked).
        positions: the shape of one sample's positions.
        labels: each position's label ``(B, P)`` (a class index; for sigmoids the target).
        predicted: each position's most probable class ``(B, P)`` (for a sigmoid: 1 where
            sigmoid(z) > ½).
    """

    log_fi: Tensor
    log_fi_pred: Tensor
    log_p: Tensor
    correct: Tensor
    valid: Tensor
    positions: tuple[int, ...]
    labels: Tensor
    predicted: Tensor

    def wrong_share(self, reference: LabelReference, other_class: bool = True) -> Tensor:
        """Per sample, the estimated share of its valid positions whose label is wrong ``(B,)``.

        A position looks wrong when its log FI exceeds the median of what a wrong label of its
        class looks like to this model (``reference.wrong``) or, with ``other_class``, when the
        model's most probable class is another class j and the position fits j at least as
        well as half of the positions labelled j do (its log FI under j below
        ``reference.right[j]``). If at most half of the wrong labels escape both tests, twice
        the share of positions that look wrong estimates the share of wrong labels (at most 1),
        as the classification rule estimates a class's count (docs/tasks.md, "Flags: which
        samples' labels look wrong"). NaN for a sample without valid positions.

        Example:
            >>> from lightning_sens.core.layout import read_layout
            >>> from lightning_sens.core.references import label_reference
            >>> z = torch.tensor([[[4.0, 0], [4, 0], [4, 0]], [[0, 4], [0, 4], [5, 0]]]).double()
            >>> y = torch.tensor([[0, 0, 0], [1, 1, 1]])  # the last token's label looks wrong
            >>> scores = position_scores(z, y, read_layout(z, y))
            >>> scores.wrong_share(label_reference(z, y, read_layout(z, y)))  # 2 · 1/3
            tensor([0.0000, 0.6667], dtype=torch.float64)
        """
        device = self.log_fi.device
        if reference.wrong.dim() == 2:  # one sigmoid per output: (P, 2), by rounded target
            outputs = torch.arange(len(reference.wrong), device=device)
            labels = (self.labels > 0.5).long()
            wrong = reference.wrong.to(device)[outputs, labels]
            right = reference.right.to(device)[outputs, self.predicted]
        else:
            last = len(reference.wrong) - 1
            wrong = reference.wrong.to(device)[self.labels.long().clamp(0, last)]  # 0./1. too
            right = reference.right.to(device)[self.predicted.clamp(0, last)]
        looks_wrong = self.log_fi > wrong
        if other_class:
            looks_wrong |= ~self.correct & (self.log_fi_pred < right)
        looks_wrong &= self.valid
        count = self.valid.sum(-1)
        share = (2 * looks_wrong.sum(-1).double() / count.clamp(min=1)).clamp(max=1.0)
        return torch.where(count > 0, share, torch.full_like(share, float("nan")))

    def summary(self, quantile: float = 0.9) -> SampleSummary:
        """Per-sample reductions over the valid positions (:class:`SampleSummary`)."""
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}.")
        count = self.valid.sum(-1)
        empty = count == 0
        mean = torch.nanmean(self.log_fi, dim=-1)
        upper = _row_quantile(self.log_fi, count, quantile)
        total = torch.logsumexp(self.log_fi.nan_to_num(nan=float("-inf")), dim=-1)
        loss = -torch.nanmean(self.log_p, dim=-1)
        right = (self.correct & self.valid).sum(-1).double()
        accuracy = right / count.clamp(min=1)
        worst = self.log_fi.nan_to_num(nan=float("-inf")).argmax(-1)
        nan = torch.full_like(mean, float("nan"))
        return SampleSummary(
            mean=torch.where(empty, nan, mean),
            upper=torch.where(empty, nan, upper),
            pred_mean=torch.where(empty, nan, torch.nanmean(self.log_fi_pred, dim=-1)),
            total=torch.where(empty, nan, total),
            loss=torch.where(empty, nan, loss),
            accuracy=torch.where(empty, nan, accuracy),
            count=count,
            worst=torch.where(empty, torch.full_like(worst, -1), worst),
        )


def _row_quantile(values: Tensor, count: Tensor, q: float) -> Tensor:
    """``torch.nanquantile(values, q, dim=-1)`` (linear interpolation) for rows whose NaNs are
    the positions skipped and ``count`` the others: the two order statistics it needs from one
    ``topk`` of the largest values (NaNs taken as +inf, so first), as short as the upper
    quantile allows (nanquantile and a full sort are several times slower on many short
    rows)."""
    width = values.shape[-1]
    where = q * (count.clamp(min=1) - 1).to(values.dtype)
    low, high = where.floor().long(), where.ceil().long()
    # ascending rank r is descending rank width − 1 − r once the NaNs are +inf
    k = int((width - low).max()) if low.numel() else 1
    ordered = values.nan_to_num(nan=float("inf")).topk(min(max(k, 1), width), dim=-1).values
    below = ordered.gather(-1, (width - 1 - low).unsqueeze(-1)).squeeze(-1)
    above = ordered.gather(-1, (width - 1 - high).unsqueeze(-1)).squeeze(-1)
    weight = where - where.floor()
    return torch.where(weight > 0, below + weight * (above - below), below)


def position_scores(
    logits: Tensor, labels: Tensor, layout: OutputLayout, mask: Tensor | None = None
) -> PositionScores:
    """Score every position of a batch from its logits: no backward pass.

    Args:
        logits: the model's output, as :func:`read_layout` read it.
        labels: class indices of the positions (``"multiclass"``, ``"binary"``) or targets of
            the logits' shape (``"multilabel"``).
        layout: from :func:`read_layout`.
        mask: ``(B, *positions)``, nonzero where a position counts (an ``attention_mask``), or
            None.

    Example:
        >>> from lightning_sens.core.layout import read_layout
        >>> z = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)  # 2 tokens, V = 2
        >>> layout = read_layout(z, torch.tensor([[0, 1]]))
        >>> position_scores(z, torch.tensor([[0, 1]]), layout).log_fi  # −2, log 1
        tensor([[-2.,  0.]], dtype=torch.float64)
    """
    B = labels.shape[0]
    z = canonical_logits(logits.detach(), layout)  # (B, P, K), or (B, P) for sigmoids
    y = labels.detach().to(z.device).reshape(B, -1)
    y = y.long() if y.dtype == torch.bool else y
    valid = torch.ones(y.shape, dtype=torch.bool, device=z.device)
    if mask is not None:
        valid &= mask.to(z.device).reshape(B, -1).bool()
    if layout.task != "multilabel":
        valid &= ~torch.isin(y, torch.tensor(layout.ignore_index, device=y.device, dtype=y.dtype))
    if layout.shift:
        z, y, valid = z[:, :-1], y[:, 1:], valid[:, 1:]
        positions: tuple[int, ...] = (layout.positions[0] - 1,)
    else:
        positions = layout.positions or (1,)
    if layout.task == "multiclass":
        _check_classes(y, valid, z.shape[-1], layout)
        log_fi, log_fi_pred, log_p, correct, predicted = _softmax_scores(z, y, valid)
    else:
        _check_binary(y, valid, layout)
        log_fi, log_fi_pred, log_p, correct = _sigmoid_scores(z, y, valid)
        predicted = (z > 0).long()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=z.device)
    return PositionScores(
        torch.where(valid, log_fi, nan),
        torch.where(valid, log_fi_pred, nan),
        torch.where(valid, log_p, nan),
        correct & valid,
        valid,
        positions,
        y,
        predicted,
    )


def _check_classes(y: Tensor, valid: Tensor, classes: int, layout: OutputLayout) -> None:
    """Raise unless every scored position's label is a class index in [0, K)."""
    if y.is_floating_point():
        raise TypeError(
            f"Labels of a {layout.task} model with {classes} classes must be class indices, got "
            f"dtype {y.dtype}; pass integer labels (labels.long())."
        )
    bad = valid & ((y < 0) | (y >= classes))
    if bool(bad.any()):
        found = y[bad].unique()[:10].tolist()
        raise ValueError(
            f"The labels hold {found} outside [0, {classes}) at positions that are not ignored "
            f"(ignore_index {list(layout.ignore_index)}); pass ignore_index=<the label of the "
            "positions to skip>, or labels that fit the model's classes."
        )


def _check_binary(y: Tensor, valid: Tensor, layout: OutputLayout) -> None:
    """Raise unless every scored target lies in [0, 1] (0/1 for one binary logit)."""
    t = y[valid].double()
    binary = layout.task == "binary"
    bad = ~((t == 0) | (t == 1)) if binary else (t < 0) | (t > 1) | torch.isnan(t)
    if bool(bad.any()):
        found = t[bad].unique()[:10].tolist()
        expected = "0 or 1" if binary else "in [0, 1]"
        raise ValueError(
            f"The targets of a {layout.task} model must be {expected}, got {found} (the first 10 "
            "values shown)."
        )


def _softmax_scores(
    z: Tensor, y: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """log FI with the label and with the most probable class, log p_y, whether the label is
    the most probable class and that class, per position, in chunks (a 50,000-token vocabulary
    never makes one copy of all the logits), four passes over a chunk: in float64 for float64
    logits, else in float32 (the logits' own rounding, about 1e-7 of their size, is larger than
    float32's in the sums), every result in float64. Logits whose classes lie first in memory
    (a segmentation model's ``(B, K, H, W)``) are reduced over that axis where they lie, in
    chunks of samples, without a transposed copy.

    With m = max_k z_k (class r), e_k = exp(z_k − m) and s = Σ_k e_k: FI of the most probable
    class is (s − 1)/1, summed without e_r (no cancellation when the others are tiny; by
    log-sum-exp where they underflow); FI of any other class y is (s − e_y)/e_y, where
    s − e_y ≥ s/2 and log e_y = z_y − m; log p_y = z_y − m − log s.
    """
    B, P, K = z.shape
    labels = y.clamp(0, K - 1) * valid
    # float64 logits in float64; any other in float32, as accurate as the logits themselves
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    columns: list[list[Tensor]] = [[], [], [], [], []]
    first = z.transpose(1, 2)  # (B, K, P)
    if P > 1 and first.is_contiguous():  # classes first in memory: reduce over axis 1
        rows = max(1, _CHUNK // (K * P))
        for start in range(0, B, rows):
            label = labels[start : start + rows].unsqueeze(1)
            found = _chunk_scores(first[start : start + rows], label, 1, work)
            for column, value in zip(columns, found, strict=True):
                column.append(value)
    else:
        flat, labels = z.reshape(-1, K), labels.reshape(-1, 1)
        rows = max(1, _CHUNK // K)
        for start in range(0, len(flat), rows):
            found = _chunk_scores(flat[start : start + rows], labels[start : start + rows], 1, work)
            for column, value in zip(columns, found, strict=True):
                column.append(value)
    log_fi, log_fi_pred, log_p, correct, top = (torch.cat(c).reshape(y.shape) for c in columns)
    return log_fi, log_fi_pred, log_p, correct, top


def _chunk_scores(
    chunk: Tensor, label: Tensor, dim: int, work: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_softmax_scores` of one chunk whose classes lie on ``dim`` (``label`` has size 1
    there); each result without that axis."""
    floor = 1e-290 if work == torch.float64 else 1e-30
    top_logit, top = chunk.max(dim=dim, keepdim=True)  # exact in any dtype
    margin = chunk.gather(dim, label).double() - top_logit.double()  # z_y − m, exact
    e = torch.sub(chunk.to(work), top_logit.to(work)).exp_()  # the one copy, then in place
    e_label = e.gather(dim, label).double()
    others_of_top = e.scatter_(dim, top, 0.0).sum(dim, keepdim=True).double()
    total = others_of_top + 1.0  # e_r = exp(0) = 1 exactly
    log_fi_top = others_of_top.log()
    tiny = (others_of_top < floor).movedim(dim, -1).squeeze(-1)  # the others underflow
    if bool(tiny.any()):  # log-sum-exp them, the classes last
        rest = chunk.movedim(dim, -1)[tiny].double()
        rest.scatter_(-1, top.movedim(dim, -1)[tiny], float("-inf"))
        peak = top_logit.movedim(dim, -1)[tiny].double()
        log_fi_top.movedim(dim, -1)[tiny] = torch.logsumexp(rest, -1, keepdim=True) - peak
    is_top = label == top
    log_fi_label = torch.where(is_top, log_fi_top, (total - e_label).log() - margin)
    log_p = margin - total.log()
    found = (log_fi_label, log_fi_top, log_p, is_top, top)
    return tuple(value.squeeze(dim) for value in found)  # type: ignore[return-value]


def _sigmoid_scores(z: Tensor, y: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One sigmoid per position with target t ∈ [0, 1]: FI = (t − σ)² / (σ (1 − σ)), which is
    (1 − q)/q for q the probability of a 0/1 target, log FI = (1 − 2t) z exactly; with the more
    probable value instead of the target, log FI = −|z|."""
    z = z.to(torch.float64)
    t = torch.where(valid, y.to(torch.float64), torch.zeros((), dtype=torch.float64))
    log_sigma, log_rest = -torch.nn.functional.softplus(-z), -torch.nn.functional.softplus(z)
    hard = (t == 0) | (t == 1)
    soft = 2 * torch.log(torch.abs(t - torch.sigmoid(z))) - log_sigma - log_rest
    log_fi = torch.where(hard, (1 - 2 * t) * z, soft)
    log_p = t * log_sigma + (1 - t) * log_rest
    correct = (z > 0) == (t > 0.5)
    return log_fi, -z.abs(), log_p, correct
