"""The pieces of the HTML report's tables: numbers rounded for reading, escaped cells and
headers (with a raw value for the sorting script), CSV fields read back as numbers, and the
names and order of the splits.

Example:
    >>> format_number(12345.678), format_number(0.9234, percent=True), format_number("nan")
    ('12,346', '92.3%', '–')
    >>> _td("a < b", 3)
    '<td data-value="3">a &lt; b</td>'
"""

from __future__ import annotations

import html
import math
import numbers

__all__ = ["format_number"]

_SPLIT_ORDER = ("train", "val", "train_all")
_SPLIT_NAMES = {"train": "train", "val": "val", "train_all": "full training-set scan"}


def _split_name(split: str) -> str:
    return _SPLIT_NAMES.get(split, split)


def _samples(split: str) -> str:
    return "samples of the full training-set scan" if split == "train_all" else f"{split} samples"


def _split_rank(split: str) -> tuple[int, str]:
    order = _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER)
    return order, split


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


def _float(text: str) -> float:
    value = _parse(text)
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf


def _config_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_config_value, value)) or "–"
    if value is None or isinstance(value, str):
        return str(value)
    return format_number(value)
