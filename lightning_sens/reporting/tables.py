"""The monitor's tables, written atomically as CSV/Parquet: flags (one row per monitored sample
and epoch) and layers (one row per layer, split and epoch)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["FlagRow", "LayerRow", "write_table"]


@dataclass(frozen=True)
class FlagRow:
    """One sample in one decision (a monitored validation, or the end of a training epoch or of
    fit).

    Attributes:
        sample: the sample's id (its index in the dataset unless the batch carries ids).
        split: "train" or "val".
        epoch: the training epoch.
        step: the global step of the decision (several decisions in one epoch differ in it).
        label, prediction: true and predicted class.
        p_label: the model's probability of the true label.
        fi, log_fi: whole-input FI with the true label, (1 − p_label)/p_label, and its log.
        relative_fi: FI over its largest possible value: 1 for the whole input (closed form).
        effective_rank: effective rank of the whole input, where the exact engine ran on this sample
            (K − 1 certifies the closed form); -1 where it did not.
        log_fi_mean: for the training set scored in the training steps: the mean log FI (true
            label) over the steps that scored the sample so far (the first epoch's until a later
            one scored it), a soft area under the margin curve; the evidence the
            "counterfactual" rule flags by. NaN elsewhere.
        seen: how many training steps that evidence holds (0 outside the training split).
        flagged: flagged by ``rule`` in this decision.
        p_bad: "counterfactual" rule: the estimated share of wrong labels among the samples of
            this class that score at least as high (1 − the q-value of the flag); NaN for the
            other rules.
        flagged_recent: in how many of the last ``persistence`` decisions it was flagged.
        rule: the flag rule and its parameter, e.g. "mad>3.5".
        cutoff: the score above which a sample looks like a wrong label: per split (mad, top_k)
            or per class (counterfactual).
    """

    sample: int
    split: str
    epoch: int
    step: int
    label: int
    prediction: int
    p_label: float
    fi: float
    log_fi: float
    relative_fi: float
    effective_rank: int
    log_fi_mean: float
    seen: int
    flagged: bool
    p_bad: float
    flagged_recent: int
    rule: str
    cutoff: float


COLUMNS = tuple(f.name for f in fields(FlagRow))


@dataclass(frozen=True)
class LayerRow:
    """One layer on one exact probe at one decision (docs/damage.md, "What the metric
    predicts"; docs/method.md, "Families computed").

    Attributes:
        split, epoch, layer: where; ``method``: the engine's route for the layer.
        samples: probe samples averaged over.
        kl_noise: expected KL (nats per sample) of Gaussian noise of ``noise`` × the layer's rms.
        kl_quant_tensor, kl_quant_channel: expected KL of rounding the weights to ``bits`` bits
            with one step per tensor / per output channel; NaN for layers other than Linear and
            convolutions.
        kl_scale: expected KL of scaling the layer's parameters by 1.1.
        metric: mean tr(G_l) over the probe samples.
        effective_rank_mean, relative_fi_median: the paper's per-layer FI (Setup 2): mean
            effective rank and median relative FI (1 at full rank: the closed form).
        scale_log_fi_median: median log FI of scaling the layer by one factor.
        channel_relative_fi_median: median relative FI of scaling its output channels (NaN for
            layers without channels).
        noise, bits: the perturbation sizes of the KL columns.
    """

    split: str
    epoch: int
    layer: str
    method: str
    samples: int
    kl_noise: float
    kl_quant_tensor: float
    kl_quant_channel: float
    kl_scale: float
    metric: float
    effective_rank_mean: float
    relative_fi_median: float
    scale_log_fi_median: float
    channel_relative_fi_median: float
    noise: float
    bits: int


LAYER_COLUMNS = tuple(f.name for f in fields(LayerRow))


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


Table = Mapping[str, Sequence[Any]]


def _csv_field(text: str) -> str:
    """One field as the csv module writes it (minimal quoting)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _csv_column(values: Sequence[Any]) -> list[str]:
    """A column as csv text, column-wise (several times faster than csv.writer row by row,
    which matters for the training set's table every epoch): floats by their repr (full
    precision, ``inf`` and ``nan`` included), as ``str(float)`` writes them."""
    kinds = set(map(type, values))
    # few distinct values (labels, flags, per-class cutoffs): format each once. A prefix says
    # cheaply when a column has too many for that (the scores: a set of them costs as much)
    few = len(kinds) == 1 and 4 * len(set(values[:256])) <= min(len(values), 256)
    distinct = set(values) if few else ()
    if few and 4 * len(distinct) <= len(values):  # one type (1 == 1.0 == True)
        text = {v: "" if v is None else _csv_field(str(v)) for v in distinct}
        return list(map(text.__getitem__, values))
    if kinds <= {float}:
        return list(map(float.__repr__, values))
    if kinds <= {int}:
        return list(map(str, values))
    return ["" if v is None else _csv_field(str(v)) for v in values]


def write_table(
    rows: Sequence[Any] | Table, path: Path, names: Sequence[str] = COLUMNS
) -> list[Path]:
    """Write a table to ``path`` (.csv) atomically, and as .parquet beside it with pyarrow.

    ``rows``: row objects (:class:`FlagRow`, :class:`LayerRow`) or dicts, or the table column
    by column (a mapping from every name in ``names`` to a list). ``names``: the columns, in order
    (default: the flag table's :data:`COLUMNS`; :data:`LAYER_COLUMNS` for the layer table).
    Floats are written in full precision (``repr``: ``inf`` and ``nan`` included). Returns the
    paths written.
    """
    if isinstance(rows, Mapping):
        columns = {name: list(rows[name]) for name in names}
    else:
        columns = {
            name: [r[name] if isinstance(r, Mapping) else getattr(r, name) for r in rows]
            for name in names
        }

    def to_csv(target: Path) -> None:
        text = [_csv_column(values) for values in columns.values()]
        with target.open("w", newline="") as stream:
            stream.write(",".join(map(_csv_field, names)) + "\r\n")
            lines = map(",".join, zip(*text, strict=True))
            stream.write("".join(line + "\r\n" for line in lines))

    written = [path]
    _atomic(path, to_csv)
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns)
        parquet = path.with_suffix(".parquet")
        _atomic(parquet, lambda target: pq.write_table(table, target))
        written.append(parquet)
    return written
