"""A self-contained HTML report of a post-hoc evaluation: tables and embedded figures."""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_sens.reporting import keys

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""

_COLUMNS = (
    ("median log FI (val, pred)", keys.curve("pred", "val", "median")),
    ("q99 log FI (val, pred)", keys.curve("pred", "val", "q99")),
    ("median log FI (train, pred)", keys.curve("pred", "train", "median")),
    ("gap median (train − val)", keys.gap("pred", "median")),
    ("closed form holds (val probe)", keys.closed_form_holds("val")),
    ("flagged (val)", keys.flag_count("val")),
    ("flagged (train probe)", keys.flag_count("train")),
    ("flagged (all training)", keys.flag_count("train_all")),
)
_FIGURE_ORDER = ("manhattan", "flagged", "layer_heatmap", "layer_strip", "fi_maps")


def _figure_rank(path: Path) -> tuple[int, str]:
    ranks = [i for i, prefix in enumerate(_FIGURE_ORDER) if path.stem.startswith(prefix)]
    return (ranks[0] if ranks else len(_FIGURE_ORDER), path.stem)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    return f"<td class='text'>{html.escape(str(value))}</td>"


def write_report(
    path: Path,
    title: str,
    checkpoints: Sequence[tuple[str, int, int]],
    history: Sequence[Mapping[str, float]],
    figures: Sequence[Path],
    flag_table: Path | None,
    config: Mapping[str, object],
    max_flagged_rows: int = 30,
) -> None:
    """Write ``path``: one table row per checkpoint, the figures (embedded), the flagged samples.

    Args:
        checkpoints: (name, epoch, step) per evaluated checkpoint, in evaluation order.
        history: the monitor's metrics per checkpoint, same order.
        figures: PNG files to embed (base64): Manhattan plots first, FI maps last.
        flag_table: the last checkpoint's flag table (CSV); its flagged rows are listed.
        config: the monitor's configuration.
    """
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    ]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append(
        "<p class='note'>FI is the influence measure of Shu &amp; Zhu (AAAI 2019). Whole-input FI "
        "equals (1 − p_y)/p_y exactly where the rank is K − 1; see docs/method.md.</p>"
    )
    parts.append(
        "<h2>Per epoch or checkpoint</h2><table><tr><th>at</th><th>epoch</th><th>step</th>"
    )
    parts += [f"<th>{html.escape(name)}</th>" for name, _ in _COLUMNS]
    parts.append("</tr>")
    for (name, epoch, step), metrics in zip(checkpoints, history, strict=True):
        row = [_cell(name), f"<td>{epoch}</td>", f"<td>{step}</td>"]
        row += [
            _cell(float(metrics[key])) if key in metrics else "<td>–</td>" for _, key in _COLUMNS
        ]
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</table>")

    if figures:
        parts.append("<h2>Figures of the last checkpoint</h2>")
        for figure in sorted(figures, key=_figure_rank):
            data = base64.b64encode(figure.read_bytes()).decode("ascii")
            parts.append(
                f"<h3>{html.escape(figure.stem)}</h3><img alt='{html.escape(figure.stem)}' "
                f"src='data:image/png;base64,{data}'>"
            )

    if flag_table is not None and flag_table.exists():
        with flag_table.open() as stream:
            rows = [r for r in csv.DictReader(stream) if r["flagged"] == "True"]
        rows.sort(key=lambda r: -float(r["log_fi"]))
        parts.append(f"<h2>Flagged samples of the last checkpoint ({len(rows)})</h2>")
        columns = ("sample", "split", "label", "prediction", "p_label", "log_fi", "flagged_recent")
        parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")
        for r in rows[:max_flagged_rows]:
            parts.append(
                "<tr>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in columns) + "</tr>"
            )
        parts.append("</table>")
        parts.append(f"<p class='note'>All rows: {html.escape(str(flag_table))}</p>")

    parts.append("<h2>Configuration</h2><table>")
    parts += [f"<tr>{_cell(k)}{_cell(v)}</tr>" for k, v in config.items()]
    parts.append("</table></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
