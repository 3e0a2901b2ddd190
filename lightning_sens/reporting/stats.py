"""Robust summaries of per-sample log FI (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sens.reporting.keys import QUANTILES

__all__ = ["log_fi_summary"]


def log_fi_summary(log_fi: Tensor) -> dict[str, float]:
    """Median, mean and the quantiles of :data:`~lightning_sens.reporting.keys.QUANTILES` (%).

    Computed over finite values (log FI is −inf where FI = 0); NaN where there are none.
    """
    x = log_fi.detach().to(torch.float64).flatten()
    x = x[torch.isfinite(x)].cpu()
    if x.numel() == 0:
        return {name: float("nan") for name in ("median", "mean", *(f"q{q}" for q in QUANTILES))}
    levels = torch.tensor([q / 100 for q in QUANTILES], dtype=torch.float64)
    values = torch.quantile(x, levels)
    out = {"median": float(torch.quantile(x, 0.5)), "mean": float(x.mean())}
    out.update({f"q{q}": float(v) for q, v in zip(QUANTILES, values, strict=True)})
    return out
