"""lightning_sens.reporting.html: the report lists every flag, counts per split, rounds numbers."""

from __future__ import annotations

import base64
import csv
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lightning_sens.reporting import keys
from lightning_sens.reporting.html import format_number, write_report
from lightning_sens.reporting.tables import write_table

_VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source"}
_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "t<r>"]


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def all(self, tag: str) -> list[Node]:
        found = [self] if self.tag == tag else []
        for child in self.children:
            found += child.all(tag) if isinstance(child, Node) else []
        return found

    def content(self) -> str:
        return "".join(c if isinstance(c, str) else c.content() for c in self.children)


class _Tree(HTMLParser):
    """A strict little DOM: every non-void element must be closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _parse(path: Path) -> Node:
    tree = _Tree()
    tree.feed(path.read_text(encoding="utf-8"))
    tree.close()
    assert tree.doctype.lower() == "doctype html"
    assert [n.tag for n in tree.stack] == ["#root"], "unclosed elements"
    return tree.root


def _table(root: Node, **attrs: str) -> tuple[list[str], list[list[Node]]]:
    """(header texts, rows of cells) of the first table with these attributes."""
    for table in root.all("table"):
        if all(table.attrs.get(k) == v for k, v in attrs.items()):
            heads = [th.content() for th in table.all("th")]
            rows = [row.all("td") for row in table.all("tr") if row.all("td")]
            return heads, rows
    raise AssertionError(f"no table with {attrs}")


def _history_table(root: Node) -> tuple[list[str], list[list[str]]]:
    for table in root.all("table"):
        heads = [th.content() for th in table.all("th")]
        if heads[:3] == ["at", "epoch", "step"]:
            rows = [[td.content() for td in row.all("td")] for row in table.all("tr")[1:]]
            return heads, rows
    raise AssertionError("no per-epoch table")


def _flag_table(path: Path, flagged: dict[str, int], scored: dict[str, int]) -> Path:
    """A real flag table: ``scored[split]`` rows per split, the first ``flagged[split]`` flagged."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for split, count in scored.items():
        for i in range(count):
            p = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.98 + 0.01
            label = int(torch.randint(0, 10, (), generator=g))
            rows.append(
                {
                    "sample": 1000 * list(scored).index(split) + i,
                    "split": split,
                    "epoch": 2,
                    "step": 564,
                    "label": label,
                    "prediction": (label + (i % 3)) % 10,
                    "p_label": p,
                    "fi": (1 - p) / p,
                    "log_fi": math.log((1 - p) / p),
                    "relative_fi": 1.0,
                    "effective_rank": 9,
                    "rank": 9,  # the column's old name
                    "log_fi_mean": math.log((1 - p) / p) / 3 if split == "train" else math.nan,
                    "seen": 3 if split == "train" else 0,
                    "flagged": i < flagged.get(split, 0),
                    "p_bad": p / 7,
                    "flagged_recent": i % 4,
                    "rule": "counterfactual",
                    "cutoff": 1.1830326476223285,
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(rows, path)
    return path


def _history(flagged: dict[str, int], scan: bool = False) -> list[dict[str, float]]:
    history = []
    for epoch in range(3):
        row: dict[str, float] = {"epoch": epoch, "step": 1234 * (epoch + 1)}
        for split in ("train", "val"):
            row[keys.loss(split)] = 1.1830326476223285 / (epoch + 1)
            row[keys.accuracy(split)] = 0.8751234567 - 0.01 * epoch
            row[keys.flag_count(split)] = float(flagged[split] + 2 - epoch)
            row[keys.persistent_count(split)] = float(epoch)
            row[keys.curve("pred", split, "median")] = -3.123456789 - epoch
            row[keys.closed_form_holds(split)] = 1.0
        row[keys.gap()] = 0.0001183032647
        row[keys.estimated_wrong("train")] = 0.1012345678
        if scan:
            row[keys.flag_count("train_all")] = float(flagged["train_all"] + 2 - epoch)
        history.append(row)
    return history


def _report(
    tmp_path: Path,
    flagged: dict[str, int],
    scored: dict[str, int],
    scan: bool = False,
    **kwargs: object,
) -> tuple[Path, list[dict[str, float]]]:
    table = _flag_table(
        tmp_path / "sensitivity" / "flags_epoch0002_step0000564.csv", flagged, scored
    )
    history = _history(flagged, scan)
    checkpoints = [(f"epoch {e}", e, 1234 * (e + 1)) for e in range(3)]
    config = {"flag_rule": "counterfactual", "persistence": 5, "budget": 0.05, "windows": [1, 3]}
    path = tmp_path / "report.html"
    write_report(path, "demo <cifar>", checkpoints, history, [], table, config, **kwargs)  # type: ignore[arg-type]
    return path, history


_FLAGGED = {"train": 44, "val": 1}
_SCORED = {"train": 150, "val": 50}


@pytest.mark.parametrize(
    ("value", "percent", "text"),
    [
        (1234567, False, "1,234,567"),
        (145.0, False, "145"),
        (2000.0, False, "2,000"),
        (0, False, "0"),
        (1.1830326476223285e-05, False, "1.18e-5"),
        ("1.1830326476223285e-05", False, "1.18e-5"),
        (0.123456789, False, "0.1235"),
        (3.14159265, False, "3.142"),
        (-2.5, False, "-2.5"),
        (12345.678, False, "12,346"),
        (0.0012346, False, "0.001235"),
        (math.nan, False, "–"),
        ("nan", False, "–"),
        (None, False, "–"),
        (math.inf, False, "∞"),
        (0.8751234567, True, "87.5%"),
        (1.0, True, "100.0%"),
        (0.0, True, "0.0%"),
        (math.nan, True, "–"),
        ("counterfactual", False, "counterfactual"),
        (True, False, "True"),
    ],
)
def test_format_number(value: object, percent: bool, text: str) -> None:
    assert format_number(value, percent=percent) == text


def test_every_flagged_row_is_listed_and_counts_agree(tmp_path: Path) -> None:
    path, history = _report(tmp_path, _FLAGGED, _SCORED)
    root = _parse(path)
    heads, rows = _table(root, id="flagged")
    assert len(rows) == 45 > 30
    samples = {
        (row[heads.index("split")].content(), row[heads.index("sample")].content()) for row in rows
    }
    expected = {("train", str(i)) for i in range(44)} | {("val", "1000")}
    assert samples == expected
    spans = {
        s.attrs["data-split"]: s.content() for s in root.all("span") if "data-split" in s.attrs
    }
    counts_in_table = {"train": "44", "val": "1"}
    assert spans == counts_in_table
    logged = {s: str(round(history[-1][keys.flag_count(s)])) for s in ("train", "val")}
    assert logged == counts_in_table
    history_heads, history_rows = _history_table(root)
    shown = {s: history_rows[-1][history_heads.index(f"flagged, {s}")] for s in ("train", "val")}
    assert shown == counts_in_table
    sentence = next(p.content() for p in root.all("p") if p.attrs.get("id") == "flag-counts")
    assert "44 of 150 train samples" in sentence
    assert "1 of 50 val samples" in sentence


def test_full_scan_column_only_when_measured(tmp_path: Path) -> None:
    flagged = {**_FLAGGED, "train_all": 3}
    path, _ = _report(tmp_path, flagged, {**_SCORED, "train_all": 300}, scan=True)
    root = _parse(path)
    heads, rows = _history_table(root)
    assert rows[-1][heads.index("flagged, full training-set scan")] == "3"
    spans = {
        s.attrs["data-split"]: s.content() for s in root.all("span") if "data-split" in s.attrs
    }
    assert spans == {"train": "44", "val": "1", "train_all": "3"}
    assert len(_table(root, id="flagged")[1]) == 48

    path, _ = _report(tmp_path / "plain", _FLAGGED, _SCORED)
    heads, rows = _history_table(_parse(path))
    assert not any("full training-set scan" in h for h in heads)
    assert not any(h == "estimated wrong labels, val" for h in heads)
    for column in range(len(heads)):  # no column of dashes
        assert any(row[column] != "–" for row in rows), heads[column]


def test_loss_and_accuracy_columns(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, _FLAGGED, _SCORED)
    heads, rows = _history_table(_parse(path))
    for name in ("loss, train", "loss, val", "accuracy, train", "accuracy, val"):
        assert name in heads
    assert rows[0][heads.index("accuracy, val")] == "87.5%"
    assert rows[0][heads.index("loss, train")] == "1.183"
    assert rows[-1][heads.index("estimated wrong labels, train")] == "10.1%"
    assert rows[-1][heads.index("step")] == "3,702"


def test_no_raw_long_floats(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, _FLAGGED, _SCORED)
    root = _parse(path)
    cells = [td.content() for td in root.all("td")]
    cells += [p.content() for p in root.all("p") if p.attrs.get("id") == "flag-counts"]
    for text in cells:
        for number in re.findall(r"\d+(?:\.\d+)?", text):
            digits = number.replace(".", "").lstrip("0")
            assert len(digits) <= 6, f"{number!r} in {text!r}"


def test_class_names_and_escaping(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, _FLAGGED, _SCORED, class_names=_CLASSES)
    text = path.read_text(encoding="utf-8")
    assert "<cifar>" not in text
    assert "<r>" not in text
    heads, rows = _table(_parse(path), id="flagged")
    for column in ("label", "prediction"):
        shown = {row[heads.index(column)].content() for row in rows}
        assert shown <= set(_CLASSES)
        assert len(shown) > 1


def _image(split: str, sample: int) -> torch.Tensor | None:
    if sample == 0:
        return None
    channels = 1 if split == "train" else 3
    return torch.linspace(-5.0, 7.0, channels * 36).reshape(channels, 6, 6)


def test_thumbnails_are_embedded_png(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, _FLAGGED, _SCORED, thumbnails=_image)
    root = _parse(path)
    heads, rows = _table(root, id="flagged")
    assert heads[0] == "thumbnail"
    images = [img for row in rows for img in row[0].all("img")]
    assert len(images) == 44  # every flagged row but sample 0, which has no image
    for img in images:
        prefix, data = img.attrs["src"].split(",", 1)
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
        assert "thumb" in img.attrs["class"]
    style = "".join(s.content() for s in root.all("style"))
    assert "pixelated" in style
    assert "48px" in style


@pytest.mark.parametrize(
    "failing",
    [
        lambda split, sample: 1 / 0,
        lambda split, sample: torch.zeros(5, 4, 4),  # not C = 1 or 3
        lambda split, sample: torch.zeros(1, 4, 4) if sample % 2 else 1 / 0,
    ],
)
def test_failing_thumbnails_still_write_the_report(
    tmp_path: Path, failing: Callable[[str, int], torch.Tensor | None]
) -> None:
    path, _ = _report(tmp_path, _FLAGGED, _SCORED, thumbnails=failing)
    root = _parse(path)
    _, rows = _table(root, id="flagged")
    assert len(rows) == 45
    notes = [p.content() for p in root.all("p") if "could not be drawn" in p.content()]
    assert len(notes) == 1


def test_sortable_table_is_self_contained(tmp_path: Path) -> None:
    figure = tmp_path / "figures" / "manhattan_val_epoch0002_step0000564.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path, _ = _report(tmp_path, _FLAGGED, _SCORED)
    table = _flag_table(
        tmp_path / "sensitivity" / "flags_epoch0002_step0000564.csv", _FLAGGED, _SCORED
    )
    write_report(path, "t", [("e", 2, 3)], _history(_FLAGGED)[-1:], [figure], table, {})
    root = _parse(path)
    scripts = root.all("script")
    assert len(scripts) == 1
    assert "src" not in scripts[0].attrs
    assert "addEventListener" in scripts[0].content()
    flagged = next(t for t in root.all("table") if t.attrs.get("id") == "flagged")
    assert "sortable" in flagged.attrs["class"]
    heads = {th.content(): th.attrs for th in flagged.all("th")}
    assert heads["log FI"]["data-sort"] == "number"
    assert heads["log FI"]["aria-sort"] == "descending"
    assert heads["split"]["data-sort"] == "text"
    _, rows = _table(root, id="flagged")
    log_fi = [float(row[list(heads).index("log FI")].attrs["data-value"]) for row in rows]
    assert log_fi == sorted(log_fi, reverse=True)
    sources = [n.attrs.get("src", "") for n in root.all("img")] + [
        n.attrs.get("href", "") for n in root.all("link") + root.all("a")
    ]
    assert sources
    assert all(s.startswith("data:") for s in sources if s)


def test_the_table_link_survives_a_moved_folder_and_why_rows_are_flagged(tmp_path: Path) -> None:
    """The link to the flag table is relative to the report (evaluate writes into a partial
    folder and renames it); the flagged rows carry the evidence and p_bad the rule used."""
    path, _ = _report(tmp_path, _FLAGGED, _SCORED)
    text = path.read_text()
    assert f"Every scored sample: {Path('sensitivity', 'flags_epoch0002_step0000564.csv')}" in text
    assert str(tmp_path) not in text
    heads, rows = _table(_parse(path), id="flagged")
    assert {"evidence", "p_bad"} <= set(heads)
    evidence = {row[heads.index("evidence")].content() for row in rows}
    assert "–" in evidence  # the val row: no training steps
    assert len(evidence) > 2  # the train rows: their own means


def test_the_splits_note_says_what_train_is(tmp_path: Path) -> None:
    default, _ = _report(tmp_path / "training", _FLAGGED, _SCORED)
    assert "scored in the training steps" in default.read_text()
    note = "Splits: <em>train</em> is a fixed probe of 256 training samples."
    evaluated, _ = _report(tmp_path / "evaluate", _FLAGGED, _SCORED, splits_note=note)
    assert note in evaluated.read_text()
    assert "scored in the training steps" not in evaluated.read_text()


def test_undecided_classes_are_named(tmp_path: Path) -> None:
    """A class the rule left undecided (its rows have no p_bad) is named in one note per split;
    where the table cannot say which classes the logged count means, the note only counts."""
    table = _flag_table(tmp_path / "flags.csv", {"train": 0, "val": 0}, _SCORED)
    with table.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        if row["split"] == "val" and row["label"] in ("3", "9"):
            row["p_bad"] = "nan"
    write_table(rows, table)
    history = _history({"train": 0, "val": 0})
    history[-1][keys.undecided_classes("val")] = 2.0
    history[-1][keys.undecided_classes("train")] = 1.0
    path = tmp_path / "report.html"
    checkpoints = [(f"epoch {e}", e, 1234 * (e + 1)) for e in range(3)]
    write_report(path, "t", checkpoints, history, [], table, {}, class_names=_CLASSES)
    notes = {
        p.attrs["data-undecided"]: p.content()
        for p in _parse(path).all("p")
        if "data-undecided" in p.attrs
    }
    assert set(notes) == {"train", "val"}
    assert notes["val"].startswith("2 classes (cat, t<r>) of the val samples were undecided")
    assert notes["train"].startswith("1 class of the train samples was undecided")
    history[-1][keys.undecided_classes("val")] = 0.0
    history[-1][keys.undecided_classes("train")] = math.nan
    write_report(path, "t", checkpoints, history, [], table, {}, class_names=_CLASSES)
    assert "data-undecided" not in path.read_text()
