"""A default ``SensitivityMonitor()`` on tasks with many positions per sample (tests/tasks.py):
a causal language model, segmentation, token classification and multi-label classification.
Each run completes with no adapter code, logs train and validation curves to TensorBoard, and
writes a positions table whose validation rows are the closed forms of the trained model's
positions, recomputed here."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sens import SensitivityMonitor
from lightning_sens.callbacks import MonitorSetupError
from lightning_sens.callbacks.batches import default_batch_fn
from lightning_sens.core import label_reference, position_scores, read_layout
from lightning_sens.core.inputs import default_forward, found_logits
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.positions import PositionRows
from tests import tasks
from tests.logged import read_logged

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
]

Loaders = tuple[DataLoader, DataLoader]

TASKS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], Loaders], str, int]] = {
    # name: (module, loaders, the layout the monitor reads, valid positions of val sample 0)
    "causal_lm": (tasks.CausalLM, tasks.text_loaders, "multiclass", tasks.LENGTH - 1 - 3),
    "segmentation": (tasks.Segmenter, tasks.mask_loaders, "multiclass", (tasks.SIZE - 2) ** 2),
    "tagger": (tasks.Tagger, tasks.tag_loaders, "multiclass", tasks.LENGTH - 3),
    "multilabel": (tasks.MultiLabel, tasks.multilabel_loaders, "multilabel", 4),
}


def _fit(
    tmp_path: Path, name: str, **options: Any
) -> tuple[pl.Trainer, pl.LightningModule, SensitivityMonitor]:
    make, loaders, _, _ = TASKS[name]
    monitor = SensitivityMonitor(**options)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    pl.seed_everything(0, verbose=False)
    module = make()
    train, val = loaders()
    trainer.fit(module, train, val)
    return trainer, module, monitor


def _table(log_dir: Path) -> list[dict[str, str]]:
    found = sorted(paths.folder(log_dir).glob("positions_epoch*.csv"))
    assert found, f"no positions table under {paths.folder(log_dir)}"
    with found[-1].open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("name", list(TASKS))
def test_a_default_monitor_scores_every_position_and_logs_both_splits(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer, module, monitor = _fit(tmp_path, name)
    _, loaders, task, valid = TASKS[name]
    assert monitor.reader.layout is not None
    assert monitor.reader.layout.task == task
    assert "reads this model's outputs as" in caplog.text
    log_dir = Path(trainer.log_dir or tmp_path)
    logged = read_logged(log_dir)
    for split in ("train", "val"):
        for key in (
            keys.loss(split),
            keys.accuracy(split),
            keys.curve("true", split, "median"),
            keys.upper_curve(split, "median"),
        ):
            assert key in logged.scalars, f"{key} not logged; logged {sorted(logged.scalars)}"
            assert len(logged.values(key)) == 2  # one value per epoch
        assert keys.histogram("true", split) in logged.histograms
    assert keys.gap() in logged.scalars
    assert keys.image("position_map", "val") in logged.images, sorted(logged.images)
    rows = _table(log_dir)
    _train, val = loaders()
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val")}
    assert sorted(int(r["sample"]) for r in by_split["train"]) == list(range(tasks.TRAIN))
    assert [int(r["sample"]) for r in by_split["val"]] == list(range(tasks.VAL))
    # the validation rows are the closed forms of the trained model, recomputed here
    batch = default_batch_fn(next(iter(val)))
    inputs, labels = batch[0], batch[1]
    module.eval()
    with torch.no_grad():
        logits = found_logits(default_forward(module, inputs))
    layout = read_layout(logits, labels, inputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    summary = position_scores(logits, labels, layout, mask).summary(0.9)
    assert int(by_split["val"][0]["positions"]) == valid
    for i, row in enumerate(by_split["val"][: len(labels)]):
        assert int(row["positions"]) == int(summary.count[i])
        assert float(row["log_fi_mean"]) == pytest.approx(float(summary.mean[i]), rel=1e-6)
        assert float(row["log_fi_upper"]) == pytest.approx(float(summary.upper[i]), rel=1e-6)
        assert int(row["worst"]) == int(summary.worst[i])
    # the estimated share of wrong labels against the reference of the batches scored together
    # (the whole validation split: fewer than GROUP_STEPS batches), and the flags
    everything = [default_batch_fn(b) for b in val]
    with torch.no_grad():
        together = [found_logits(default_forward(module, b[0])) for b in everything]
    joined = torch.cat(together)
    all_labels = torch.cat([b[1] for b in everything])
    masks = [b[0].get("attention_mask") if isinstance(b[0], dict) else None for b in everything]
    all_mask = None if masks[0] is None else torch.cat(masks)
    reference = label_reference(joined, all_labels, layout, all_mask)
    assert reference is not None
    scores = position_scores(logits, labels, layout, mask)
    shares = scores.wrong_share(reference)
    label_test = scores.wrong_share(reference, other_class=False)
    for i, row in enumerate(by_split["val"][: len(labels)]):
        assert float(row["wrong_share"]) == pytest.approx(float(shares[i]), abs=1e-12)
        assert float(row["wrong_share_label"]) == pytest.approx(float(label_test[i]), abs=1e-12)
    for split in ("train", "val"):  # the flags are counted where samples are flagged
        assert (keys.flag_count(split) in logged.scalars) == (task != "multilabel"), split
    for row in rows:  # multi-label: the estimates are written, nothing is flagged
        evidence = float(row["evidence"])
        assert (row["flagged"] == "True") == (evidence >= 0.02 and task != "multilabel"), row
        assert math.isnan(float(row["deviation"]))  # no language model here
    # a decision that flags more than a tenth of the samples it judged is warned of, once
    many = set()
    for table in sorted(paths.folder(log_dir).glob("positions_epoch*.csv")):
        with table.open(newline="") as stream:
            decision = list(csv.DictReader(stream))
        for split in ("train", "val"):
            judged = [r for r in decision if r["split"] == split and r["evidence"] != ""]
            judged = [r for r in judged if math.isfinite(float(r["evidence"]))]
            if sum(r["flagged"] == "True" for r in judged) > 0.1 * len(judged):
                many.add(split)
    warned = {
        split
        for split in ("train", "val")
        for w in said
        if f" {split} samples it judged" in str(w.message)
    }
    assert warned == many, (warned, many)
    # per-layer damage from sampled labels, with its standard error, at the first decision
    layer_keys = [k for k in monitor.history[0] if "/kl_noise/" in k]
    assert layer_keys, sorted(monitor.history[0])
    for key in layer_keys:
        se = monitor.history[0][key.replace("/kl_noise/", "/kl_noise_se/")]
        assert 0 <= se < monitor.history[0][key]
    assert sorted(paths.folder(log_dir).glob("layers_epoch*.csv"))
    # training lowers the loss of the positions: the curves follow it
    losses = logged.values(keys.loss("val"))
    assert losses[-1] < losses[0]


def test_an_unreadable_layout_is_refused_at_fit_start_with_the_option_that_fixes_it(
    tmp_path: Path,
) -> None:
    """One-hot targets of a (B, K) model could be a softmax's or a multi-label model's."""

    def one_hot() -> Loaders:
        train, _val = tasks.multilabel_loaders()
        x, y = train.dataset.tensors  # type: ignore[attr-defined]
        hot = torch.nn.functional.one_hot(y.argmax(-1), 4).float()
        data = torch.utils.data.TensorDataset(x, hot)
        return DataLoader(data, batch_size=12), DataLoader(data, batch_size=12)

    TASKS["one_hot"] = (tasks.MultiLabel, one_hot, "multilabel", 4)
    try:
        with pytest.raises(MonitorSetupError, match=r"task='multilabel'"):
            _fit(tmp_path, "one_hot")
        _, _, monitor = _fit(tmp_path / "told", "one_hot", task="multilabel")
        assert monitor.reader.layout is not None
        assert monitor.reader.layout.task == "multilabel"
    finally:
        del TASKS["one_hot"]


def test_evaluate_scores_a_segmentation_checkpoint_and_ranks_its_layers_for_quantisation(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sens.cli import main

    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(tasks.Segmenter(), datamodule=tasks.MaskData())
    out = tmp_path / "eval"
    model = ["--model", "tests.tasks.Segmenter", "--data", "tests.tasks.MaskData"]
    command = ["evaluate", str(tmp_path / "ckpt"), "--output", str(out), "--quantization"]
    assert main([*command, "--measure-damage", "--", *model]) == 0
    table = sorted(paths.folder(out).glob("positions_epoch*.csv"))
    assert len(table) == 1
    with table[0].open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["sample"]) for r in rows if r["split"] == "val"] == list(range(tasks.VAL))
    with (out / "quantization.csv").open(newline="") as stream:
        ranked = list(csv.DictReader(stream))
    assert {r["layer"] for r in ranked} == {"net.0", "net.2"}
    assert {r["estimator"] for r in ranked} == {"sampled (16 draws)"}
    assert all(float(r["measured_kl"]) > 0 for r in ranked)
    assert (out / "report.html").exists()


@pytest.mark.parametrize(
    "make", [tasks.demo_transformer, tasks.demo_lstm], ids=["transformer", "lstm"]
)
def test_lightnings_demo_language_models_run_under_a_default_monitor(
    tmp_path: Path, make: Callable[[], pl.LightningModule], caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning's own demos: a forward(inputs, target) that returns (B·T, V) log-probabilities,
    and a module without forward() whose model returns (log-probabilities, hidden state)."""
    monitor = SensitivityMonitor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    pl.seed_everything(0, verbose=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(make())
    layout = monitor.reader.layout
    assert layout is not None
    assert (layout.flattened, layout.positions) == (True, (12,))
    log_dir = Path(trainer.log_dir or tmp_path)
    rows = _table(log_dir)
    assert sorted({int(r["sample"]) for r in rows}) == list(range(32))
    assert all(int(r["positions"]) == 12 for r in rows)
    logged = read_logged(log_dir)
    assert len(logged.values(keys.curve("true", "train", "median"))) == 2  # each epoch
    if make is tasks.demo_transformer:  # it has a forward: the damage of its fast layers
        assert any("/kl_noise/" in k for k in monitor.history[0]), sorted(monitor.history[0])
    else:
        assert "has no forward()" in caplog.text


def _position_rows(folder: Path) -> list[tuple[int, str, str]]:
    with sorted(paths.folder(folder).glob("positions_epoch*.csv"))[0].open(newline="") as f:
        return [
            (int(r["sample"]), r["positions"], r["log_fi_mean"])
            for r in csv.DictReader(f)
            if r["split"] == "val"
        ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.distributed on some platforms
@pytest.mark.filterwarnings("ignore:.*sync_dist.*")
def test_two_process_ddp_scores_every_mask_once_as_one_process_does(tmp_path: Path) -> None:
    """Each rank scores its shard of 23 masks (one padded); the positions table holds every
    mask once, with the one-process scores."""
    from lightning.pytorch.loggers import TensorBoardLogger

    x, y = tasks.masks(23, seed=4)
    val = DataLoader(torch.utils.data.TensorDataset(x.double(), y), batch_size=6)
    pl.seed_everything(0, verbose=False)
    model = tasks.Segmenter().double()  # float32 convolutions differ with the batch's size
    runs = {}
    for name, strategy, devices in (("single", "auto", 1), ("ddp", "ddp_spawn", 2)):
        trainer = pl.Trainer(
            default_root_dir=tmp_path / name,
            logger=TensorBoardLogger(tmp_path / name, name="tb", version=0),
            callbacks=[SensitivityMonitor(exact_probe_size=0)],
            accelerator="cpu",
            strategy=strategy,
            devices=devices,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(model, val)
        runs[name] = _position_rows(tmp_path / name / "tb" / "version_0")
    assert [sample for sample, _, _ in runs["ddp"]] == list(range(23))
    for (i, count, mean), (j, single_count, single_mean) in zip(
        runs["ddp"], runs["single"], strict=True
    ):
        assert (i, count) == (j, single_count)
        assert float(mean) == pytest.approx(float(single_mean), rel=1e-12, abs=1e-12), i


def _rows(ids: list[int], shares: list[float], label: list[float] | None = None) -> PositionRows:
    """Rows whose estimates by both tests are ``shares``, by the first alone ``label``."""
    n = len(ids)
    zeros = torch.zeros(n, dtype=torch.float64)
    whole = torch.zeros(n, dtype=torch.long)
    return PositionRows(
        torch.tensor(ids), whole + 10, whole + 10, zeros, zeros, zeros, zeros, zeros, zeros, whole,
        torch.tensor(shares, dtype=torch.float64),
        torch.tensor(shares if label is None else label, dtype=torch.float64),
    )  # fmt: skip


def test_a_decision_falls_back_to_the_first_test_where_both_do_not_decide() -> None:
    from lightning_sens.config import MonitorConfig
    from lightning_sens.tracking import SensitivityTracker

    tracker = SensitivityTracker(MonitorConfig(position_flag_share=0.1))
    # both tests: every sample looks wrong (boundaries of masks), the first test alone decides
    evidence, flagged = tracker.decide_positions(
        "val", _rows([0, 1, 2], [0.4, 0.3, 0.5], label=[0.2, 0.0, 0.0])
    )
    assert evidence.tolist() == [0.2, 0.0, 0.0]
    assert flagged.tolist() == [True, False, False]
    # both decide: theirs is used
    evidence, _ = tracker.decide_positions(
        "val", _rows([0, 1, 2], [0.4, 0.0, 0.0], label=[0.0, 0.0, 0.0])
    )
    assert evidence.tolist() == [0.4, 0.0, 0.0]


def test_position_flags_keep_the_evidence_of_the_decided_epochs_only() -> None:
    from lightning_sens.config import MonitorConfig
    from lightning_sens.tracking import SensitivityTracker

    tracker = SensitivityTracker(MonitorConfig(position_flag_share=0.1))
    # the untrained network's epoch: most samples look wrong; it adds nothing, flags nothing
    evidence, flagged = tracker.decide_positions("train", _rows([0, 1, 2], [0.5, 0.3, 0.0]))
    assert torch.isnan(evidence).all()
    assert not flagged.any()
    # decided epochs: each sample's mean over them
    tracker.decide_positions("train", _rows([0, 1, 2, 3], [0.2, 0.0, 0.0, 0.05]))
    evidence, flagged = tracker.decide_positions("train", _rows([2, 1, 0], [0.0, 0.3, 0.0]))
    torch.testing.assert_close(evidence, torch.tensor([0.0, 0.15, 0.1], dtype=torch.float64))
    assert flagged.tolist() == [False, True, True]
    # an undecided epoch leaves the evidence as it was; a sample never seen in a decided one
    # has none
    evidence, flagged = tracker.decide_positions("train", _rows([7, 1], [0.9, 0.9]))
    assert math.isnan(float(evidence[0]))
    assert float(evidence[1]) == pytest.approx(0.15)
    assert flagged.tolist() == [False, True]
    # validation: this decision's estimate, not accumulated; NaN where undecided
    evidence, flagged = tracker.decide_positions("val", _rows([0, 1, 2], [0.3, 0.0, 0.0]))
    assert evidence.tolist() == [0.3, 0.0, 0.0]
    assert flagged.tolist() == [True, False, False]
    evidence, flagged = tracker.decide_positions("val", _rows([0, 1], [0.3, 0.2]))
    assert torch.isnan(evidence).all()
    assert not flagged.any()
    # the evidence is saved with the monitor's state and restored
    state = tracker.state_dict()
    again = SensitivityTracker(MonitorConfig(position_flag_share=0.1))
    assert again.load_state_dict(state) == ""
    evidence, _ = again.decide_positions("train", _rows([1], [0.9]))  # undecided: adds nothing
    assert evidence.tolist() == pytest.approx([0.15])


def test_the_first_decisions_estimates_leave_a_sample_once_a_later_one_scored_it() -> None:
    from lightning_sens.config import MonitorConfig
    from lightning_sens.tracking import SensitivityTracker

    tracker = SensitivityTracker(MonitorConfig(position_flag_share=0.1))
    evidence, _ = tracker.decide_positions("train", _rows([0, 1, 3], [0.5, 0.05, 0.0]))
    assert evidence.tolist() == [0.5, 0.05, 0.0]  # decided: the only estimates there are
    evidence, _ = tracker.decide_positions("train", _rows([0, 2], [0.0, 0.0]))
    assert evidence.tolist() == [0.0, 0.0]  # the first epoch's 0.5 of sample 0 is gone
    evidence, _ = tracker.decide_positions("train", _rows([1], [0.9]))  # undecided
    assert evidence.tolist() == [0.05]  # sample 1: no later decided estimate yet
    tracker.decide_positions("train", _rows([1, 2, 3], [0.0, 0.0, 0.0]))
    assert tracker.position_first is None
    evidence, _ = tracker.decide_positions("train", _rows([0, 1, 2], [0.3, 0.0, 0.0]))
    torch.testing.assert_close(evidence, torch.tensor([0.15, 0.0, 0.0], dtype=torch.float64))


def test_a_sample_without_an_estimate_is_never_flagged() -> None:
    from lightning_sens.config import MonitorConfig
    from lightning_sens.tracking import SensitivityTracker

    tracker = SensitivityTracker(MonitorConfig())
    nan = float("nan")
    evidence, flagged = tracker.decide_positions("train", _rows([0, 1], [nan, nan]))
    assert torch.isnan(evidence).all()
    assert not flagged.any()
    assert tracker.position_evidence is None
