"""Flagging high-influence samples: the rules and their persistence across epochs (pure torch).

The per-sample score is log FI with the true label (Setup 1 of the paper: candidate outliers and
mislabelled samples). Two rules, chosen by the user:

- ``"mad"`` (default): a sample is flagged when its robust z-score
  z = (log FI − median) / (1.4826 · MAD) exceeds ``threshold`` (3.5 by default, the cut-off
  Iglewicz and Hoaglin recommend for modified z-scores). Median and MAD ignore the flagged tail
  itself, so a handful of extreme samples cannot hide each other, and the cut-off adapts as the
  whole distribution moves during training. log FI is used because FI spans many orders of
  magnitude.
- ``"top_k"``: the k samples with the largest log FI (the paper shows the top 5). Always flags k
  samples, whether or not any is unusual.

Persistence: a sample flagged in m of the last n monitored epochs is more trustworthy than one
flagged once; :class:`FlagHistory` counts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = ["FlagDecision", "FlagHistory", "FlagRule", "flag", "robust_z"]

FlagRule = Literal["mad", "top_k"]

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
        cutoff: the log FI above which samples were flagged (for "top_k", the k-th largest).
        rule: the rule used, with its parameter, e.g. ``"mad>3.5"`` or ``"top_k=10"``.
    """

    flagged: Tensor
    cutoff: float
    rule: str


def flag(
    log_fi: Tensor, rule: FlagRule = "mad", threshold: float = 3.5, top_k: int = 10
) -> FlagDecision:
    """Apply a flag rule to per-sample log FI (see the module docstring)."""
    scores = log_fi.detach().to(torch.float64).flatten()
    if rule == "top_k":
        k = min(top_k, scores.numel())
        flagged = torch.zeros(scores.numel(), dtype=torch.bool)
        if k == 0:
            return FlagDecision(flagged, float("inf"), f"top_k={top_k}")
        values, order = scores.topk(k)
        flagged[order.cpu()] = True
        return FlagDecision(flagged, float(values[-1]), f"top_k={top_k}")
    if rule == "mad":
        flagged = (robust_z(scores) > threshold).cpu()
        found = _location_scale(scores)
        cutoff = float("inf") if found is None else found[0] + threshold * found[1]
        return FlagDecision(flagged, cutoff, f"mad>{threshold:g}")
    raise ValueError(f"rule must be 'mad' or 'top_k', got {rule!r}.")


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
