"""Every n-th position of each sample (lightning_sens/core/strided.py,
lightning_sens/callbacks/stride.py): the rows of the positions scored against a float64 brute
force, every position scored once over n epochs, and the stride the monitor chooses from the
measured cost."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from lightning_sens import SensitivityMonitor
from lightning_sens.callbacks.budget import TimeBudget
from lightning_sens.callbacks.stride import (
    MAX_STRIDE,
    MIN_SCORED,
    PART,
    PositionStride,
    least_scored,
)
from lightning_sens.core.layout import read_layout
from lightning_sens.core.strided import stride_positions
from lightning_sens.reporting import paths
from lightning_sens.reporting.positions import position_rows
from tests import tasks

# layout name: (logits, labels, inputs) of a batch of 3 samples, float64
B = 3


def _batch(name: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    g = torch.Generator().manual_seed(7)
    if name == "tokens":  # (B, T, V), a padded tail ignored
        z = 3 * torch.randn(B, 11, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 6, (B, 11), generator=g)
        y[0, -4:] = -100
        return z, y, None, None
    if name == "flattened":  # (B·T, V) with an attention mask
        z = 3 * torch.randn(B * 9, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (B, 9), generator=g)
        mask = torch.ones(B, 9, dtype=torch.long)
        mask[2, :5] = 0
        return z, y, None, mask
    if name == "causal":  # labels are the inputs: the logits at t score the label at t + 1
        z = 3 * torch.randn(B, 10, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 7, (B, 10), generator=g)
        return z, y, y.clone(), None
    if name == "pixels":  # (B, K, H, W): classes first in memory, a 255 border
        z = 3 * torch.randn(B, 4, 5, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (B, 5, 6), generator=g)
        y[:, 0] = 255
        return z, y, None, None
    if name == "binary":  # (B, 1, H, W): one sigmoid per pixel
        z = 3 * torch.randn(B, 1, 4, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (B, 4, 7), generator=g).double()
        return z, y, None, None
    raise KeyError(name)


LAYOUTS = ("tokens", "flattened", "causal", "pixels", "binary")


def _brute(
    z: Tensor, y: Tensor, inputs: Tensor | None, mask: Tensor | None, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per position, in float64 by definition: log FI = log Σ_{k≠y} e^{z_k} − z_y (a sigmoid:
    the two-class softmax of (0, z)), −log p_y, and whether it counts; ``(B, P)`` each, after
    the causal shift."""
    if name == "flattened":
        z = z.reshape(B, -1, z.shape[-1])
    if name == "pixels":
        z = z.movedim(1, -1).reshape(B, -1, z.shape[1])
    if name == "binary":
        z = z.reshape(B, -1, 1)
        z = torch.cat([torch.zeros_like(z), z], -1)
    labels = y.reshape(B, -1).long()
    valid = (labels != -100) & (labels != 255)
    if mask is not None:
        valid &= mask.bool()
    if inputs is not None:
        z, labels, valid = z[:, :-1], labels[:, 1:], valid[:, 1:]
    safe = labels.clamp(0, z.shape[-1] - 1)
    own = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, safe.unsqueeze(-1), float("-inf"))
    log_fi = torch.logsumexp(others, -1) - own
    loss = torch.logsumexp(z, -1) - own
    return log_fi, loss, valid


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_strided_rows_are_those_of_the_positions_kept(name: str, stride: int) -> None:
    z, y, inputs, mask = _batch(name)
    layout = read_layout(z, y, inputs)
    ids, turn = torch.tensor([5, 0, 2]), 3
    rows = position_rows(ids, y, z, layout, mask, 0.9, stride, turn)
    log_fi, loss, valid = _brute(z, y, inputs, mask, name)
    P = log_fi.shape[1]
    for b in range(B):
        kept = [t for t in range((int(ids[b]) + turn) % stride, P, stride) if valid[b, t]]
        assert int(rows.positions[b]) == int(valid[b].sum())
        assert int(rows.scored[b]) == len(kept)
        chosen = log_fi[b, kept]
        torch.testing.assert_close(rows.log_fi_mean[b], chosen.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows.loss[b], loss[b, kept].mean(), rtol=1e-12, atol=1e-12)
        upper = torch.quantile(chosen, 0.9)
        torch.testing.assert_close(rows.log_fi_upper[b], upper, rtol=1e-12, atol=1e-12)
        total = torch.logsumexp(chosen, 0) + math.log(int(valid[b].sum()) / len(kept))
        torch.testing.assert_close(rows.log_fi_total[b], total, rtol=1e-12, atol=1e-12)
        assert int(rows.worst[b]) == kept[int(chosen.argmax())]


@pytest.mark.parametrize("name", LAYOUTS)
def test_stride_epochs_score_every_position_once(name: str) -> None:
    """Over ``stride`` turns the positions kept are every position once: the sums of the
    turns' rows are the sums over all positions."""
    z, y, inputs, mask = _batch(name)
    layout = read_layout(z, y, inputs)
    ids, stride = torch.tensor([4, 9, 1]), 3
    every = position_rows(ids, y, z, layout, mask)
    turns = [position_rows(ids, y, z, layout, mask, 0.9, stride, turn) for turn in range(stride)]
    assert torch.equal(sum(r.scored for r in turns), every.scored)
    summed = sum(r.log_fi_mean.nan_to_num() * r.scored for r in turns)
    torch.testing.assert_close(summed, every.log_fi_mean * every.scored, rtol=1e-12, atol=1e-12)
    for turn in range(stride):
        kept = stride_positions(z, y, layout, mask, ids + turn, stride)
        assert kept.mask.sum() == turns[turn].scored.sum()
    index = torch.cat(
        [stride_positions(z, y, layout, None, ids + t, stride).index for t in (0, 1, 2)], 1
    )
    P = _brute(z, y, inputs, mask, name)[0].shape[1]
    for b in range(B):
        assert sorted(set(index[b].tolist())) == list(range(P))


def test_multilabel_outputs_are_not_strided() -> None:
    z = torch.randn(4, 6, dtype=torch.float64)
    y = (torch.rand(4, 6) > 0.5).double()
    layout = read_layout(z, y, task="multilabel")
    with pytest.raises(ValueError, match="multilabel"):
        stride_positions(z, y, layout, None, torch.zeros(4, dtype=torch.long), 2)
    rows = position_rows(torch.arange(4), y, z, layout, None, 0.9, 4, 1)
    assert rows.scored.tolist() == [6] * 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(stride: PositionStride, budget: TimeBudget, clock: Clock, cost: float, n: int) -> None:
    """``n`` training steps of 1 s each whose scores cost ``cost`` s at stride 1, ``cost /
    stride`` + 1 % fixed at stride n (charged to the budget's part as the monitor does)."""
    for _ in range(n):
        clock.now += 1.0
        seconds = cost / stride.stride + 0.01
        with budget.timed("training steps"):
            clock.now += seconds
        stride.step(10_000)


@pytest.mark.parametrize(("cost", "expected"), [(0.01, 1), (0.05, 4), (0.2, 16), (5.0, MAX_STRIDE)])
def test_the_stride_is_the_smallest_power_of_two_that_fits_half_the_budget(
    cost: float, expected: int
) -> None:
    clock, said = Clock(), []
    budget = TimeBudget(0.05, clock)
    budget.start()
    stride = PositionStride(None, budget, "training steps", lambda key, text: said.append(text))
    _steps(stride, budget, clock, cost, 200)
    assert stride.settled
    assert stride.stride == expected
    assert stride.full == pytest.approx(cost + 0.01, rel=1e-9)
    if expected == 1:
        assert said == []
        return
    (line,) = said
    assert f"every {expected}th position" in line
    assert f"{stride.full * 100:.2g} %" in line
    assert f"{PART * 0.05 * 100:.2g} %" in line
    fits = (cost / expected + 0.01) <= PART * 0.05
    assert ("still takes" in line) == (not fits)


def test_a_fixed_stride_or_no_budget_is_kept() -> None:
    for fixed, share, expected in ((2, 0.05, 2), (None, None, 1)):
        clock = Clock()
        budget = TimeBudget(share, clock)
        budget.start()
        stride = PositionStride(fixed, budget, "training steps", lambda key, text: None)
        _steps(stride, budget, clock, 5.0, 100)
        assert stride.stride == expected


def test_the_stride_leaves_enough_positions_of_a_sample() -> None:
    stride = PositionStride(None, TimeBudget(0.05), "training steps", lambda key, text: None)
    assert [stride.largest(p) for p in (10, 32, 63, 64, 784, 10**6)] == [1, 2, 2, 4, 32, 64]
    # where labels are judged, one position that looks wrong must not reach the cut alone
    assert least_scored("labels", 0.02) == 200
    assert least_scored("labels", 0.5) == MIN_SCORED
    assert least_scored("ranking", 0.02) == MIN_SCORED
    assert [stride.largest(p, 200) for p in (64, 784, 512 * 512)] == [1, 2, 64]
    # a language model's documents are compared by their loss over every token
    assert [stride.largest(p, least_scored("documents", 0.02)) for p in (64, 10**6)] == [1, 1]


def _fit_masks(
    folder: Path, monitor: SensitivityMonitor, x: Tensor, y: Tensor
) -> tuple[pl.Trainer, pl.LightningModule]:
    """Two epochs of the small segmenter on 200 masks (batches of 4: 50 steps, enough for the
    stride's measurements), validated on 40."""
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:200], y[:200]), batch_size=4, shuffle=True
    )
    held = torch.utils.data.TensorDataset(x[200:], y[200:])
    trainer = pl.Trainer(
        default_root_dir=folder,
        max_epochs=2,
        accelerator="cpu",
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(folder),
    )
    pl.seed_everything(0, verbose=False)
    module = tasks.Segmenter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # an untrained model's many flags are warned of
        trainer.fit(module, train, torch.utils.data.DataLoader(held, batch_size=8))
    return trainer, module


def test_a_monitor_whose_scores_exceed_the_budget_scores_every_nth_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A monitor with a budget that the scores of this small model exceed from the first
    steps: the masks' positions are strided (8 × 8 masks: at most every 4th, as a flag share of
    0.5 lets the stride leave 16 positions), the line says so, and the table's rows are the
    closed forms of the positions kept. At the default flag share (200 positions left) the
    masks are scored whole."""
    x, y = tasks.masks(240, seed=0)
    whole = SensitivityMonitor(budget=1e-4)
    _fit_masks(tmp_path / "whole", whole, x, y)
    assert whole.reader.stride == 1
    monitor = SensitivityMonitor(budget=1e-4, position_flag_share=0.5)
    with caplog.at_level(logging.INFO):
        trainer, module = _fit_masks(tmp_path / "strided", monitor, x, y)
    assert monitor.reader.stride == 4
    assert "scores every 4th position of each sample" in caplog.text
    assert "to leave 16 positions of a sample" in caplog.text
    found = sorted(paths.folder(Path(trainer.log_dir or tmp_path)).glob("positions_epoch*.csv"))
    with found[-1].open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r["split"] == "val"]
    module.eval()
    with torch.no_grad():
        z = module(x[200:])
    layout = read_layout(z, y[200:])
    ids = torch.arange(40)
    expected = position_rows(ids, y[200:], z.double(), layout, None, 0.9, 4, 1)
    assert len(rows) == 40
    for i, row in enumerate(rows):
        assert int(row["sample"]) == i
        assert int(row["positions"]) == 36
        assert int(row["scored"]) == int(expected.scored[i])
        assert float(row["log_fi_mean"]) == pytest.approx(float(expected.log_fi_mean[i]), rel=1e-5)
        assert int(row["worst"]) == int(expected.worst[i])


def test_a_fixed_position_stride_is_kept_from_the_first_step(tmp_path: Path) -> None:
    """``position_stride=2``: every second position from the first step on, whatever the cost,
    and the validation rows are those of position_rows with that stride and the epoch's turn."""
    train, val = tasks.mask_loaders()
    monitor = SensitivityMonitor(position_stride=2, budget=None)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path),
    )
    pl.seed_everything(0, verbose=False)
    module = tasks.Segmenter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert monitor.reader.stride == 2
    tables = sorted(paths.folder(Path(trainer.log_dir or tmp_path)).glob("positions_epoch*.csv"))
    assert len(tables) == 2
    for epoch, table in enumerate(tables):
        with table.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert {int(r["scored"]) for r in rows} <= {18}  # 36 valid pixels, every second
        if epoch == 1:
            x, y = next(iter(val))
            module.eval()
            with torch.no_grad():
                z = module(x).double()
            ids = torch.arange(len(y))
            want = position_rows(ids, y, z, read_layout(z, y), None, 0.9, 2, epoch)
            got = [r for r in rows if r["split"] == "val"][: len(y)]
            for i, row in enumerate(got):
                assert float(row["log_fi_mean"]) == pytest.approx(
                    float(want.log_fi_mean[i]), rel=1e-5
                )
                assert int(row["worst"]) == int(want.worst[i])


def test_the_buffer_scores_small_batches_together_and_large_ones_at_once() -> None:
    """Small batches are kept and scored as one group (one reference for all of them); a batch
    with a quarter of GROUP_ENTRIES logits is scored at once, as position_rows scores it."""
    from lightning_sens.callbacks.position_buffer import GROUP_ENTRIES, PositionBuffer
    from lightning_sens.core.references import label_reference
    from lightning_sens.core.strided import Strided
    from lightning_sens.reporting.positions import strided_rows

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = [torch.randint(0, 4, (2, 5), generator=g) for _ in range(3)]
    layout = read_layout(batches[0], labels[0])
    buffer = PositionBuffer()
    for i, (z, y) in enumerate(zip(batches, labels, strict=True)):
        buffer.add(torch.arange(2 * i, 2 * i + 2), y, z, layout, None, 2, 1)
    rows = buffer.rows()
    assert rows is not None
    ids = torch.arange(6)
    kept = Strided.cat(
        [
            stride_positions(z, y, layout, None, ids[2 * i : 2 * i + 2] + 1, 2)
            for i, (z, y) in enumerate(zip(batches, labels, strict=True))
        ]
    )
    want = strided_rows(ids, kept)
    assert torch.equal(rows.ids, ids)
    torch.testing.assert_close(rows.wrong_share, want.wrong_share, rtol=0, atol=0)
    torch.testing.assert_close(rows.log_fi_mean, want.log_fi_mean, rtol=0, atol=0)
    joined = label_reference(kept.logits, kept.labels, kept.layout, kept.mask)
    alone = label_reference(batches[0], labels[0], layout)
    assert joined is not None
    assert alone is not None
    assert not torch.equal(joined.wrong, alone.wrong)  # the group's reference, not a batch's
    # a large batch: scored at once, every position where it lies
    V = GROUP_ENTRIES // 4 // 8 + 1
    big = torch.randn(2, 4, V, generator=g)
    tokens = torch.randint(0, V, (2, 4), generator=g)
    large = read_layout(big, tokens)
    buffer.add(torch.tensor([7, 8]), tokens, big, large, None)
    assert buffer._kept == []
    found = buffer.rows()
    assert found is not None
    torch.testing.assert_close(
        found.log_fi_mean, position_rows(torch.tensor([7, 8]), tokens, big, large).log_fi_mean
    )
