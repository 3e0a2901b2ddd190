"""Language models' flags: documents the model finds unlike the rest, by how far their loss
(log perplexity) lies above the other documents' in robust standard deviations
(docs/tasks.md, "Flags: which samples' labels look wrong"). The deviation against a numpy brute
force, the tracker's evidence across decisions, and a default monitor on a language model with
a vocabulary above the label rule's limit that finds planted random documents."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_sens import SensitivityMonitor
from lightning_sens.config import MonitorConfig
from lightning_sens.core.layout import OutputLayout
from lightning_sens.core.references import MAX_FLAG_CLASSES, flag_kind
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.positions import (
    MIN_DOCUMENTS,
    STRETCH,
    PositionRows,
    document_deviation,
)
from lightning_sens.tracking import SensitivityTracker
from tests.logged import read_logged

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
]


def _brute_deviation(loss: np.ndarray, stretch: int | None = None) -> np.ndarray:
    """(x − median) / (1.4826 · MAD) over the finite values, each first less the median of the
    ``stretch`` values around it (``stretch // 2`` before) where given; medians of an even
    count are the lower middle value, as torch's."""

    def median(v: np.ndarray) -> float:  # the lower middle value for an even count
        v = np.sort(v[np.isfinite(v)])
        return float(v[(len(v) - 1) // 2])

    x = loss.copy()
    if stretch is not None:
        lo = stretch // 2
        x = x - np.array([median(loss[max(0, i - lo) : i - lo + stretch]) for i in range(len(x))])
    med = median(x)
    return (x - med) / (1.4826 * median(np.abs(x - med)))


def test_document_deviation_is_the_modified_z_score_of_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(301, generator=g, dtype=torch.float64) * 3 + 1
    loss[[5, 77]] = float("nan")  # documents without a valid position
    before = loss.clone()
    found = document_deviation(loss)
    expected = _brute_deviation(loss.numpy())
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-12, equal_nan=True)
    assert torch.isnan(found[[5, 77]]).all()
    torch.testing.assert_close(loss, before, equal_nan=True)  # not modified in place


def test_the_training_split_is_compared_with_its_own_stretch_of_steps() -> None:
    """A model that learns during the epoch: the loss falls with the step. Against the whole
    epoch the first steps' documents stand out; against the documents around each only the
    planted one."""
    n = 4000
    g = torch.Generator().manual_seed(1)
    steps = torch.arange(n, dtype=torch.float64)
    # from log V = 7.6 nats, fast then slow (64 documents a step, a time constant of 10 steps),
    # documents spread by 0.4 nats
    loss = 3.0 + 4.6 * torch.exp(-steps / 640) + 0.4 * torch.randn(n, generator=g).double()
    loss[900] += 3.0  # unlike the documents around it
    whole = document_deviation(loss)
    assert int((whole >= 3.5).sum()) > 100  # the young network's documents
    found = document_deviation(loss, STRETCH)
    expected = _brute_deviation(loss.numpy(), STRETCH)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-12)
    assert float(found[900]) > 7
    others = torch.cat([found[:900], found[901:]])
    assert int((others >= 3.5).sum()) <= 4  # a normal tail: 0.02 % beyond 3.5


def test_too_few_documents_say_nothing() -> None:
    loss = torch.arange(MIN_DOCUMENTS - 1, dtype=torch.float64)
    assert torch.isnan(document_deviation(loss)).all()
    assert torch.isfinite(document_deviation(torch.arange(MIN_DOCUMENTS + 0.0))).all()


@pytest.mark.parametrize(
    ("layout", "classes", "kind"),
    [
        (OutputLayout("multiclass", -1, (32,)), MAX_FLAG_CLASSES, "labels"),
        (OutputLayout("multiclass", -1, (32,)), MAX_FLAG_CLASSES + 1, "documents"),
        (OutputLayout("multiclass", 1, (8, 8)), 11, "labels"),
        (OutputLayout("binary", None, (8, 8)), 1, "labels"),
        (OutputLayout("multilabel", None, (5,)), 5, "ranking"),
    ],
)
def test_what_the_flags_find_follows_the_layout_and_the_classes(
    layout: OutputLayout, classes: int, kind: str
) -> None:
    assert flag_kind(layout, classes) == kind


def _rows(ids: list[int], loss: list[float]) -> PositionRows:
    n = len(ids)
    zeros = torch.zeros(n, dtype=torch.float64)
    whole = torch.zeros(n, dtype=torch.long)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    return PositionRows(
        torch.tensor(ids), whole + 10, whole + 10, torch.tensor(loss, dtype=torch.float64),
        zeros, zeros, zeros, zeros, zeros, whole, nan, nan,
    )  # fmt: skip


def _decide(tracker: SensitivityTracker, split: str, rows: PositionRows) -> tuple[Tensor, ...]:
    deviation = tracker.deviation(split, rows)
    return (deviation, *tracker.decide_positions(split, rows, deviation))


def test_a_documents_evidence_is_its_deviation_averaged_over_the_decisions() -> None:
    tracker = SensitivityTracker(MonitorConfig())
    tracker.flag_kind = "documents"
    ids = list(range(40))
    base = [2.0 + 0.1 * (i % 7) for i in ids]  # median 2.3, MAD 0.2
    # the first decision (in step order): document 3 looks unlike the rest
    first = base.copy()
    first[3] = 9.0
    tracker.fold_positions(_rows(ids[::-1], first[::-1]))  # the steps' order, not the ids'
    rows = tracker.gather_positions()["train"]
    assert rows.ids.tolist() == ids
    deviation, evidence, flagged = _decide(tracker, "train", rows)
    expected = torch.from_numpy(_brute_deviation(np.array(first)))
    torch.testing.assert_close(deviation, expected)
    torch.testing.assert_close(evidence, expected)
    assert torch.nonzero(flagged).flatten().tolist() == [3]
    # a later decision scores 3 again like the rest: the first decision's estimate leaves
    second = base.copy()
    second[5] = 9.0
    tracker.fold_positions(_rows(ids, second))
    deviation, evidence, flagged = _decide(tracker, "train", tracker.gather_positions()["train"])
    torch.testing.assert_close(evidence, deviation)
    assert torch.nonzero(flagged).flatten().tolist() == [5]
    # a third: the mean of the second and third decisions
    third = base.copy()
    tracker.fold_positions(_rows(ids, third))
    deviation, evidence, flagged = _decide(tracker, "train", tracker.gather_positions()["train"])
    before = torch.from_numpy(_brute_deviation(np.array(second)))
    torch.testing.assert_close(evidence, (before + deviation) / 2)
    assert flagged.tolist() == (evidence >= 3.5).tolist()
    # validation: this decision's deviation against the whole split, not accumulated
    val = base.copy()
    val[0] = 9.0
    deviation, evidence, flagged = _decide(tracker, "val", _rows(ids, val))
    torch.testing.assert_close(evidence, torch.from_numpy(_brute_deviation(np.array(val))))
    assert torch.nonzero(flagged).flatten().tolist() == [0]
    # too few documents: no deviation, nothing flagged, the evidence unchanged
    deviation, evidence, flagged = _decide(tracker, "val", _rows(ids[:5], val[:5]))
    assert torch.isnan(deviation).all()
    assert torch.isnan(evidence).all()
    assert not flagged.any()


def test_label_models_have_no_deviation() -> None:
    tracker = SensitivityTracker(MonitorConfig())
    rows = _rows(list(range(30)), [1.0] * 29 + [9.0])
    assert torch.isnan(tracker.deviation("val", rows)).all()


# -- a default monitor on a language model above the label rule's vocabulary -----------------

VOCAB, LENGTH, TRAIN, VAL, RANDOM = MAX_FLAG_CLASSES + 76, 12, 96, 40, (7, 40, 81)


class Counting(Dataset):
    """Arithmetic sequences of the first 16 token ids (learnable); the documents ``RANDOM`` of
    the training set are random tokens of the whole vocabulary instead (unlike the rest)."""

    def __init__(self, size: int, seed: int, random: tuple[int, ...] = ()) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 16, (size, 1), generator=g)
        step = torch.randint(1, 3, (size, 1), generator=g)
        self.ids = (start + step * torch.arange(LENGTH + 1)) % 16
        for i in random:
            self.ids[i] = torch.randint(0, VOCAB, (LENGTH + 1,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.ids[i, :-1], self.ids[i, 1:]


class Counter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.rnn = torch.nn.GRU(32, 32, batch_first=True)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0])  # (B, T, V)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).transpose(1, 2), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x).transpose(1, 2), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_default_monitor_flags_the_documents_unlike_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = SensitivityMonitor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=6,
        accelerator="cpu",
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    pl.seed_everything(0, verbose=False)
    train = DataLoader(Counting(TRAIN, 0, RANDOM), batch_size=16, shuffle=True)
    val = DataLoader(Counting(VAL, 1), batch_size=16)
    with caplog.at_level(logging.INFO):
        trainer.fit(Counter(), train, val)
    assert monitor.tracker.flag_kind == "documents"
    assert "flags the documents whose loss (log perplexity)" in caplog.text
    log_dir = Path(trainer.log_dir or tmp_path)
    tables = sorted(paths.folder(log_dir).glob("positions_epoch*.csv"))
    assert len(tables) == 6
    with tables[-1].open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val")}
    # validation: this decision's deviation of the loss column, recomputed here
    loss = torch.tensor([float(r["loss"]) for r in by_split["val"]], dtype=torch.float64)
    expected = document_deviation(loss)
    for row, value in zip(by_split["val"], expected.tolist(), strict=True):
        assert float(row["deviation"]) == pytest.approx(value, rel=1e-9, abs=1e-9)
        assert float(row["evidence"]) == pytest.approx(value, rel=1e-9, abs=1e-9)
    for row in rows:
        evidence = float(row["evidence"])
        assert (row["flagged"] == "True") == (evidence >= 3.5), row
        assert math.isnan(float(row["wrong_share"]))
    # the planted random documents are flagged, and nothing else
    flagged = sorted(int(r["sample"]) for r in by_split["train"] if r["flagged"] == "True")
    assert flagged == list(RANDOM)
    logged = read_logged(log_dir)
    assert logged.values(keys.flag_count("train"))[-1] == len(RANDOM)
