"""The monitor's state and its per-epoch arithmetic, without Lightning: scores in, flags,
metrics and tables out.

:class:`SensitivityTracker` follows torchmetrics' protocol: :meth:`~SensitivityTracker.update`
takes a validation batch's logits, :meth:`~SensitivityTracker.gather` collects the epoch's
scores from every process, :meth:`~SensitivityTracker.compute` turns them (with what the exact
engine measured on the probes) into one :class:`EpochReport`, :meth:`~SensitivityTracker.reset`
starts the next epoch, and ``state_dict``/``load_state_dict`` carry what lasts across epochs
(probes, history, flag history, the training-set evidence) through a checkpoint. The callback
(:class:`~lightning_sens.callbacks.SensitivityMonitor`) only reads batches and runs the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sens.config import MonitorConfig
from lightning_sens.core import SensitivityResult
from lightning_sens.core.references import FlagKind
from lightning_sens.damage import LayerDamage
from lightning_sens.flagging import FlagDecision, FlagHistory, flag
from lightning_sens.label_noise import LabelEvidence, estimate_noise
from lightning_sens.reporting import keys
from lightning_sens.reporting.positions import (
    STRETCH,
    PositionRows,
    TracedDamage,
    chosen_share,
    document_deviation,
    position_columns,
    position_metrics,
    traced_layers,
)
from lightning_sens.reporting.summary import (
    SplitScores,
    epoch_metrics,
    flag_columns,
    label_scores,
    layer_rows,
    probe_metrics,
)
from lightning_sens.reporting.tables import LayerRow
from lightning_sens.tracking.resume import restore
from lightning_sens.tracking.samples import EpochScores, Samples

__all__ = ["SCALE", "EpochReport", "PositionReport", "Probes", "SensitivityTracker"]

SCALE = 0.1  # δ of the layer table's "scale by 1 + δ" column


@dataclass
class Probes:
    """What the exact engine measured this epoch, per split: its results, the sample ids they
    belong to, and the per-layer damage predicted from them."""

    results: dict[str, SensitivityResult] = field(default_factory=dict)
    ids: dict[str, Tensor] = field(default_factory=dict)
    damage: dict[str, dict[str, LayerDamage]] = field(default_factory=dict)


@dataclass
class EpochReport:
    """One decision (docs/monitor.md, "When it decides"), computed.

    Attributes:
        epoch, step: where it is logged.
        scores: per split, the score each split's flags rank by (for the training split
            scored in the training steps: the mean log FI over the steps so far).
        evidence_splits: the splits whose ``scores`` are such means.
        decisions: per split, the flags.
        metrics: every scalar of the epoch, by key (:mod:`~lightning_sens.reporting.keys`).
        flags: the flag table, column by column.
        layers: the layer table's rows.
        probes: the exact probes' results.
        histograms: per split, the epoch's log FI with the true and the predicted label.
    """

    epoch: int
    step: int
    scores: dict[str, SplitScores]
    evidence_splits: set[str]
    decisions: dict[str, FlagDecision]
    metrics: dict[str, float]
    flags: dict[str, list[Any]]
    layers: list[LayerRow]
    probes: Probes
    histograms: dict[str, tuple[Tensor, Tensor]]


@dataclass
class PositionReport:
    """One decision of a model with many positions per sample (docs/tasks.md), computed.

    Attributes:
        epoch, step: where it is logged.
        rows: per split, every sample scored, its positions reduced.
        metrics: every scalar of the decision, by key.
        table: the positions table, column by column.
        histograms: per split, the samples' mean log FI with the label and with the most
            probable class.
        layers: the layer table's rows (damage from the sampled-label trace).
        evidence: per split, each row's evidence and whether it is flagged
            (:meth:`SensitivityTracker.decide_positions`).
    """

    epoch: int
    step: int
    rows: dict[str, PositionRows]
    metrics: dict[str, float]
    table: dict[str, list[Any]]
    histograms: dict[str, tuple[Tensor, Tensor]]
    layers: list[LayerRow] = field(default_factory=list)
    evidence: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


class SensitivityTracker:
    """Per-decision scores, flags and the state that lasts across decisions (docs/monitor.md,
    "What it does at each decision").

    Attributes:
        config: the monitor's options.
        probes: split → the probe's sample ids (drawn once with ``config.seed``).
        history: one row of metrics per decision (with ``epoch`` and ``step``).
        flags: the decisions (by global step) each sample was flagged in (persistence).
        evidence: every training sample's log FI under every label, summed over the training
            steps (when they are scored); a sample's steps of the first epoch, whose scores
            are the untrained network's, leave it once a later epoch has scored it.
        first: the first epoch's sums of the samples no later epoch has scored yet.
        position_evidence: models with many positions: every training sample's estimated share
            of wrong labels among its positions, summed over the decisions whose training
            split the rule decides (:func:`~lightning_sens.reporting.positions.decides`); the
            first decision's estimates leave a sample once a later one has scored it.
        position_first: the first training decision's estimates of the samples no later
            decided decision has scored yet.
        noise_floor: per class and cell, the largest count of wrong labels estimated from the
            training steps between two decisions, after the first (memorisation lowers later
            estimates; this keeps the evidence).
        validations: the validation loops run so far (``every_n_epochs`` counts them).
    """

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.probes: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.flags = FlagHistory(config.persistence)
        self.evidence: LabelEvidence | None = None
        self.first: LabelEvidence | None = None
        self.noise_floor: Tensor | None = None
        self.position_evidence: LabelEvidence | None = None
        self.position_first: LabelEvidence | None = None
        self.position_decisions = 0
        self.folds = 0
        self.validations = 0
        self.validation = EpochScores()
        self.validation_positions = Samples(PositionRows.dtypes())
        self.num_classes = 0
        self._train_epoch: SplitScores | None = None
        self._train_positions: PositionRows | None = None
        self._train_deviation: Tensor | None = None
        self.flag_kind: FlagKind = "labels"

    # -- update, gather, compute, reset ------------------------------------------------------

    def update(self, ids: Tensor, labels: Tensor, logits: Tensor) -> None:
        """Score a validation batch from its logits (closed forms: docs/method.md, "Two facts
        you must know")."""
        self.num_classes = logits.shape[1]
        self.validation.add(ids, labels, logits)

    def update_positions(self, rows: PositionRows) -> None:
        """Keep a validation batch's samples of a model with many positions."""
        self.validation_positions.update(**{name: getattr(rows, name) for name in rows.names()})

    def fold_positions(self, rows: PositionRows) -> None:
        """The training steps' samples since the last decision (many positions): this
        decision's training split, one row per sample (its last step)."""
        order = torch.arange(len(rows.ids) - 1, -1, -1)  # the last step first: unique keeps it
        keep = order[rows.map(lambda t: t[order]).unique_index()]
        self._train_positions = rows.map(lambda t: t[keep])
        if self.flag_kind == "documents":  # against the documents of nearby steps
            self._train_deviation = document_deviation(rows.loss, STRETCH)[keep]

    def gather_positions(self) -> dict[str, PositionRows]:
        """:meth:`gather` for a model with many positions. A collective under DDP."""
        rows = {}
        found = self.validation_positions.gathered()
        if found is not None:
            rows["val"] = PositionRows(**found).unique()
        if self._train_positions is not None:
            rows["train"], self._train_positions = self._train_positions, None
        return rows

    def deviation(self, split: str, rows: PositionRows) -> Tensor:
        """Per sample of a language model (:attr:`flag_kind` ``"documents"``): how far its loss
        lies above the other documents', in robust standard deviations
        (:func:`~lightning_sens.reporting.positions.document_deviation`; the training split
        against the documents of nearby steps, folded with it). NaN for other models."""
        if self.flag_kind != "documents":
            return torch.full_like(rows.loss, float("nan"))
        found = self._train_deviation if split == "train" else None
        if found is not None and len(found) == len(rows.loss):  # folded with these rows
            self._train_deviation = None
            return found
        return document_deviation(rows.loss)

    def compute_positions(
        self,
        epoch: int,
        step: int,
        rows: dict[str, PositionRows],
        extra: dict[str, float] | None = None,
        damage: dict[str, TracedDamage] | None = None,
    ) -> PositionReport:
        """Metrics, the positions table and the layer table of one decision (many positions);
        its metrics join the history. ``damage``: per split, the per-layer damage predicted
        from the sampled-label trace of its probe."""
        c = self.config
        metrics = position_metrics(rows)
        layers: list[LayerRow] = []
        for split, found in (damage or {}).items():
            scalars, found_rows = traced_layers(split, epoch, found, c.damage_noise, c.damage_bits)
            metrics.update(scalars)
            layers += found_rows
        table: dict[str, list[Any]] = {}
        decided: dict[str, tuple[Tensor, Tensor]] = {}
        for split, r in rows.items():
            deviation = self.deviation(split, r)
            evidence, flagged = self.decide_positions(split, r, deviation)
            if self.flag_kind == "ranking":  # estimates written, nothing flagged
                flagged = torch.zeros_like(flagged)
            decided[split] = evidence, flagged
            self.flags.update(split, step, r.ids[flagged].tolist())
            counts = self.flags.counts(split)
            columns = position_columns(split, (epoch, step), r)
            columns["deviation"] = deviation.tolist()
            columns["evidence"] = evidence.tolist()
            columns["flagged"] = flagged.tolist()
            columns["flagged_recent"] = [counts.get(i, 0) for i in r.ids.tolist()]
            for name, values in columns.items():
                table.setdefault(name, []).extend(values)
            judged = torch.isfinite(r.wrong_share).any() or torch.isfinite(deviation).any()
            if self.flag_kind != "ranking" and bool(judged):
                metrics[keys.flag_count(split)] = float(flagged.sum())
                recent = columns["flagged_recent"]
                metrics[keys.persistent_count(split)] = float(
                    sum(m * 2 > c.persistence for m in recent)
                )
        metrics.update(extra or {})
        self.history.append({"epoch": epoch, "step": step, **metrics})
        histograms = {split: (r.log_fi_mean, r.log_fi_pred_mean) for split, r in rows.items()}
        return PositionReport(epoch, step, rows, metrics, table, histograms, layers, decided)

    def decide_positions(
        self, split: str, rows: PositionRows, deviation: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per sample of a split with many positions: the evidence and whether it is flagged.

        Labels (:attr:`flag_kind` ``"labels"``): the evidence is the estimated share of its
        positions whose labels are wrong, cut at ``position_flag_share``. A decision uses both
        tests' estimates where they decide the split, else the first test's where it does
        (:func:`~lightning_sens.reporting.positions.chosen_share`). Documents (a language
        model): the evidence is the ``deviation`` of its loss, cut at ``flag_threshold``,
        decided where it is known. The training split's evidence is the mean over every
        decision so far that decides it; any other split's is this decision's, where it is
        decided (docs/tasks.md, "Flags: which samples' labels look wrong")."""
        if self.flag_kind == "documents" and deviation is not None:
            cut = self.config.flag_threshold
            share = deviation
            decided = bool(torch.isfinite(deviation).any())
        else:
            cut = self.config.position_flag_share
            chosen = chosen_share(rows, cut)
            decided = chosen is not None
            share = rows.wrong_share if chosen is None else chosen
        if split != "train":
            evidence = share if decided else torch.full_like(share, float("nan"))
            return evidence, evidence >= cut
        first = self.position_decisions == 0
        self.position_decisions += 1
        if decided:
            kept = torch.isfinite(share)
            ids = rows.ids[kept]
            window = LabelEvidence.empty(1).update(ids, torch.zeros_like(ids), share[kept, None])
            before = self.position_evidence or LabelEvidence.empty(1)
            self.position_evidence = before.update(window.ids, window.labels, window.total)
            if first:  # the first epoch's network is the least trained: it leaves once seen again
                self.position_first = window
            elif self.position_first is not None:
                again = window.ids[torch.isin(window.ids, self.position_first.ids)]
                self.position_evidence.forget(self.position_first, again)
                if self.position_first.ids.numel() == 0:
                    self.position_first = None
        evidence = torch.full_like(share, float("nan"))
        held = self.position_evidence
        if held is not None and held.ids.numel():
            where = torch.searchsorted(held.ids, rows.ids).clamp(max=len(held.ids) - 1)
            known = held.ids[where] == rows.ids
            evidence[known] = held.mean[where[known], 0]
        return evidence, evidence >= cut

    def fold(self, ids: Tensor, labels: Tensor, scores: Tensor) -> None:
        """Add the training steps' log FI under every label ``(N, K)`` since the last
        decision to the evidence; their per-sample mean is this decision's training split. A
        sample's scores from the first epoch (the untrained network's, which say nothing about
        its label) leave its evidence once a later epoch has scored it."""
        self.num_classes = scores.shape[-1]
        window = LabelEvidence.empty(scores.shape[-1]).update(ids, labels, scores)
        self._train_epoch = label_scores(window.ids, window.labels, window.mean)
        rule = self.config.flag_rule
        if rule in ("counterfactual", "counterfactual_pairs") and self.folds > 0:
            # the first epoch mixes in the untrained network: its estimate does not count
            pairs = rule == "counterfactual_pairs"
            estimated = estimate_noise(window.mean, window.labels, pairs=pairs).per_cell
            floor = self.noise_floor
            self.noise_floor = estimated if floor is None else torch.maximum(floor, estimated)
        evidence = self.evidence or LabelEvidence.empty(scores.shape[-1])
        self.evidence = evidence.update(ids, labels, scores)
        if self.folds == 0:
            self.first = window
        elif self.first is not None:
            # the untrained network's scores leave a sample once a later epoch scored it
            again = window.ids[torch.isin(window.ids, self.first.ids)]
            self.evidence.forget(self.first, again)
            if self.first.ids.numel() == 0:
                self.first = None
        self.folds += 1

    def gather(self) -> dict[str, SplitScores]:
        """This epoch's scores of every process, by split: the validation samples (one row
        per id) and, where the training steps were folded, the training samples. A collective
        under DDP: every process calls it."""
        scores = {}
        val = self.validation.scores()
        if val is not None:
            scores["val"] = val
        if self._train_epoch is not None:
            scores["train"], self._train_epoch = self._train_epoch, None
        return scores

    def reset(self) -> None:
        """Forget this epoch's validation scores (the state across epochs stays)."""
        self.validation.reset()
        self.validation_positions.reset()

    def compute(
        self,
        epoch: int,
        step: int,
        scores: dict[str, SplitScores],
        probes: Probes,
        *,
        use_evidence: bool,
        extra: dict[str, float] | None = None,
    ) -> EpochReport:
        """Metrics, flags and tables of one decision; its metrics join the history.

        ``use_evidence``: flag the training split by the evidence of every training step so far
        (when the training steps are scored) instead of this epoch's scores. ``extra``: more
        metrics for this epoch's row (the monitor's cost).
        """
        c = self.config
        metrics = epoch_metrics(scores)
        layers: list[LayerRow] = []
        for split, result in probes.results.items():
            found = probes.damage.get(split)
            metrics.update(
                probe_metrics(split, result, self.num_classes, found, c.damage_noise, c.damage_bits)
            )
            if found:
                layers += layer_rows(
                    split, epoch, result, found, c.damage_noise, c.damage_bits, SCALE
                )
        table: dict[str, list[Any]] = {}
        decisions, pictured = {}, dict(scores)
        for split, s in scores.items():
            decision, evidence = self.decide(split, s, use_evidence)
            decisions[split] = decision
            if evidence is not None:
                pictured[split] = dataclasses.replace(s, log_fi_true=evidence[0])
            self.flags.update(split, step, s.ids[decision.flagged].tolist())
            columns = flag_columns(
                split,
                (epoch, step),
                s,
                decision,
                self.flags.counts(split),
                _ranks(probes, split),
                evidence,
            )
            for name, values in columns.items():
                table.setdefault(name, []).extend(values)
            metrics[keys.flag_count(split)] = float(decision.flagged.sum())
            recent = columns["flagged_recent"]
            metrics[keys.persistent_count(split)] = float(
                sum(m * 2 > c.persistence for m in recent)
            )
            if decision.estimated is not None:
                metrics[keys.estimated_wrong(split)] = decision.estimated_share
            if decision.undecided is not None:
                metrics[keys.undecided_classes(split)] = float(decision.undecided.sum())
        metrics.update(extra or {})
        self.history.append({"epoch": epoch, "step": step, **metrics})
        histograms = {split: (s.log_fi_true, s.log_fi_pred) for split, s in scores.items()}
        evidence_splits = {k for k in scores if pictured[k] is not scores[k]}
        return EpochReport(
            epoch, step, pictured, evidence_splits, decisions, metrics, table, layers, probes,
            histograms,
        )  # fmt: skip

    def decide(
        self, split: str, scores: SplitScores, use_evidence: bool
    ) -> tuple[FlagDecision, tuple[Tensor, Tensor] | None]:
        """Flags of one split: the training split by its evidence over all training steps so
        far (with ``use_evidence``), every other split by this epoch's scores. Returns the
        decision and, for the former, (mean log FI with the label, steps seen) per sample."""
        c = self.config
        evidence = self.evidence if split == "train" and use_evidence else None
        if evidence is None or evidence.ids.numel() == 0:
            decision = flag(
                scores.log_fi_true,
                c.flag_rule,
                c.flag_threshold,
                c.top_k,
                label_scores=scores.label_log_fi,
                labels=scores.labels,
            )
            return decision, None
        mean = evidence.mean
        own = mean.gather(-1, evidence.labels.unsqueeze(-1)).squeeze(-1)
        decision = flag(
            own,
            c.flag_rule,
            c.flag_threshold,
            c.top_k,
            label_scores=mean,
            labels=evidence.labels,
            at_least=self.noise_floor,
        )
        where = torch.searchsorted(evidence.ids, scores.ids)
        return decision.take(where), (own[where], evidence.seen[where])

    # -- what lasts across epochs -------------------------------------------------------------

    def probe(self, split: str, dataset_size: int, size: int) -> Tensor:
        """The probe's sample ids: ``size`` of ``dataset_size``, drawn once with the seed (the
        validation probe with seed + 1); drawn again when the size asked for changed."""
        wanted = min(size, dataset_size)
        found = self.probes.get(split)
        stale = found is None or len(found) != wanted
        if stale or (wanted and int(found.max()) >= dataset_size):  # type: ignore[union-attr]
            generator = torch.Generator().manual_seed(self.config.seed + (split == "val"))
            self.probes[split] = torch.randperm(dataset_size, generator=generator)[:size]
        return self.probes[split]

    def scan_due(self) -> bool:
        """Whether this decision scans the training set (``scan_every_n_epochs``)."""
        done = len(self.flags.monitored.get("train", []))
        return self.config.scan_train_set and done % self.config.scan_every_n_epochs == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "probes": {k: v.tolist() for k, v in self.probes.items()},
            "history": self.history,
            "flags": self.flags.state_dict(),
            "evidence": None if self.evidence is None else self.evidence.state_dict(),
            "first": None if self.first is None else self.first.state_dict(),
            "noise_floor": self.noise_floor,
            "position_evidence": (
                None if self.position_evidence is None else self.position_evidence.state_dict()
            ),
            "position_first": (
                None if self.position_first is None else self.position_first.state_dict()
            ),
            "position_decisions": self.position_decisions,
            "folds": self.folds,
            "validations": self.validations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore a saved state; what no longer fits the current options is dropped. Returns
        "" or a sentence naming the options that changed and what that reset
        (docs/monitor.md, "Resuming")."""
        changes = restore(self, state)
        return f"a state saved with other options: {'; '.join(changes)}" if changes else ""


def _ranks(probes: Probes, split: str) -> dict[int, int]:
    """Sample id → the whole input's effective rank, for the samples of a split's exact probe."""
    result = probes.results.get(split)
    if result is None or result.input is None:
        return {}
    whole = result.input.whole.effective_rank
    return dict(zip(probes.ids[split].tolist(), whole.tolist(), strict=True))
