"""Flagging high-influence samples: the rules and their persistence across epochs (pure torch).

The per-sample score is log FI with the true label (Setup 1 of the paper: candidate outliers and
mislabelled samples). Three rules, chosen by the user:

- ``"counterfactual"`` (default): estimates how many labels of each class are wrong, by comparing
  each class's scores with the scores the model gives samples of the other classes under that
  label, and flags that many (:mod:`lightning_sens.label_noise`; the benchmark is in
  docs/flags.md, "Benchmark"). Every flag carries ``p_bad``, the estimated share of wrong labels
  among the samples of its class scoring at least as high. It stays quiet on clean data and does
  not break down when 10–40 % of the labels are wrong, where the bad labels are no longer a few
  outliers. A class the model does not separate from the others (a model at chance) is
  undecided: it flags nothing there and says so (docs/flags.md, "When the rule declines to
  decide").
- ``"mad"``: a sample is flagged when its robust z-score
  z = (log FI − median) / (1.4826 · MAD) exceeds ``threshold`` (3.5 by default, the cut-off
  Iglewicz and Hoaglin recommend for modified z-scores). Median and MAD ignore the flagged tail
  itself, so a handful of extreme samples cannot hide each other, and the cut-off adapts as the
  whole distribution moves during training. log FI is used because FI spans many orders of
  magnitude. Suited to a few outliers; when many labels are wrong they inflate the MAD and
  recall collapses.
- ``"top_k"``: the k samples with the largest log FI (the paper shows the top 5). Always flags k
  samples, whether or not any is unusual.

Persistence: a sample flagged in m of the last n monitored epochs is more trustworthy than one
flagged once; :class:`FlagHistory` counts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_sens.label_noise import estimate_noise

__all__ = ["FlagDecision", "FlagHistory", "FlagRule", "flag", "robust_z"]

FlagRule = Literal["counterfactual", "counterfactual_pairs", "mad", "top_k"]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 σ
_MEAN_AD_TO_SIGMA = 1.2533  # mean absolute deviation of a normal distribution is 0.7979 σ


def _location_scale(scores: Tensor) -> tuple[float, float] | None:
    """Median and robust σ of the finite scores (None if there are none)."""
    values = scores[torch.isfinite(scores)]
    if values.numel() == 0:
        return None
    median = values.median()
    deviation = (values - median).abs()
    scale = _MAD_TO_SIGMA * deviation.median()
    if scale == 0:  # more than half the samples tie: fall back to the mean absolute deviation
        scale = _MEAN_AD_TO_SIGMA * deviation.mean()
    return float(median), float(scale)


def robust_z(scores: Tensor) -> Tensor:
    """Modified z-scores (x − median) / (1.4826 · MAD) of finite scores, shape ``(N,)``.

    Where MAD is 0 (more than half the samples tie), the mean absolute deviation is used instead;
    where that is 0 too, every score equals the median and all z are 0. Non-finite scores keep
    their sign: +inf (FI = inf) maps to +inf, −inf (FI = 0) to −inf.
    """
    x = scores.detach().to(torch.float64)
    found = _location_scale(x)
    if found is None:
        return torch.zeros_like(x)
    median, scale = found
    if scale == 0:
        return torch.where(torch.isfinite(x), torch.zeros_like(x), x)
    return (x - median) / scale


@dataclass(frozen=True)
class FlagDecision:
    """Which samples a rule flagged in one epoch.

    Attributes:
        flagged: bool ``(N,)``.
        cutoff: ``(N,)`` the log FI above which each sample's split (for "top_k": the k-th
            largest) or, for "counterfactual", its class looks like a wrong label.
        rule: the rule used, with its parameter, e.g. ``"mad>3.5"`` or ``"top_k=10"``.
        p_bad: ``(N,)`` for "counterfactual": the estimated share of wrong labels among the
            samples of the same class scoring at least as high (NaN where the rule does not say).
        estimated: for the counterfactual rules: the estimated number of wrong labels per class
            (−1 where the rule is undecided); else None.
        per_cell: the same per class and cell (:class:`~lightning_sens.label_noise.NoiseEstimate`).
        undecided: for the counterfactual rules: bool ``(K,)``, the classes the rule cannot
            decide because the model does not separate them from the others (at the 1 % level)
            or half or more of their labels would be wrong: none of their samples is flagged
            and their ``p_bad`` is NaN (docs/flags.md, "When the rule declines to decide");
            else None.
        undecided_cells: the same per class and cell (``(K, C)``; cells without samples False).
    """

    flagged: Tensor
    cutoff: Tensor
    rule: str
    p_bad: Tensor
    estimated: Tensor | None = None
    per_cell: Tensor | None = None
    undecided: Tensor | None = None
    undecided_cells: Tensor | None = None

    def take(self, index: Tensor) -> FlagDecision:
        """The decision of a subset of the samples (the counts stay per class)."""
        return FlagDecision(
            self.flagged[index],
            self.cutoff[index],
            self.rule,
            self.p_bad[index],
            self.estimated,
            self.per_cell,
            self.undecided,
            self.undecided_cells,
        )

    @property
    def undecided_classes(self) -> list[int]:
        """The classes the rule could not decide (empty for the rules that decide every
        sample: "mad", "top_k")."""
        if self.undecided is None:
            return []
        return [int(k) for k in torch.nonzero(self.undecided).flatten()]

    @property
    def estimated_share(self) -> float:
        """The estimated share of wrong labels (undecided classes left out); NaN for the rules
        that do not estimate it."""
        if self.estimated is None or self.flagged.numel() == 0:
            return float("nan")
        return float(self.estimated.clamp(min=0).sum()) / self.flagged.numel()


def flag(
    log_fi: Tensor,
    rule: FlagRule = "counterfactual",
    threshold: float = 3.5,
    top_k: int = 10,
    *,
    label_scores: Tensor | None = None,
    labels: Tensor | None = None,
    at_least: Tensor | None = None,
) -> FlagDecision:
    """Apply a flag rule to per-sample log FI with the true label (see the module docstring).

    ``"counterfactual"`` also needs ``label_scores`` ``(N, K)``, the log FI of every label
    (:func:`~lightning_sens.label_noise.label_log_fi`, or evidence accumulated over training),
    and the ``labels``; ``at_least`` are counts of wrong labels per class and cell estimated
    earlier in training (:func:`~lightning_sens.label_noise.estimate_noise`).
    ``"counterfactual_pairs"`` compares each class with every other class separately (it finds
    wrong labels between similar classes, and flags samples the model finds ambiguous). Both
    decline to decide a class the model does not separate (``FlagDecision.undecided``).
    """
    scores = log_fi.detach().to(torch.float64).flatten().cpu()
    n = scores.numel()
    unknown = torch.full((n,), float("nan"), dtype=torch.float64)

    def same(value: float) -> Tensor:
        return torch.full((n,), value, dtype=torch.float64)

    if rule in ("counterfactual", "counterfactual_pairs"):
        if label_scores is None or labels is None:
            raise ValueError(
                f"flag(rule={rule!r}) needs label_scores (N, K) and labels (N,); pass them, or "
                "choose rule='mad' or 'top_k'."
            )
        pairs = rule == "counterfactual_pairs"
        found = estimate_noise(label_scores, labels, at_least, pairs)
        return FlagDecision(
            found.flagged,
            found.cutoff,
            rule,
            found.p_bad,
            found.estimated,
            found.per_cell,
            found.undecided,
            found.undecided_cells,
        )
    if rule == "top_k":
        k = min(top_k, n)
        flagged = torch.zeros(n, dtype=torch.bool)
        if k == 0:
            return FlagDecision(flagged, same(float("inf")), f"top_k={top_k}", unknown)
        values, order = scores.topk(k)
        flagged[order] = True
        return FlagDecision(flagged, same(float(values[-1])), f"top_k={top_k}", unknown)
    if rule == "mad":
        flagged = robust_z(scores) > threshold
        location = _location_scale(scores)
        above = float("inf") if location is None else location[0] + threshold * location[1]
        return FlagDecision(flagged, same(above), f"mad>{threshold:g}", unknown)
    raise ValueError(f"rule must be one of {get_args(FlagRule)}, got {rule!r}.")


@dataclass
class FlagHistory:
    """The epochs in which each sample was flagged, per split: "flagged in m of the last n".

    Attributes:
        window: n, how many of the latest monitored epochs count.
        epochs: split → sample id → the monitored epochs it was flagged in (ascending).
        monitored: split → the epochs that were monitored (ascending).
    """

    window: int = 5
    epochs: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    monitored: dict[str, list[int]] = field(default_factory=dict)

    def update(self, split: str, epoch: int, flagged_ids: Iterable[int]) -> None:
        """Record one monitored epoch (idempotent for a repeated epoch, e.g. after a resume)."""
        seen = self.monitored.setdefault(split, [])
        if seen and seen[-1] >= epoch:
            return
        seen.append(epoch)
        per_sample = self.epochs.setdefault(split, {})
        for sample in flagged_ids:
            per_sample.setdefault(int(sample), []).append(epoch)

    def count(self, split: str, sample: int) -> int:
        """m: in how many of the last ``window`` monitored epochs the sample was flagged."""
        recent = self.monitored.get(split, [])[-self.window :]
        if not recent:
            return 0
        return sum(1 for e in self.epochs.get(split, {}).get(int(sample), []) if e >= recent[0])

    def counts(self, split: str) -> dict[int, int]:
        """:meth:`count` of every sample flagged in the window (the others are 0)."""
        recent = self.monitored.get(split, [])[-self.window :]
        if not recent:
            return {}
        per_sample = self.epochs.get(split, {}).items()
        found = {s: sum(1 for e in epochs if e >= recent[0]) for s, epochs in per_sample}
        return {s: c for s, c in found.items() if c}

    def state_dict(self) -> dict[str, object]:
        return {"window": self.window, "epochs": self.epochs, "monitored": self.monitored}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> FlagHistory:
        epochs = {
            split: {int(k): list(v) for k, v in per.items()}
            for split, per in dict(state["epochs"]).items()  # type: ignore[call-overload]
        }
        monitored = {s: list(v) for s, v in dict(state["monitored"]).items()}  # type: ignore[call-overload]
        return cls(window=int(state["window"]), epochs=epochs, monitored=monitored)  # type: ignore[call-overload]
