"""A self-contained HTML report of a training run or a post-hoc evaluation: tables and figures.

Everything the page needs is inside it: figures and thumbnails as base64 PNG, a few lines of
inline JavaScript that sort the flagged samples by a click on a column header. The flagged
samples' section is :mod:`lightning_sens.reporting.html_flags`, the cells and numbers of every
table :mod:`lightning_sens.reporting.html_cells`.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_sens.reporting import keys
from lightning_sens.reporting.html_cells import (
    _SPLIT_ORDER,
    _config_value,
    _split_name,
    _td,
    _th,
    format_number,
)
from lightning_sens.reporting.html_flags import Thumbnails, flag_section

__all__ = ["format_number", "write_report"]

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
_NOTE = (
    "FI is the influence measure of Shu &amp; Zhu (AAAI 2019). Whole-input FI equals "
    "(1 − p_y)/p_y exactly where the effective rank is K − 1; see docs/method.md. "
)
TRAINING_SPLITS = (
    "Splits: <em>train</em> is every training sample scored in the training steps (or a fixed "
    "training probe where the steps are not scored), <em>val</em> every validation sample, the "
    "<em>full training-set scan</em> (optional) the whole training set in evaluation mode."
)


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
        parts += flag_section(flag_table, history, config, thumbnails, class_names)
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
