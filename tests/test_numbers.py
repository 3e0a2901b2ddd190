"""The numbers in the README and the docs are the ones docs/measure_docs.py measured (issue 11).

Fast: these tests read docs/numbers.json and the docs; they never run the demo.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _numbers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_numbers", ROOT / "docs" / "measure_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


numbers = _numbers()


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "docs" / "numbers.json").read_text())
    return loaded


@pytest.mark.parametrize("name", numbers.FILES)
def test_every_span_is_what_the_json_renders(name: str, data: dict[str, Any]) -> None:
    """A number edited by hand inside a span, or a JSON changed without a render, fails here:
    run ``python docs/measure_docs.py --render``."""
    text = (ROOT / name).read_text(encoding="utf-8")
    assert numbers.span_names(text), f"{name} has no numbers span"
    rerun = f"{name}: run python docs/measure_docs.py --render"
    assert numbers.render_text(text, data) == text, rerun


def _markdown() -> list[Path]:
    found = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.md")]
    return sorted(found)


def test_span_names_match_the_renderers() -> None:
    """Every span in the docs has a renderer, every renderer a span, and every file with spans
    is one that the script renders."""
    used: set[str] = set()
    for path in _markdown():
        names = numbers.span_names(path.read_text(encoding="utf-8"))
        if names:
            assert path.relative_to(ROOT).as_posix() in numbers.FILES, path
        used.update(names)
    assert used == set(numbers.RENDERERS)


def test_a_hand_edit_inside_a_span_is_caught(data: dict[str, Any]) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    recall = f"recall {data['demo']['recall']:.2f}"
    assert recall in text
    edited = text.replace(recall, "recall 0.99" if "0.99" not in recall else "recall 0.98")
    assert numbers.render_text(edited, data) == text


def test_render_rejects_unknown_and_unclosed_spans(data: dict[str, Any]) -> None:
    with pytest.raises(KeyError, match="nope"):
        numbers.render_text("<!-- numbers:nope -->x<!-- /numbers:nope -->", data)
    with pytest.raises(ValueError, match="not closed"):
        numbers.render_text("<!-- numbers:demo-time -->x", data)


def test_demo_counts_are_consistent(data: dict[str, Any]) -> None:
    demo = data["demo"]
    assert demo["corrupted"] <= demo["train"]
    assert 0 <= demo["hits"] <= demo["flagged"]
    assert demo["hits"] <= demo["corrupted"]
    assert f"{demo['precision']:.2f}" == f"{demo['hits'] / demo['flagged']:.2f}"
    assert f"{demo['recall']:.2f}" == f"{demo['hits'] / demo['corrupted']:.2f}"
    assert len(demo["per_epoch"]) == demo["epochs"]
    assert demo["per_epoch"][-1][1:] == [demo["flagged"], demo["hits"]]
    for _, flagged, hits in demo["per_epoch"]:
        assert 0 <= hits <= flagged


def test_every_time_was_measured(data: dict[str, Any]) -> None:
    for part in ("demo", "quickstart", "paper_small"):
        assert data[part]["seconds"] > 0, part
    assert data["machine"]["cores"] >= 1


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3.4, "about 3 s"),
        (41.0, "about 40 s"),
        (96.0, "about 95 s"),
        (130.0, "about 2 minutes"),
        (1500, "about 25 minutes"),
    ],
)
def test_times_are_rounded(seconds: float, text: str) -> None:
    machine = {"machine": {"cores": 2, "gpu": None}}
    assert numbers.about(seconds, machine) == f"{text} on 2 CPU cores"


def test_parse_demo_reads_the_printed_lines() -> None:
    stdout = (
        "Demo: fashion-mnist, 12000 training samples (360 labels corrupted), 2000 validation "
        "samples, 3 epochs.\n"
        "Flagged training labels (360 of 12000 were corrupted):\n"
        "  epoch  0:  380 flagged,  250 of them corrupted\n"
        "  epoch  1:  390 flagged,  280 of them corrupted\n"
        "  epoch  2:  394 flagged,  300 of them corrupted\n"
        "Last epoch: precision 0.76 (300 of 394 flags are corrupted labels), recall 0.83 (300 of "
        "360 corrupted labels found).\n"
    )
    parsed = numbers.parse_demo(stdout)
    assert parsed["dataset"] == "fashion-mnist"
    assert (parsed["train"], parsed["corrupted"], parsed["val"], parsed["epochs"]) == (
        12000,
        360,
        2000,
        3,
    )
    assert (parsed["flagged"], parsed["hits"], parsed["precision"], parsed["recall"]) == (
        394,
        300,
        0.76,
        0.83,
    )
    assert parsed["per_epoch"][-1] == [2, 394, 300]
