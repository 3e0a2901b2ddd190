"""Per-sample rows collected over an epoch and gathered across processes, as a torchmetrics
``Metric``: ``update`` appends a batch's rows on this process, ``compute`` returns every
process's rows (torchmetrics' ``cat`` reduction: uneven shards, a process without rows, NCCL or
Gloo), ``reset`` empties it.

Every column travels as float64 (integers up to 2⁵³ exactly) and flattened, with its row width
reduced by ``max``, so that a process that saw no rows contributes an empty tensor that fits
(torchmetrics makes it in the metric's dtype). :meth:`Samples.compute` restores each column's
dtype and shape.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sens.reporting.summary import SplitScores, split_scores

__all__ = ["EpochScores", "Samples"]


class Samples(Metric):
    """Rows of named per-sample tensors, ``(N,)`` or ``(N, W)``, over an epoch.

    Args:
        columns: each column's name and the dtype :meth:`compute` returns it in.
        options: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ...).
    """

    full_state_update = False
    _LATE_COMPUTE = ".*was called before the ``update`` method.*"

    def __init__(self, columns: dict[str, torch.dtype], **options: Any) -> None:
        super().__init__(compute_with_cache=False, **options)
        self.columns = dict(columns)
        for name in self.columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")
            self.add_state(f"{name}_width", default=torch.tensor(0.0), dist_reduce_fx="max")
        self.set_dtype(torch.float64)
        self._widths: dict[str, int] = {}

    def update(self, **rows: Tensor) -> None:
        """Keep a batch's rows as they are (no copy, no conversion: that is done once per
        epoch, in :meth:`gathered`)."""
        if set(rows) != set(self.columns):
            raise ValueError(f"Samples.update needs the columns {sorted(self.columns)}")
        for name, values in rows.items():
            getattr(self, name).append(values.detach())
            self._widths[name] = math.prod(values.shape[1:])

    def reset(self) -> None:
        super().reset()
        self._widths = {}

    def compute(self) -> dict[str, Tensor] | None:
        """Every process's rows on the CPU, in process order; None where no process saw any."""
        out = {}
        for name, dtype in self.columns.items():
            values = getattr(self, name)
            if isinstance(values, list):  # not gathered (one process): this process's rows
                if not values:
                    return None
                values = torch.cat(values)
            flat = values
            width = int(getattr(self, f"{name}_width"))
            if flat.numel() == 0 or width == 0:
                return None
            shaped = flat.reshape(-1, width) if width > 1 else flat.reshape(-1)
            out[name] = shaped.to("cpu", dtype)
        return out

    def gathered(self) -> dict[str, Tensor] | None:
        """Every process's rows (a collective under DDP: every process calls it).

        This process's rows are first made one flat float64 tensor per column, then
        torchmetrics' ``compute`` gathers them (without its warning on a process that saw no
        rows) and :meth:`compute` shapes them."""
        for name in self.columns:
            parts = getattr(self, name)
            if isinstance(parts, list) and parts:  # one column keeps one dtype: cat, then cast
                flat = torch.cat([p.reshape(-1) for p in parts])
                setattr(self, name, [flat.to(self.device, torch.float64)])
            width = float(self._widths.get(name, 0))
            setattr(self, f"{name}_width", torch.tensor(width, device=self.device))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", self._LATE_COMPUTE)
            return self.compute()


class EpochScores(Samples):
    """One split's closed-form scores over an epoch (:class:`SplitScores` per sample)."""

    def __init__(self) -> None:
        super().__init__(SplitScores.dtypes())

    def add(self, ids: Tensor, labels: Tensor, logits: Tensor) -> None:
        """Score a batch from its logits (closed forms, no backward pass) and keep the rows."""
        scores = split_scores(ids, labels, logits)
        self.update(**{name: getattr(scores, name) for name in self.columns})

    def scores(self) -> SplitScores | None:
        """Every process's scores, one row per sample id (DistributedSampler's padding
        removed), sorted by id; None where nothing was scored. A collective under DDP."""
        found = self.gathered()
        return None if found is None else SplitScores(**found).unique()
