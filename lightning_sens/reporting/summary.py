"""From per-sample FI to what is logged: scalar metrics and flag-table rows (no Lightning here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sens.core import SensitivityResult, closed_form_fi
from lightning_sens.flagging import FlagDecision, FlagHistory
from lightning_sens.reporting import keys
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.tables import FlagRow

__all__ = ["SplitScores", "epoch_metrics", "flag_rows", "probe_metrics", "split_scores"]


@dataclass(frozen=True)
class SplitScores:
    """Closed-form whole-input FI of every monitored sample of one split, on the CPU.

    Attributes:
        ids: sample ids ``(N,)`` (dataset indices unless the batches carry ids).
        labels, preds: true and predicted classes ``(N,)``.
        p_label: probability of the true label ``(N,)``.
        log_fi_true, log_fi_pred: log FI with the true and the predicted label ``(N,)``.
    """

    ids: Tensor
    labels: Tensor
    preds: Tensor
    p_label: Tensor
    log_fi_true: Tensor
    log_fi_pred: Tensor

    @staticmethod
    def cat(parts: list[SplitScores]) -> SplitScores:
        return SplitScores(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))

    def map(self, fn: Callable[[Tensor], Tensor]) -> SplitScores:
        """Apply ``fn`` to every field (e.g. a gather across processes)."""
        return SplitScores(*(fn(getattr(self, f)) for f in _FIELDS))

    def unique(self) -> SplitScores:
        """One entry per id (the first), sorted by id: undoes DistributedSampler's padding."""
        order = torch.argsort(self.ids, stable=True)
        ids = self.ids[order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        keep = order[first]
        return self.map(lambda t: t[keep])


_FIELDS = ("ids", "labels", "preds", "p_label", "log_fi_true", "log_fi_pred")


def split_scores(ids: Tensor, labels: Tensor, logits: Tensor) -> SplitScores:
    """Score a batch from its logits: two closed forms, no backward pass (METHOD.md §5.1)."""
    true = closed_form_fi(logits, labels)
    pred = closed_form_fi(logits, "pred")
    return SplitScores(
        ids.detach().cpu().long(),
        true.target.cpu(),
        pred.target.cpu(),
        true.p_target.cpu(),
        true.log_fi.cpu(),
        pred.log_fi.cpu(),
    )


def epoch_metrics(scores: dict[str, SplitScores]) -> dict[str, float]:
    """Curves of log FI per split and label kind, and the train − validation gaps."""
    metrics: dict[str, float] = {}
    summaries: dict[tuple[str, str], dict[str, float]] = {}
    for split, s in scores.items():
        for target, log_fi in (("true", s.log_fi_true), ("pred", s.log_fi_pred)):
            summary = log_fi_summary(log_fi)
            summaries[(target, split)] = summary
            metrics.update({keys.curve(target, split, stat): v for stat, v in summary.items()})
    if "train" in scores and "val" in scores:
        for target in keys.TARGETS:
            train, val = summaries[(target, "train")], summaries[(target, "val")]
            metrics.update({keys.gap(target, stat): train[stat] - val[stat] for stat in keys.STATS})
    return metrics


def probe_metrics(split: str, result: SensitivityResult, num_classes: int) -> dict[str, float]:
    """Exact-engine summaries of a probe: rank certificate, maps and per-layer scores."""
    metrics: dict[str, float] = {}
    if result.input is not None:
        full = (result.input.whole.effective_rank == num_classes - 1).double().mean()
        metrics[keys.closed_form_holds(split)] = float(full)
        for window, block in result.input.maps.items():
            metrics[keys.map_relative(split, window)] = float(block.relative_fi.median())
    if result.parameters is not None:
        for name, layer in result.parameters.layers.items():
            scale = layer.scale.log_fi
            finite = scale[torch.isfinite(scale)]
            metrics[keys.layer_scale(split, name)] = (
                float(finite.median()) if finite.numel() else float("nan")
            )
            metrics[keys.layer_rank(split, name)] = float(
                layer.parameters.effective_rank.double().mean()
            )
            relative = layer.parameters.relative_fi
            metrics[keys.layer_relative(split, name)] = float(relative.median())
            if layer.channel_scale is not None:
                metrics[keys.layer_channel(split, name)] = float(
                    layer.channel_scale.relative_fi.median()
                )
    return metrics


def flag_rows(
    split: str,
    epoch: int,
    scores: SplitScores,
    decision: FlagDecision,
    history: FlagHistory,
    ranks: dict[int, int],
) -> list[FlagRow]:
    """The flag table of one split and epoch (``history`` must already include this epoch)."""
    rows = []
    for i, sample in enumerate(scores.ids.tolist()):
        log_fi = float(scores.log_fi_true[i])
        rows.append(
            FlagRow(
                sample=sample,
                split=split,
                epoch=epoch,
                label=int(scores.labels[i]),
                prediction=int(scores.preds[i]),
                p_label=float(scores.p_label[i]),
                fi=float(torch.tensor(log_fi, dtype=torch.float64).exp()),
                log_fi=log_fi,
                relative_fi=1.0,
                rank=ranks.get(sample, -1),
                flagged=bool(decision.flagged[i]),
                flagged_recent=history.count(split, sample),
                rule=decision.rule,
                cutoff=decision.cutoff,
            )
        )
    return rows
