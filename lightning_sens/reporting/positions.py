"""Per-sample scores of outputs with many positions (tokens, pixels, multi-label outputs), and
what the monitor logs of them (no Lightning here; docs/tasks.md).

A sample's row reduces its positions' closed forms (:mod:`lightning_sens.core.outputs`): the
mean of log FI with the label over its valid positions, its upper quantile, the bound
log Σ_t FI_t, the mean with the most probable class, its loss and accuracy, and the position
with the largest log FI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sens.core.layout import OutputLayout
from lightning_sens.core.outputs import position_scores
from lightning_sens.core.references import label_reference
from lightning_sens.core.strided import Strided, stride_positions
from lightning_sens.core.trace import TraceResult
from lightning_sens.damage import LayerDamage
from lightning_sens.flagging import robust_z
from lightning_sens.reporting import keys
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.tables import LayerRow

__all__ = [
    "MIN_DOCUMENTS",
    "POSITION_COLUMNS",
    "STRETCH",
    "PositionRows",
    "TracedDamage",
    "chosen_share",
    "decides",
    "document_deviation",
    "position_columns",
    "position_metrics",
    "position_rows",
    "strided_rows",
    "traced_layers",
]


@dataclass(frozen=True)
class PositionRows:
    """One split's samples, each with its positions' closed forms reduced, on the CPU.

    Attributes:
        ids: sample ids ``(N,)``.
        positions: the valid positions of each sample ``(N,)``.
        scored: how many of them were scored (fewer where every n-th position is scored:
            :func:`position_rows`' ``stride``) ``(N,)``; the columns below are over those.
        loss: the mean negative log-likelihood of the labels over them ``(N,)``.
        accuracy: the share of them whose most probable class is the label ``(N,)``.
        log_fi_mean: the mean of log FI with the label over them ``(N,)``.
        log_fi_upper: its upper quantile (``position_quantile``) ``(N,)``.
        log_fi_total: log Σ_t FI_t, the largest FI of the sample's joint likelihood ``(N,)``.
        log_fi_pred_mean: the mean of log FI with the most probable class ``(N,)``.
        worst: the flat index of the position with the largest log FI ``(N,)``.
        wrong_share: the estimated share of its positions whose label is wrong, by both
            tests (:meth:`~lightning_sens.core.outputs.PositionScores.wrong_share`) ``(N,)``;
            NaN where no reference is made (one sigmoid per class, a vocabulary above
            :data:`~lightning_sens.core.references.MAX_FLAG_CLASSES`).
        wrong_share_label: the same by the first test alone (the label scores like a wrong
            label), for data where the second does not decide ``(N,)``.
    """

    ids: Tensor
    positions: Tensor
    scored: Tensor
    loss: Tensor
    accuracy: Tensor
    log_fi_mean: Tensor
    log_fi_upper: Tensor
    log_fi_total: Tensor
    log_fi_pred_mean: Tensor
    worst: Tensor
    wrong_share: Tensor
    wrong_share_label: Tensor

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(PositionRows))

    @staticmethod
    def dtypes() -> dict[str, torch.dtype]:
        whole = ("ids", "positions", "scored", "worst")
        return {f: torch.int64 if f in whole else torch.float64 for f in PositionRows.names()}

    @staticmethod
    def cat(parts: list[PositionRows]) -> PositionRows:
        names = PositionRows.names()
        return PositionRows(*(torch.cat([getattr(p, f) for p in parts]) for f in names))

    def map(self, fn: Callable[[Tensor], Tensor]) -> PositionRows:
        return PositionRows(*(fn(getattr(self, f)) for f in self.names()))

    def unique(self) -> PositionRows:
        """One row per id (the first), sorted by id: undoes DistributedSampler's padding."""
        keep = self.unique_index()
        return self.map(lambda t: t[keep])

    def unique_index(self) -> Tensor:
        """The rows :meth:`unique` keeps, in its order."""
        order = torch.argsort(self.ids, stable=True)
        ids = self.ids[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        return order[first]


def position_rows(
    ids: Tensor,
    labels: Tensor,
    logits: Tensor,
    layout: OutputLayout,
    mask: Tensor | None = None,
    quantile: float = 0.9,
    stride: int = 1,
    turn: int = 0,
) -> PositionRows:
    """Score a batch's positions from its logits (closed forms, no backward pass) and reduce
    them per sample, on the logits' device.

    With ``stride`` > 1 (one class or one sigmoid per position), every ``stride``-th position
    of each sample is scored, from ``(id + turn) mod stride`` on
    (:func:`~lightning_sens.core.strided.stride_positions`, then :func:`strided_rows`)."""
    if stride == 1 or layout.task == "multilabel":
        return _rows(ids, logits, labels, layout, mask, quantile, None)
    offset = ids.detach().to(labels.device).long() + turn
    return strided_rows(
        ids, stride_positions(logits, labels, layout, mask, offset, stride), quantile
    )


def strided_rows(ids: Tensor, kept: Strided, quantile: float = 0.9) -> PositionRows:
    """:func:`position_rows` of the positions ``kept`` (of one batch, or of several joined:
    their reference is then made from all of them): the means and the quantile are those of
    the positions kept, the bound log Σ_t FI_t is scaled to all the sample's positions (the sum
    over those kept × counted / kept), ``worst`` indexes all of them, and ``positions`` counts
    all of them, ``scored`` those kept."""
    return _rows(ids, kept.logits, kept.labels, kept.layout, kept.mask, quantile, kept)


def _rows(
    ids: Tensor,
    logits: Tensor,
    labels: Tensor,
    layout: OutputLayout,
    mask: Tensor | None,
    quantile: float,
    kept: Strided | None,
) -> PositionRows:
    scores = position_scores(logits, labels, layout, mask)
    summary = scores.summary(quantile)
    reference = label_reference(logits, labels, layout, mask)
    nan = torch.full_like(summary.mean, float("nan"))
    counted, total, worst = summary.count, summary.total, summary.worst
    if kept is not None:
        counted = kept.counted.to(counted.device)
        total = total + (counted.double() / summary.count.clamp(min=1)).log()
        found = kept.index.to(worst.device).gather(1, worst.clamp(min=0).unsqueeze(1))
        worst = torch.where(worst >= 0, found.squeeze(1), worst)
    return PositionRows(
        ids.detach().to(summary.count.device).long(),
        counted,
        summary.count,
        summary.loss,
        summary.accuracy,
        summary.mean,
        summary.upper,
        total,
        summary.pred_mean,
        worst,
        nan if reference is None else scores.wrong_share(reference),
        nan if reference is None else scores.wrong_share(reference, other_class=False),
    )


def position_metrics(rows: dict[str, PositionRows]) -> dict[str, float]:
    """Per split: loss and accuracy over every valid position, statistics over the samples of
    their mean log FI with the label and with the most probable class, and of the upper
    quantile; the train − validation gap of the median of the latter means (the same keys as a
    classifier's, docs/monitor.md, "Output")."""
    metrics: dict[str, float] = {}
    for split, r in rows.items():
        weight = r.positions.double()
        counted = weight.sum()
        if counted > 0:
            metrics[keys.loss(split)] = float((r.loss.nan_to_num() * weight).sum() / counted)
            metrics[keys.accuracy(split)] = float(
                (r.accuracy.nan_to_num() * weight).sum() / counted
            )
        for target, log_fi in (("true", r.log_fi_mean), ("pred", r.log_fi_pred_mean)):
            summary = log_fi_summary(log_fi)
            metrics.update({keys.curve(target, split, stat): v for stat, v in summary.items()})
        upper = log_fi_summary(r.log_fi_upper)
        metrics.update({keys.upper_curve(split, stat): v for stat, v in upper.items()})
    if "train" in rows and "val" in rows:
        median = [metrics[keys.curve("pred", split, "median")] for split in ("train", "val")]
        metrics[keys.gap()] = median[0] - median[1]
    return metrics


def chosen_share(rows: PositionRows, cut: float) -> Tensor | None:
    """The estimates a decision uses: both tests' where they decide, else the first test's
    where it decides, else None (docs/tasks.md, "Flags: which samples' labels look wrong")."""
    for share in (rows.wrong_share, rows.wrong_share_label):
        if decides(share, cut):
            return share
    return None


def decides(share: Tensor, cut: float) -> bool:
    """Whether the flag rule decides a split from its samples' estimated shares of wrong
    labels: some sample has an estimate, and fewer than half of them reach ``cut``. Half or
    more looking wrong is what the untrained network's first steps give (or a model that does
    not fit its labels); the premise that most labels are right does not hold there, so such a
    decision flags nothing and adds nothing to the evidence."""
    known = share[torch.isfinite(share)]
    return known.numel() > 0 and 2 * int((known >= cut).sum()) < known.numel()


STRETCH = 128
"""The training documents around each one (half before, half after, in the order of the steps)
whose median it is compared with in the documents' rule (:func:`document_deviation`): a few
steps, over which the model barely changes."""


def document_deviation(loss: Tensor, stretch: int | None = None) -> Tensor:
    """How far each document's loss lies above the others', in robust standard deviations:
    (loss − median) / (1.4826 · MAD), the modified z-score of the ``"mad"`` flag rule
    (:func:`~lightning_sens.flagging.robust_z`; medians of an even count are the lower middle
    value, as torch's). A document's loss is the mean over its positions of
    log(1 + FI_t) = −log p_t, the log of its perplexity.

    With ``stretch`` (the training split, rows in the order of the steps), each loss is first
    compared with the median of the ``stretch`` documents around it (half before, half after:
    the same few steps, so nearly the same model), and the MAD pools these differences: the
    model learns during an epoch, and a document of its first steps is not unlike the rest
    because the network was younger. NaN losses (no valid position) stay NaN; where fewer than
    :data:`MIN_DOCUMENTS` documents have a loss, every deviation is NaN (too few to say what
    the rest look like).

    Example:
        >>> loss = torch.tensor([2.0, 2.1, 1.9, 2.0, 6.0] * 4, dtype=torch.float64)
        >>> document_deviation(loss)[:5]
        tensor([ 0.0000,  0.6745, -0.6745,  0.0000, 26.9796], dtype=torch.float64)
    """
    x = loss.detach().to(torch.float64, copy=True)
    known = torch.isfinite(x)
    if int(known.sum()) < MIN_DOCUMENTS:
        return torch.full_like(x, float("nan"))
    if stretch is not None:
        x = x - _moving_median(x, stretch)
    z = robust_z(x)
    return torch.where(known, z, torch.full_like(z, float("nan")))


def _moving_median(x: Tensor, width: int, chunk: int = 1 << 16) -> Tensor:
    """The median of the finite values among the ``width`` values around each one (``width
    // 2`` before, the rest after, fewer at the ends)."""
    before = width // 2
    padded = torch.nn.functional.pad(x, (before, width - 1 - before), value=float("nan"))
    windows = padded.unfold(0, width, 1)  # (N, width), a view
    return torch.cat([part.nanmedian(dim=1).values for part in windows.split(chunk)])


MIN_DOCUMENTS = 20
"""The fewest documents with a loss from which :func:`document_deviation` says anything."""


POSITION_COLUMNS = (
    "sample",
    "split",
    "epoch",
    "step",
    *PositionRows.names()[1:],
    "deviation",
    "evidence",
    "flagged",
    "flagged_recent",
)
"""The columns of the positions table (one row per scored sample and decision)."""


def position_columns(split: str, at: tuple[int, int], rows: PositionRows) -> dict[str, list[Any]]:
    """The positions table of one split and decision ``at`` = (epoch, step), column by
    column."""
    n = len(rows.ids)
    columns: dict[str, list[Any]] = {
        "sample": rows.ids.tolist(),
        "split": [split] * n,
        "epoch": [at[0]] * n,
        "step": [at[1]] * n,
    }
    columns.update({name: getattr(rows, name).tolist() for name in PositionRows.names()[1:]})
    return columns


@dataclass(frozen=True)
class TracedDamage:
    """Per-layer damage of one split's probe predicted from the metric's trace estimated with
    sampled labels (docs/damage.md, "Large outputs: the trace from sampled labels").

    Attributes:
        damage: layer → its predicted damage.
        trace: the estimated traces, with their standard errors.
    """

    damage: dict[str, LayerDamage]
    trace: TraceResult


def traced_layers(
    split: str, epoch: int, found: TracedDamage, noise: float, bits: int
) -> tuple[dict[str, float], list[LayerRow]]:
    """The scalars and the layer table's rows of a probe's traced damage. The standard error
    of the noise KL comes from the draws alone (the probe's samples are fixed); FI columns,
    which sampled labels do not give, are NaN."""
    metrics: dict[str, float] = {}
    rows: list[LayerRow] = []
    nan = float("nan")
    for name, layer in found.damage.items():
        traced = found.trace.layers[name]
        kl = layer.noise[noise]
        metrics[keys.layer_kl_noise(split, name)] = kl
        mean = float(traced.metric.mean())
        se = float(traced.standard_error.square().sum().sqrt()) / max(len(traced.metric), 1)
        metrics[keys.layer_kl_noise_se(split, name)] = kl * se / mean if mean > 0 else 0.0
        if (bits, True) in layer.quant:
            metrics[keys.layer_kl_quant(split, name, bits)] = layer.quant[bits, True]
        rows.append(
            LayerRow(
                split=split,
                epoch=epoch,
                layer=name,
                method=f"sampled ({found.trace.draws} draws, {traced.method})",
                samples=len(traced.metric),
                kl_noise=kl,
                kl_quant_tensor=layer.quant.get((bits, False), nan),
                kl_quant_channel=layer.quant.get((bits, True), nan),
                kl_scale=nan,
                metric=mean,
                effective_rank_mean=nan,
                relative_fi_median=nan,
                scale_log_fi_median=nan,
                channel_relative_fi_median=nan,
                noise=noise,
                bits=bits,
            )
        )
    return metrics, rows
