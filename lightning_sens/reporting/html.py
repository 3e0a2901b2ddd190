"""A self-contained HTML report of a training run or a post-hoc evaluation: tables and figures.

Everything the page needs is inside it: figures and thumbnails as base64 PNG, a few lines of
inline JavaScript that sort the flagged samples by a click on a column header.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_sens.reporting import keys

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["format_number", "write_report"]

Thumbnails = Callable[[str, int], "Tensor | None"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
th[data-sort] { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
img.thumb { width: 48px; image-rendering: pixelated; margin: 0; border: 0; }
.note { color: #555; font-size: 0.9em; }
"""

# Sorts every table of class "sortable" by the column whose header (th[data-sort]) is clicked:
# numerically where data-sort is "number" (NaN last), as text otherwise; a second click reverses.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach(function (th, column) {
    if (!th.hasAttribute("data-sort")) { return; }
    var numeric = th.getAttribute("data-sort") === "number";
    var value = function (row) {
      var text = row.cells[column].getAttribute("data-value") || "", number = parseFloat(text);
      return numeric ? (isNaN(number) ? -Infinity : number) : text;
    };
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending", body = table.tBodies[0];
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      Array.from(body.rows).sort(function (a, b) {
        var x = value(a), y = value(b);
        var order = numeric ? (x > y) - (x < y) : x.localeCompare(y, undefined, {numeric: true});
        return up ? order : -order;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_FIGURE_ORDER = ("manhattan", "flagged", "layer_heatmap", "layer_strip", "fi_maps")
_SPLIT_ORDER = ("train", "val", "train_all")
_SPLIT_NAMES = {"train": "train", "val": "val", "train_all": "full training-set scan"}
_NOTE = (
    "FI is the influence measure of Shu &amp; Zhu (AAAI 2019). Whole-input FI equals "
    "(1 − p_y)/p_y exactly where the effective rank is K − 1; see docs/method.md. "
)
TRAINING_SPLITS = (
    "Splits: <em>train</em> is every training sample scored in the training steps (or a fixed "
    "training probe where the steps are not scored), <em>val</em> every validation sample, the "
    "<em>full training-set scan</em> (optional) the whole training set in evaluation mode."
)


_EVIDENCE = (
    "mean log FI with the label over every training step that scored the sample: what the "
    "counterfactual rule ranks training samples by (docs/flags.md)"
)
_P_BAD = "the estimated share of wrong labels among the samples of this class that score as high"


def _split_name(split: str) -> str:
    return _SPLIT_NAMES.get(split, split)


def _samples(split: str) -> str:
    return "samples of the full training-set scan" if split == "train_all" else f"{split} samples"


def _split_rank(split: str) -> tuple[int, str]:
    order = _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER)
    return order, split


@dataclass(frozen=True)
class _Column:
    header: str
    key: str
    kind: str  # "count", "share" or "number"
    tip: str = ""


def _median_pred(split: str) -> str:
    """Median log FI with the predicted label over the split's samples."""
    return keys.curve("pred", split, "median")


def _history_columns() -> list[_Column]:
    """Every column the per-epoch table may have, in order (absent ones are left out later)."""
    both, every = ("train", "val"), _SPLIT_ORDER
    kinds: list[tuple[str, Callable[[str], str], str, tuple[str, ...]]] = [
        ("loss", keys.loss, "number", both),
        ("accuracy", keys.accuracy, "share", both),
        ("flagged", keys.flag_count, "count", every),
        ("persistent", keys.persistent_count, "count", every),
        ("estimated wrong labels", keys.estimated_wrong, "share", every),
        ("median log FI (predicted label)", _median_pred, "number", both),
    ]
    columns = [
        _Column(f"{name}, {_split_name(s)}", key(s), kind, key.__doc__ or "")
        for name, key, kind, splits in kinds
        for s in splits
    ]
    columns.append(
        _Column("gap, median log FI train − val", keys.gap(), "number", keys.gap.__doc__ or "")
    )
    tip = keys.closed_form_holds.__doc__ or ""
    columns += [
        _Column(f"closed form certified, {s} probe", keys.closed_form_holds(s), "share", tip)
        for s in both
    ]
    return columns


def _parse(text: str) -> int | float | str:
    """A CSV field as the number it holds, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_number(value: object, *, percent: bool = False) -> str:
    """``value`` rounded for reading.

    Integers (and floats that hold one) with thousands separators (``12,345``); with ``percent``
    (accuracies and other shares) a percentage with one decimal (``92.3%``); other floats with
    4 significant digits (``0.01183``, ``3.142``, ``12,346`` from 10,000 on) and the tiny ones in
    short scientific notation (``1.18e-5``); NaN and None as "–", infinities as ∞. Numeric text
    (a CSV field) is read as a number first; other text and values come back as ``str(value)``.
    """
    if isinstance(value, str):
        value = _parse(value.strip())
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral) and not percent:
        return f"{int(value):,}"
    number = float(value)
    if math.isnan(number):
        return "–"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if percent:
        share = 100 * number
        text = f"{share:.1f}"
        if share != 0 and float(text) == 0:
            text = f"{share:.1g}"
        return f"{text}%"
    magnitude = abs(number)
    if number.is_integer() and magnitude < 1e15:
        return f"{int(number):,}"
    if 1e4 <= magnitude < 1e15:
        return f"{number:,.0f}"
    if 1e-3 <= magnitude < 1e4:
        return f"{number:.4g}"
    mantissa, exponent = f"{number:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _td(text: str, sort_value: object = None, *, left: bool = False) -> str:
    """One cell: ``text`` escaped; ``sort_value`` (raw) for the sorting script."""
    attributes = " class='text'" if left else ""
    if sort_value is not None:
        attributes += f' data-value="{html.escape(str(sort_value))}"'
    return f"<td{attributes}>{html.escape(text)}</td>"


def _th(text: str, tip: str = "", sort: str = "", order: str = "") -> str:
    tip = " ".join(tip.replace("``", "").split())  # docstrings' reStructuredText literals
    attributes = f' title="{html.escape(tip)}"' if tip else ""
    attributes += f' data-sort="{sort}"' if sort else ""
    attributes += f' aria-sort="{order}"' if order else ""
    return f"<th{attributes}>{html.escape(text)}</th>"


def _figure_rank(path: Path) -> tuple[int, str]:
    ranks = [i for i, prefix in enumerate(_FIGURE_ORDER) if path.stem.startswith(prefix)]
    return (ranks[0] if ranks else len(_FIGURE_ORDER), path.stem)


def _history_section(
    checkpoints: Sequence[tuple[str, int, int]], history: Sequence[Mapping[str, float]]
) -> list[str]:
    columns = [c for c in _history_columns() if any(c.key in row for row in history)]
    parts = ["<h2>Per epoch or checkpoint</h2><table><thead><tr>"]
    parts += [_th(name) for name in ("at", "epoch", "step")]
    parts += [_th(c.header, c.tip) for c in columns]
    parts.append("</tr></thead><tbody>")
    for (name, epoch, step), metrics in zip(checkpoints, history, strict=True):
        row = [_td(name, left=True), _td(format_number(epoch)), _td(format_number(step))]
        for c in columns:
            value = metrics.get(c.key)
            if value is not None and c.kind == "count" and math.isfinite(value):
                value = round(value)
            row.append(_td(format_number(value, percent=c.kind == "share")))
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</tbody></table>")
    return parts


def _thumbnail(image: Tensor) -> str:
    """A (C, H, W) image (C = 1 or 3, any range) as base64 PNG, min-max normalised."""
    from matplotlib.image import imsave

    array = image.detach().float().cpu()
    if array.dim() == 2:
        array = array[None]
    if array.dim() != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, H, W) image with C = 1 or 3, got {tuple(image.shape)}")
    array = array.nan_to_num(0.0, 0.0, 0.0)
    low, high = array.min(), array.max()
    array = (array - low) / (high - low) if high > low else array * 0
    buffer = io.BytesIO()
    if array.shape[0] == 1:
        imsave(buffer, array[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        imsave(buffer, array.permute(1, 2, 0).contiguous().numpy(), format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _class_name(text: str, class_names: Sequence[str] | None) -> str:
    index = _parse(text)
    if class_names is not None and isinstance(index, int) and 0 <= index < len(class_names):
        return str(class_names[index])
    return text


def _flag_section(
    flag_table: Path,
    history: Sequence[Mapping[str, float]],
    config: Mapping[str, object],
    thumbnails: Thumbnails | None,
    class_names: Sequence[str] | None,
) -> list[str]:
    with flag_table.open(newline="") as stream:
        table = list(csv.DictReader(stream))
    splits = sorted({r["split"] for r in table}, key=_split_rank)
    scored = {s: sum(r["split"] == s for r in table) for s in splits}
    rows = [r for r in table if r["flagged"] == "True"]
    flagged = {s: sum(r["split"] == s for r in rows) for s in splits}
    epochs = sorted({r["epoch"] for r in table}, key=_parse)
    at = f" at epoch {', '.join(epochs)}" if epochs else ""
    rules = sorted({r["rule"] for r in table if r.get("rule")})
    rule = f" by the rule {', '.join(rules)}" if rules else ""
    parts = [f"<h2>Flagged samples{html.escape(at)}</h2>"]
    counts = [
        f"<span class='count' data-split=\"{html.escape(s)}\">{format_number(flagged[s])}</span>"
        f" of {format_number(scored[s])} {html.escape(_samples(s))}"
        for s in splits
    ]
    sentence = "; ".join(counts) if counts else "no samples were scored"
    parts.append(f"<p id='flag-counts'>Flagged{html.escape(rule)}: {sentence}.</p>")
    last = history[-1] if history else {}
    for s in sorted({*splits, *_SPLIT_ORDER}, key=_split_rank):
        logged = last.get(keys.flag_count(s))
        if logged is not None and math.isfinite(logged) and round(logged) != flagged.get(s, 0):
            parts.append(
                f"<p class='note'>The flag table counts {flagged.get(s, 0)} flagged "
                f"{html.escape(_split_name(s))} samples, the last logged metric "
                f"{html.escape(keys.flag_count(s))} {format_number(logged)}.</p>"
            )
    if not rows:
        return parts

    rows.sort(key=lambda r: -_float(r["log_fi"]))
    images: list[str | None] = [None] * len(rows)
    failures: list[str] = []
    for i, r in enumerate(rows):
        try:
            found = None if thumbnails is None else thumbnails(r["split"], int(r["sample"]))
            images[i] = None if found is None else _thumbnail(found)
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")
    show = any(image is not None for image in images)
    persistence = config.get("persistence")
    recent = f"the last {persistence} monitored" if isinstance(persistence, int) else "recent"
    parts.append("<table class='sortable' id='flagged'><thead><tr>")
    parts += [_th("thumbnail")] if show else []
    parts += [
        _th("sample", sort="number"),
        _th("split", sort="text"),
        _th("label", sort="text"),
        _th("prediction", sort="text"),
        _th("p_label", "the model's probability of the label", sort="number"),
        _th(
            "log FI",
            "natural log of FI with the label, FI = (1 − p_label)/p_label",
            "number",
            "descending",
        ),
        _th(f"flagged in {recent} epochs", sort="number"),
    ]
    evidence = any(math.isfinite(_float(r.get("log_fi_mean", "nan"))) for r in rows)
    p_bad = any(math.isfinite(_float(r.get("p_bad", "nan"))) for r in rows)
    parts += [_th("evidence", _EVIDENCE, sort="number")] if evidence else []
    parts += [_th("p_bad", _P_BAD, sort="number")] if p_bad else []
    parts.append("</tr></thead><tbody>")
    for r, image in zip(rows, images, strict=True):
        cells = []
        if show:
            picture = f"<img class='thumb' alt='' src='data:image/png;base64,{image}'>"
            cells.append(f"<td>{picture if image else ''}</td>")
        label = _class_name(r["label"], class_names)
        prediction = _class_name(r["prediction"], class_names)
        cells += [
            _td(r["sample"], r["sample"]),
            _td(r["split"], r["split"], left=True),
            _td(label, label, left=class_names is not None),
            _td(prediction, prediction, left=class_names is not None),
            _td(format_number(r["p_label"]), r["p_label"]),
            _td(format_number(r["log_fi"]), r["log_fi"]),
            _td(format_number(r["flagged_recent"]), r["flagged_recent"]),
        ]
        for shown, column in ((evidence, "log_fi_mean"), (p_bad, "p_bad")):
            if shown:
                cells.append(_td(format_number(r.get(column, "nan")), r.get(column, "nan")))
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    if failures:
        parts.append(
            f"<p class='note'>{len(failures)} of {len(rows)} thumbnails could not be drawn "
            f"(first error: {html.escape(failures[0])}).</p>"
        )
    return parts


def _float(text: str) -> float:
    value = _parse(text)
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf


def _config_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_config_value, value)) or "–"
    if value is None or isinstance(value, str):
        return str(value)
    return format_number(value)


def write_report(
    path: Path,
    title: str,
    checkpoints: Sequence[tuple[str, int, int]],
    history: Sequence[Mapping[str, float]],
    figures: Sequence[Path],
    flag_table: Path | None,
    config: Mapping[str, object],
    *,
    thumbnails: Thumbnails | None = None,
    class_names: Sequence[str] | None = None,
    splits_note: str = TRAINING_SPLITS,
) -> None:
    """Write ``path``: one table row per checkpoint, the figures (embedded), the flagged samples.

    Args:
        checkpoints: (name, epoch, step) per evaluated checkpoint or epoch, in order.
        history: the monitor's metrics per checkpoint, same order (a missing key: not measured).
        figures: PNG files to embed (base64): Manhattan plots first, FI maps last.
        flag_table: the last checkpoint's flag table (CSV); every flagged row is listed.
        config: the monitor's configuration.
        thumbnails: (split, sample id) → the sample's image, (C, H, W) with C = 1 or 3, or None;
            shown beside each flagged sample. Errors leave the picture out, with a note.
        class_names: names of the classes, for the label and prediction columns.
        splits_note: what the splits are (HTML): the default describes a training run.
    """
    escaped = html.escape(title)
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{escaped}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{escaped}</h1>",
        f"<p class='note'>{_NOTE}{splits_note}</p>",
    ]
    parts += _history_section(checkpoints, history)
    if figures:
        parts.append("<h2>Figures of the last checkpoint</h2>")
        for figure in sorted(figures, key=_figure_rank):
            data = base64.b64encode(figure.read_bytes()).decode("ascii")
            name = html.escape(figure.stem)
            parts.append(f"<h3>{name}</h3><img alt='{name}' src='data:image/png;base64,{data}'>")
    if flag_table is not None and flag_table.exists():
        parts += _flag_section(flag_table, history, config, thumbnails, class_names)
        link = os.path.relpath(flag_table, path.parent)  # valid wherever the folder moves
        parts.append(f"<p class='note'>Every scored sample: {html.escape(link)}</p>")
    parts.append("<h2>Configuration</h2><table><tbody>")
    parts += [
        f"<tr>{_td(str(k), left=True)}{_td(_config_value(v), left=True)}</tr>"
        for k, v in config.items()
    ]
    parts.append(f"</tbody></table><script>{_SCRIPT}</script></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
