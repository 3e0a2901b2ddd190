"""From per-sample FI to what is logged: scalar metrics and flag tables (no Lightning here)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sens.core import BlockFI, SensitivityResult, closed_form_fi
from lightning_sens.damage import LayerDamage
from lightning_sens.flagging import FlagDecision
from lightning_sens.label_noise import label_log_fi
from lightning_sens.reporting import keys
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.tables import LayerRow

__all__ = [
    "SplitScores",
    "epoch_metrics",
    "flag_columns",
    "informative",
    "label_scores",
    "layer_rows",
    "probe_metrics",
    "split_scores",
]


@dataclass(frozen=True)
class SplitScores:
    """Closed-form whole-input FI of every monitored sample of one split, on the CPU.

    Attributes:
        ids: sample ids ``(N,)`` (dataset indices unless the batches carry ids).
        labels, preds: true and predicted classes ``(N,)``.
        p_label: probability of the true label ``(N,)``.
        log_fi_true, log_fi_pred: log FI with the true and the predicted label ``(N,)``.
        label_log_fi: log FI under every label ``(N, K)`` (what the "counterfactual" flag rule
            compares); ``log_fi_true`` is its column of the true label.
    """

    ids: Tensor
    labels: Tensor
    preds: Tensor
    p_label: Tensor
    log_fi_true: Tensor
    log_fi_pred: Tensor
    label_log_fi: Tensor

    @staticmethod
    def cat(parts: list[SplitScores]) -> SplitScores:
        return SplitScores(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))

    def map(self, fn: Callable[[Tensor], Tensor]) -> SplitScores:
        """Apply ``fn`` to every field (e.g. a gather across processes)."""
        return SplitScores(*(fn(getattr(self, f)) for f in _FIELDS))

    @staticmethod
    def dtypes() -> dict[str, torch.dtype]:
        """Each field's dtype, as :func:`split_scores` makes it (whatever the logits' dtype)."""
        return {
            f: torch.int64 if f in ("ids", "labels", "preds") else torch.float64 for f in _FIELDS
        }

    def unique(self) -> SplitScores:
        """One entry per id (the first), sorted by id: undoes DistributedSampler's padding."""
        order = torch.argsort(self.ids, stable=True)
        ids = self.ids[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        keep = order[first]
        return self.map(lambda t: t[keep])


_FIELDS = ("ids", "labels", "preds", "p_label", "log_fi_true", "log_fi_pred", "label_log_fi")


def split_scores(ids: Tensor, labels: Tensor, logits: Tensor) -> SplitScores:
    """Score a batch from its logits: closed forms, no backward pass (docs/method.md, "Two
    facts you must know")."""
    true = closed_form_fi(logits, labels)
    pred = closed_form_fi(logits, "pred")
    return SplitScores(
        ids.detach().cpu().long(),
        true.target.cpu(),
        pred.target.cpu(),
        true.p_target.cpu(),
        true.log_fi_max.cpu(),
        pred.log_fi_max.cpu(),
        label_log_fi(logits).cpu(),
    )


def label_scores(ids: Tensor, labels: Tensor, scores: Tensor) -> SplitScores:
    """SplitScores from log FI under every label ``(N, K)`` (e.g. the training steps' scores,
    averaged per sample): the predicted class is the one with the smallest log FI, and
    p_label = 1 / (1 + FI_label)."""
    y = labels.detach().cpu().long()
    x = scores.detach().cpu().to(torch.float64)
    pred = x.argmin(dim=-1)
    true = x.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return SplitScores(
        ids.detach().cpu().long(),
        y,
        pred,
        torch.sigmoid(-true),
        true,
        x.gather(-1, pred.unsqueeze(-1)).squeeze(-1),
        x,
    )


def epoch_metrics(scores: dict[str, SplitScores]) -> dict[str, float]:
    """Per split: loss, accuracy and statistics of log FI with either label; and the train −
    validation gap of the median log FI with the predicted label (Setup 3 of docs/method.md,
    "The paper's four setups")."""
    metrics: dict[str, float] = {}
    for split, s in scores.items():
        if len(s.ids):
            metrics[keys.loss(split)] = float(-s.p_label.double().log().mean())
            metrics[keys.accuracy(split)] = float((s.preds == s.labels).double().mean())
        for target, log_fi in (("true", s.log_fi_true), ("pred", s.log_fi_pred)):
            summary = log_fi_summary(log_fi)
            metrics.update({keys.curve(target, split, stat): v for stat, v in summary.items()})
    if "train" in scores and "val" in scores:
        median = [metrics[keys.curve("pred", split, "median")] for split in ("train", "val")]
        metrics[keys.gap()] = median[0] - median[1]
    return metrics


def probe_metrics(
    split: str,
    result: SensitivityResult,
    num_classes: int,
    damage: Mapping[str, LayerDamage] | None = None,
    noise: float = 0.1,
    bits: int = 4,
) -> dict[str, float]:
    """Exact-engine summaries of a probe: rank certificate, maps, and per layer the damage that
    its metric predicts (``damage``: :func:`~lightning_sens.damage.predict_damage` of the probe
    with this ``noise`` and ``bits``).

    Only what can vary is returned: a window's median relative FI and a layer's FI, relative FI
    and rank only where the family is mostly below rank K − 1 (:func:`informative`). At rank
    K − 1 they are the whole input's closed form (relative FI 1, rank K − 1); one scalar says
    which share of the layers is there.
    """
    metrics: dict[str, float] = {}
    full = num_classes - 1
    if result.input is not None:
        holds = (result.input.whole.effective_rank == full).double().mean()
        metrics[keys.closed_form_holds(split)] = float(holds)
        for window, block in result.input.maps.items():
            if informative(block, num_classes):
                metrics[keys.map_relative(split, window)] = float(block.relative_fi.median())
    if result.parameters is not None and result.parameters.layers:
        layers = result.parameters.layers
        closed = [
            name for name, layer in layers.items() if not informative(layer.parameters, num_classes)
        ]
        metrics[keys.layers_at_closed_form(split)] = len(closed) / len(layers)
        for name, layer in layers.items():
            if name in closed:
                continue
            family = layer.parameters
            metrics[keys.layer_log_fi(split, name)] = _median(family.log_fi)
            metrics[keys.layer_relative_fi(split, name)] = float(family.relative_fi.median())
            metrics[keys.layer_rank(split, name)] = float(family.effective_rank.double().mean())
    for name, layer_damage in (damage or {}).items():
        metrics[keys.layer_kl_noise(split, name)] = layer_damage.noise[noise]
        if (bits, True) in layer_damage.quant:
            metrics[keys.layer_kl_quant(split, name, bits)] = layer_damage.quant[bits, True]
    return metrics


def informative(block: BlockFI, num_classes: int) -> bool:
    """Whether a family's FI says more than the closed form: most of its blocks (samples ×
    positions) have effective rank below K − 1. A block at rank K − 1 has FI = (1 − p_y)/p_y,
    relative FI 1; where most are there (e.g. 5 × 5 windows, whose clipped border windows
    alone fall below), maps are flat washes and the median relative FI is 1."""
    below = (block.effective_rank < num_classes - 1).double()
    return below.numel() > 0 and float(below.mean()) > 0.5


def _median(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else float("nan")


def layer_rows(
    split: str,
    epoch: int,
    result: SensitivityResult,
    damage: Mapping[str, LayerDamage],
    noise: float,
    bits: int,
    scale: float,
) -> list[LayerRow]:
    """The layer table of one probe: predicted damage next to the paper's per-layer FI."""
    rows: list[LayerRow] = []
    if result.parameters is None:
        return rows
    nan = float("nan")
    for name, layer in result.parameters.layers.items():
        predicted = damage[name]
        channel = layer.channel_scale
        rows.append(
            LayerRow(
                split=split,
                epoch=epoch,
                layer=name,
                method=layer.method,
                samples=int(layer.metric.numel()),
                kl_noise=predicted.noise[noise],
                kl_quant_tensor=predicted.quant.get((bits, False), nan),
                kl_quant_channel=predicted.quant.get((bits, True), nan),
                kl_scale=predicted.scale[scale],
                metric=predicted.metric,
                effective_rank_mean=float(layer.parameters.effective_rank.double().mean()),
                relative_fi_median=float(layer.parameters.relative_fi.median()),
                scale_log_fi_median=_median(layer.scale.log_fi),
                channel_relative_fi_median=nan
                if channel is None
                else float(channel.relative_fi.median()),
                noise=noise,
                bits=bits,
            )
        )
    return rows


def flag_columns(
    split: str,
    at: tuple[int, int],
    scores: SplitScores,
    decision: FlagDecision,
    recent: dict[int, int],
    ranks: dict[int, int],
    evidence: tuple[Tensor, Tensor] | None = None,
) -> dict[str, list[Any]]:
    """The flag table of one split and decision ``at`` = (epoch, step), column by column (the
    columns of :class:`~lightning_sens.reporting.tables.FlagRow`).

    ``recent``: sample → in how many of the last decisions it was flagged, this one
    included (:meth:`FlagHistory.counts`). ``evidence``: (mean log FI with the true label over
    training, number of steps), aligned with ``scores``, where the split was scored in the
    training steps.
    """
    ids = scores.ids.tolist()
    n = len(ids)
    return {
        "sample": ids,
        "split": [split] * n,
        "epoch": [at[0]] * n,
        "step": [at[1]] * n,
        "label": scores.labels.tolist(),
        "prediction": scores.preds.tolist(),
        "p_label": scores.p_label.tolist(),
        "fi": scores.log_fi_true.to(torch.float64).exp().tolist(),
        "log_fi": scores.log_fi_true.tolist(),
        "relative_fi": [1.0] * n,
        "effective_rank": [ranks.get(i, -1) for i in ids] if ranks else [-1] * n,
        "log_fi_mean": evidence[0].tolist() if evidence is not None else [float("nan")] * n,
        "seen": evidence[1].tolist() if evidence is not None else [0] * n,
        "flagged": decision.flagged.tolist(),
        "p_bad": decision.p_bad.tolist(),
        "flagged_recent": [recent.get(i, 0) for i in ids],
        "rule": [decision.rule] * n,
        "cutoff": decision.cutoff.tolist(),
    }
