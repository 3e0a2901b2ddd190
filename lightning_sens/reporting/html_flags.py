"""The HTML report's flagged samples: how many of each split were flagged, and a table of them
(sortable by any column) with each sample's thumbnail where the caller can picture it."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_sens.reporting import keys
from lightning_sens.reporting.html_cells import (
    _SPLIT_ORDER,
    _float,
    _parse,
    _samples,
    _split_name,
    _split_rank,
    _td,
    _th,
    format_number,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Thumbnails", "flag_section"]

Thumbnails = Callable[[str, int], "Tensor | None"]

_EVIDENCE = (
    "mean log FI with the label over the training steps that scored the sample (from the second "
    "epoch on, once it has run): what the "
    "counterfactual rule ranks training samples by (docs/flags.md)"
)
_P_BAD = "the estimated share of wrong labels among the samples of this class that score as high"


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


def _undecided_notes(
    table: Sequence[Mapping[str, str]],
    last: Mapping[str, float],
    splits: Sequence[str],
    class_names: Sequence[str] | None,
) -> list[str]:
    """One note per split whose last decision left classes undecided (the model does not
    separate them yet, so none of their samples is flagged), naming them where the table shows
    which: the labels whose every row has no ``p_bad``."""
    notes = []
    for s in splits:
        logged = last.get(keys.undecided_classes(s))
        if logged is None or not math.isfinite(logged) or logged < 1:
            continue
        count = round(logged)
        labels: dict[str, bool] = {}
        for r in table:
            if r["split"] == s and r.get("rule") == "counterfactual":
                undecided = not math.isfinite(_float(r.get("p_bad", "nan")))
                labels[r["label"]] = labels.get(r["label"], True) and undecided
        named = sorted((k for k, v in labels.items() if v), key=_parse)
        which = ""
        if len(named) == count:
            which = " (" + ", ".join(_class_name(k, class_names) for k in named) + ")"
        classes, were = ("class", "was") if count == 1 else ("classes", "were")
        notes.append(
            f"<p class='note' data-undecided=\"{html.escape(s)}\">{count} {classes}"
            f"{html.escape(which)} of the {html.escape(_samples(s))} {were} undecided at the last "
            "decision: the model does not yet separate them from the others, so none of their "
            'samples is flagged (the flags page of the docs, "When the rule declines to '
            'decide").</p>'
        )
    return notes


def flag_section(
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
    parts += _undecided_notes(table, last, splits, class_names)
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
