"""The monitor's state and per-epoch arithmetic, free of Lightning (torch and torchmetrics only):
:class:`SensitivityTracker` (update, gather, compute, reset, state_dict) and the torchmetrics
:class:`Samples` that gathers per-sample rows across processes."""

from lightning_sens.tracking.samples import EpochScores, Samples
from lightning_sens.tracking.tracker import (
    SCALE,
    EpochReport,
    PositionReport,
    Probes,
    SensitivityTracker,
)

__all__ = [
    "SCALE",
    "EpochReport",
    "EpochScores",
    "PositionReport",
    "Probes",
    "Samples",
    "SensitivityTracker",
]
