"""The docs cannot drift from the code: every MonitorConfig field is in the options table of
docs/monitor.md (and nothing else is), and every key that reporting/keys.py builds is written
out in docs/monitor.md's Output section."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from lightning_sens.config import MonitorConfig
from lightning_sens.reporting import keys

MONITOR_DOC = (Path(__file__).resolve().parent.parent / "docs" / "monitor.md").read_text()


def _section(title: str) -> str:
    start = MONITOR_DOC.index(f"\n## {title}\n")
    end = MONITOR_DOC.find("\n## ", start + 1)
    return MONITOR_DOC[start : end if end > 0 else None]


def test_the_options_table_lists_every_config_field() -> None:
    rows = [line for line in _section("Options").splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    fields = {field.name for field in dataclasses.fields(MonitorConfig)}
    assert documented == fields, (sorted(fields - documented), sorted(documented - fields))


# Placeholders as docs/monitor.md writes them.
_ARGS = {
    "split": "{s}",
    "target": "{t}",
    "stat": "{stat}",
    "layer": "{layer}",
    "window": "{w}",
    "bits": "{b}",
    "name": "{name}",
}
_BUILDERS = [
    name
    for name in keys.__all__
    if inspect.isfunction(getattr(keys, name)) and name not in ("route", "unroute")
]


@pytest.mark.parametrize("builder", _BUILDERS)
def test_every_logged_key_is_documented(builder: str) -> None:
    function = getattr(keys, builder)
    parameters = inspect.signature(function).parameters
    key = function(**{p: _ARGS[p] for p in parameters})
    assert key in _section("Output"), f"{builder}: {key} is not in docs/monitor.md, Output"
