"""The flag table: one row per monitored sample and epoch, written atomically as CSV/Parquet."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["FlagRow", "write_table"]


@dataclass(frozen=True)
class FlagRow:
    """One sample in one monitored epoch.

    Attributes:
        sample: the sample's id (its index in the dataset unless the batch carries ids).
        split: "train" or "val".
        epoch: the training epoch.
        label, prediction: true and predicted class.
        p_label: the model's probability of the true label.
        fi, log_fi: whole-input FI with the true label, (1 − p_label)/p_label, and its log.
        relative_fi: FI over its largest possible value: 1 for the whole input (closed form).
        rank: effective rank of the whole input, where the exact engine ran on this sample
            (K − 1 certifies the closed form); -1 where it did not.
        log_fi_mean: for the training set scored in the training steps: the mean log FI (true
            label) over every step that scored the sample so far, a soft area under the margin
            curve; the evidence the "counterfactual" rule flags by. NaN elsewhere.
        seen: how many training steps scored the sample (0 outside the training split).
        flagged: flagged by ``rule`` in this epoch.
        p_bad: "counterfactual" rule: the estimated share of wrong labels among the samples of
            this class that score at least as high (1 − the q-value of the flag); NaN for the
            other rules.
        flagged_recent: in how many of the last ``persistence`` monitored epochs it was flagged.
        rule: the flag rule and its parameter, e.g. "mad>3.5".
        cutoff: the score above which a sample looks like a wrong label: per split (mad, top_k)
            or per class (counterfactual).
    """

    sample: int
    split: str
    epoch: int
    label: int
    prediction: int
    p_label: float
    fi: float
    log_fi: float
    relative_fi: float
    rank: int
    log_fi_mean: float
    seen: int
    flagged: bool
    p_bad: float
    flagged_recent: int
    rule: str
    cutoff: float


COLUMNS = tuple(f.name for f in fields(FlagRow))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_table(rows: Sequence[FlagRow], path: Path) -> list[Path]:
    """Write ``rows`` to ``path`` (.csv) atomically, and as .parquet beside it with pyarrow.

    Returns the paths written.
    """

    def text(value: object) -> object:  # floats in full precision: repr, or inf / nan
        if isinstance(value, float):
            return repr(value) if math.isfinite(value) else str(value)
        return value

    def to_csv(target: Path) -> None:
        with target.open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(COLUMNS)
            writer.writerows(tuple(text(getattr(r, c)) for c in COLUMNS) for r in rows)

    written = [path]
    _atomic(path, to_csv)
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name: [getattr(r, name) for r in rows] for name in COLUMNS})
        parquet = path.with_suffix(".parquet")
        _atomic(parquet, lambda target: pq.write_table(table, target))
        written.append(parquet)
    return written
