"""SensitivityMonitor in real, tiny Trainer runs; TensorBoard events and tables read back."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import MonitorConfig, SensitivityMonitor, sensitivity
from lightning_sens.callbacks import MonitorSetupError
from lightning_sens.damage import predict_damage
from lightning_sens.demos.tiny import CLASSES
from lightning_sens.demos.tiny import TinyClassifier as TinyNet
from lightning_sens.demos.tiny import tiny_loaders as _loaders
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.summary import split_scores
from tests.logged import epoch_table, read_logged

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),  # few-batch and worker hints
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _trainer(
    tmp_path: Path, callbacks: list[pl.Callback], logger: object = None, epochs: int = 2
) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        logger=logger if logger is not None else TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=callbacks,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        log_every_n_steps=1,
    )


# budget=None: every part every epoch, so that what these tests read does not depend on timing
SMALL = MonitorConfig(
    train_probe_size=32,
    exact_probe_size=6,
    windows=(1, 3),
    flag_rule="top_k",
    top_k=3,
    budget=None,
)


def test_logs_every_documented_scalar_and_the_flag_tables(tmp_path: Path) -> None:
    pl.seed_everything(0)
    monitor = SensitivityMonitor(SMALL)
    train, val = _loaders()
    _trainer(tmp_path, [monitor]).fit(TinyNet(), train, val)

    logged = read_logged(tmp_path / "tb" / "version_0")
    assert logged.runs == {"train", "val"}  # one TensorBoard run per split, the same tags
    scalars = set(logged.scalars)
    expected = {
        keys.curve(t, s, stat) for t in keys.TARGETS for s in keys.SPLITS for stat in keys.STATS
    }
    expected.add(keys.gap())
    for split in keys.SPLITS:
        expected |= {
            keys.closed_form_holds(split),
            keys.flag_count(split),
            keys.persistent_count(split),
            keys.loss(split),
            keys.accuracy(split),
            keys.layers_at_closed_form(split),
            keys.map_relative(split, 1),
        }
        expected |= {keys.layer_kl_noise(split, layer) for layer in ("net.0", "net.1", "net.4")}
        expected |= {keys.layer_kl_quant(split, layer, 4) for layer in ("net.0", "net.4")}
    missing = expected - scalars
    assert not missing, sorted(missing)
    assert len(logged.scalars[keys.curve("pred", "val", "median")]) == 2  # one per epoch
    steps = logged.steps(keys.curve("pred", "val", "median"))
    assert steps == sorted(steps)
    assert steps[0] > 0
    assert {keys.histogram(t, s) for t in keys.TARGETS for s in keys.SPLITS} <= logged.histograms
    assert keys.config() in logged.texts  # the configuration, as text: no hparams, no hp_metric
    assert not any("hp_metric" in key for key in scalars)
    for split in keys.SPLITS:
        for name in ("manhattan", "flagged", "layer_heatmap", "layer_strip", "fi_maps"):
            assert keys.image(name, split) in logged.images, (name, split)
    assert logged.images[keys.image("layer_heatmap", "val")] == 2
    assert logged.values(keys.flag_count("val")) == [3.0, 3.0]  # top_k = 3

    for epoch in (0, 1):
        with epoch_table(tmp_path / "tb" / "version_0", "flags", epoch).open() as f:
            rows = list(csv.DictReader(f))
        val_rows = [r for r in rows if r["split"] == "val"]
        train_rows = [r for r in rows if r["split"] == "train"]
        assert sorted(int(r["sample"]) for r in val_rows) == list(range(32))
        # every training sample, scored in its training step, once per epoch; the first
        # epoch's step leaves the evidence once the second epoch scored the sample
        assert sorted(int(r["sample"]) for r in train_rows) == list(range(64))
        assert all(int(r["seen"]) == max(epoch, 1) for r in train_rows)
        assert all(math.isfinite(float(r["log_fi_mean"])) for r in train_rows)
        assert all(r["seen"] == "0" and r["log_fi_mean"] == "nan" for r in val_rows)
        assert sum(r["flagged"] == "True" for r in val_rows) == 3
        for r in val_rows:
            p = float(r["p_label"])
            assert float(r["fi"]) == pytest.approx((1 - p) / p, rel=1e-9)
        ranked = [r for r in rows if r["effective_rank"] != "-1"]
        assert len(ranked) == 12  # exact probes of both splits
        assert all(int(r["effective_rank"]) == CLASSES - 1 for r in ranked)  # 64 pixels ≫ K − 1


def test_training_is_unchanged_by_the_monitor(tmp_path: Path) -> None:
    weights = []
    for callbacks in ([], [SensitivityMonitor(SMALL)]):
        pl.seed_everything(0)
        model = TinyNet()
        train, val = _loaders()
        _trainer(tmp_path / str(len(callbacks)), callbacks).fit(model, train, val)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_second_forward_when_the_step_returns_no_logits(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL)
    model = TinyNet(return_logits=False)
    _trainer(tmp_path, [monitor], epochs=1).fit(model, train, val)
    batches = list(val)  # the validation set, scored from the trained model's eval forward
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    want = log_fi_summary(split_scores(torch.arange(len(labels)), labels, logits).log_fi_true)
    got = monitor.history[-1]
    for stat in ("median", "mean", "q99"):
        assert got[keys.curve("true", "val", stat)] == pytest.approx(want[stat], rel=1e-6), stat


def test_other_loggers_get_the_scalars(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _trainer(tmp_path, [SensitivityMonitor(SMALL)], logger=logger, epochs=1).fit(
        TinyNet(), train, val
    )
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        header = next(csv.reader(f))
    assert keys.curve("pred", "val", "q90") in header
    assert keys.flag_count("train") in header  # the keys as they are: the split in the key
    assert epoch_table(tmp_path / "csv" / "version_0", "flags", 0).exists()
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "sensitivity/flag_rule: top_k" in hparams  # the configuration, where kept as hparams


def test_failures_warn_and_skip_or_raise_when_strict(tmp_path: Path) -> None:
    def broken(batch: object) -> tuple[Tensor, Tensor, None]:
        raise RuntimeError("broken batch_fn")

    train, val = _loaders()
    # broken from the start: a setup error, raised before the first step whatever strict says
    with pytest.raises(MonitorSetupError, match=r"first train batch with batch_fn.*broken"):
        _trainer(tmp_path, [SensitivityMonitor(SMALL, batch_fn=broken)], epochs=1).fit(
            TinyNet(), train, val
        )

    def later(strict: bool) -> SensitivityMonitor:
        calls = 0

        def fails_after_the_check(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, None]:
            nonlocal calls
            calls += 1
            if calls > 2:  # the setup check reads one training and one validation batch
                raise RuntimeError("broken batch_fn")
            return batch[0], batch[1], None

        return SensitivityMonitor(SMALL, batch_fn=fails_after_the_check, strict=strict)

    monitor = later(strict=False)
    with (
        pytest.warns(UserWarning, match="stopped scoring the training steps.*broken batch_fn"),
        pytest.warns(UserWarning, match="skipped the monitoring of epoch 0.*broken batch_fn"),
    ):
        _trainer(tmp_path, [monitor], epochs=1).fit(TinyNet(), train, val)
    assert monitor.history == []
    with pytest.raises(RuntimeError, match="broken batch_fn"):
        _trainer(tmp_path, [later(strict=True)], epochs=1).fit(TinyNet(), train, val)


def test_bad_configuration_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer, got 0"):
        SensitivityMonitor(every_n_epochs=0)
    rules = r"\('counterfactual', 'counterfactual_pairs', 'mad', 'top_k'\)"
    with pytest.raises(ValueError, match=rf"flag_rule must be one of {rules}"):
        SensitivityMonitor(flag_rule="zscore")
    with pytest.raises(ValueError, match="windows must be odd"):
        SensitivityMonitor(windows=(2,))
    with pytest.raises(TypeError, match=r"unknown options \['every_epoch'\]"):
        SensitivityMonitor(every_epoch=1)


def _fit_and_save(tmp_path: Path, epochs: int) -> tuple[SensitivityMonitor, Path]:
    """A monitored run of ``epochs`` epochs and its final checkpoint."""
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL)
    trainer = _trainer(tmp_path, [monitor], epochs=epochs)
    trainer.fit(TinyNet(), train, val)
    checkpoint = tmp_path / f"{epochs}_epochs.ckpt"
    trainer.save_checkpoint(checkpoint)
    return monitor, checkpoint


def test_post_hoc_validate_from_a_checkpoint_and_state_round_trip(tmp_path: Path) -> None:
    monitor, checkpoint = _fit_and_save(tmp_path, epochs=1)
    _, val = _loaders()
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][monitor.state_key]
    assert saved["probes"]["train"] == monitor.tracker.probes["train"].tolist()

    fresh = SensitivityMonitor(SMALL)
    _trainer(tmp_path / "post", [fresh], epochs=1).validate(TinyNet(), val, ckpt_path=checkpoint)
    assert fresh.history, "validate(ckpt_path=...) must monitor"
    trained, again = monitor.history[-1], fresh.history[-1]
    compared = [k for k in trained if keys.route(k)[0] == "val"]
    assert keys.curve("true", "val", "q99") in compared
    assert keys.closed_form_holds("val") in compared  # the exact probe: the same samples
    for key in compared:  # the checkpoint's weights: the values of the training run's epoch
        assert again[key] == trained[key], key


def _val_rows(folder: Path) -> list[tuple[int, str]]:
    with epoch_table(folder, "flags", 0).open() as f:
        return [(int(r["sample"]), r["log_fi"]) for r in csv.DictReader(f) if r["split"] == "val"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.distributed on some platforms
@pytest.mark.filterwarnings("ignore:.*sync_dist.*")
def test_two_process_ddp_equals_one_process(tmp_path: Path) -> None:
    """Each rank scores its shard; gathered by sample id, de-duplicated (31 samples: one padded)."""
    g = torch.Generator().manual_seed(3)
    val = DataLoader(
        TensorDataset(
            torch.randn(31, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (31,), generator=g)
        ),
        batch_size=8,
    )
    pl.seed_everything(0)
    model = TinyNet()
    runs = {}
    for name, strategy, devices in (("single", "auto", 1), ("ddp", "ddp_spawn", 2)):
        trainer = pl.Trainer(
            default_root_dir=tmp_path / name,
            logger=TensorBoardLogger(tmp_path / name, name="tb", version=0),
            callbacks=[SensitivityMonitor(SMALL)],
            accelerator="cpu",
            strategy=strategy,
            devices=devices,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(model, val)
        runs[name] = _val_rows(tmp_path / name / "tb" / "version_0")
    assert [sample for sample, _ in runs["ddp"]] == list(range(31))
    assert runs["ddp"] == runs["single"]


class PairNet(TinyNet):
    """A model whose forward returns (logits, features): the monitor needs forward_fn."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.net(x), x.flatten(1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)[0], y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        return None


class DictNet(PairNet):
    """A forward returning a dict with "logits", as Hugging Face outputs: read as it is."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": self.net(x), "features": x.flatten(1)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)["logits"], y)


def test_outputs_that_are_not_logits_fail_at_the_first_validation(tmp_path: Path) -> None:
    train, val = _loaders()
    with pytest.raises(MonitorSetupError, match=r"not \(B, K\) logits.*forward_fn"):
        _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1).fit(PairNet(), train, val)
    monitor = SensitivityMonitor(SMALL, forward_fn=lambda module, x: module(x)[0])
    _trainer(tmp_path / "adapted", [monitor], epochs=1).fit(PairNet(), train, val)
    assert monitor.history
    assert monitor.history[-1][keys.layer_kl_noise("val", "net.4")] > 0
    by_key = SensitivityMonitor(SMALL)
    _trainer(tmp_path / "by_key", [by_key], epochs=1).fit(DictNet(), train, val)
    assert by_key.history[-1][keys.layer_kl_noise("val", "net.4")] > 0


def test_unreadable_batches_fail_with_a_pointer_to_batch_fn(tmp_path: Path) -> None:
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, CLASSES, (16,))

    class DictBatches(TinyNet):
        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

        def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self(batch["x"])

    loader = DataLoader([{"x": x[i], "y": y[i]} for i in range(16)], batch_size=8)
    with pytest.raises(MonitorSetupError, match="batch_fn"):
        _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1).fit(DictBatches(), loader, loader)
    monitor = SensitivityMonitor(SMALL, batch_fn=lambda b: (b["x"], b["y"], None))
    _trainer(tmp_path / "adapted", [monitor], epochs=1).fit(DictBatches(), loader, loader)
    assert monitor.history


def test_resumed_run_continues_the_curves_without_gaps_or_duplicates(tmp_path: Path) -> None:
    first, checkpoint = _fit_and_save(tmp_path, epochs=2)
    train, val = _loaders()
    resumed = SensitivityMonitor(SMALL)
    _trainer(tmp_path, [resumed], epochs=4).fit(TinyNet(), train, val, ckpt_path=checkpoint)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert torch.equal(resumed.tracker.probes["train"], first.tracker.probes["train"])
    # decisions are counted by their global step: one per epoch, 4 steps each
    assert resumed.tracker.flags.monitored["val"] == [4, 8, 12, 16]
    assert [h["step"] for h in resumed.history] == [4, 8, 12, 16]

    logged = read_logged(tmp_path / "tb" / "version_0")  # both runs log to the same folder
    steps = logged.steps(keys.curve("pred", "val", "median"))
    assert len(steps) == 4
    assert steps == sorted(set(steps))


def test_scanning_the_whole_training_set(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL, scan_train_set=True, scan_every_n_epochs=2)
    _trainer(tmp_path, [monitor], epochs=3).fit(TinyNet(), train, val)
    folder = tmp_path / "tb" / "version_0"
    for epoch, scanned in ((0, True), (1, False), (2, True)):
        with epoch_table(folder, "flags", epoch).open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "train_all"]
        assert sorted(int(r["sample"]) for r in rows) == (list(range(64)) if scanned else [])
    logged = read_logged(tmp_path / "tb" / "version_0")
    assert len(logged.scalars[keys.curve("true", "train_all", "median")]) == 2
    assert keys.image("manhattan", "train_all") in logged.images


def test_mixed_precision_logits_are_scored_in_float64(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=[monitor],
        accelerator="cpu",
        precision="bf16-mixed",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(TinyNet(), train, val)
    last = monitor.history[-1]
    assert math.isfinite(last[keys.curve("pred", "val", "median")])
    assert last[keys.closed_form_holds("val")] == 1.0


class Picky(nn.Module):
    """A layer whose forward insists on its own parameter: functional_call cannot replace it,
    so no per-sample Jacobian can be taken through it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.scale, nn.Parameter):
            raise TypeError("Picky needs its own parameter")
        return torch.tanh(x * self.scale)


class PickyNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            Picky(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, CLASSES),
        )


def test_a_layer_that_cannot_be_measured_is_left_out_with_one_warning(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL)
    with pytest.warns(UserWarning, match=r"leaves layer 'net.1' out.*exclude_layers") as caught:
        _trainer(tmp_path, [monitor], epochs=2).fit(PickyNet(), train, val)
    assert sum("net.1" in str(w.message) for w in caught) == 1  # once per run, not per epoch
    for history in monitor.history:
        assert keys.layer_kl_noise("val", "net.0") in history
        assert keys.layer_kl_noise("val", "net.1") not in history
        assert keys.curve("true", "val", "median") in history
    excluded = SensitivityMonitor(SMALL, exclude_layers=["net.1", "net.0"])
    _trainer(tmp_path / "excluded", [excluded], epochs=1).fit(PickyNet(), train, val)
    prefix = keys.layer_kl_noise("val", "")
    layer_keys = [k for k in excluded.history[-1] if k.startswith(prefix)]
    assert layer_keys == [keys.layer_kl_noise("val", "net.3")]


def test_layer_curves_are_the_predicted_damage_of_the_probe(tmp_path: Path) -> None:
    """The per-layer curves and table equal predict_damage of the engine on the probe samples,
    recomputed here from the final model; the table keeps the paper's FI families beside them."""
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL, every_n_epochs=1)
    model = TinyNet()
    _trainer(tmp_path, [monitor], epochs=2).fit(model, train, val)
    ids = monitor.tracker.probes["val"][: SMALL.exact_probe_size]
    x = torch.stack([val.dataset[i][0] for i in ids.tolist()])
    y = torch.stack([val.dataset[i][1] for i in ids.tolist()])
    result = sensitivity(model, x, y, inputs=False, channel_metric=True)
    assert result.parameters is not None
    want = predict_damage(model, result.parameters, (0.1,), (4,), (0.1,))
    last = monitor.history[-1]
    for name, layer in want.items():
        assert math.isclose(last[keys.layer_kl_noise("val", name)], layer.noise[0.1], rel_tol=1e-6)
        if (4, True) in layer.quant:
            got = last[keys.layer_kl_quant("val", name, 4)]
            assert math.isclose(got, layer.quant[4, True], rel_tol=1e-6)
    assert set(want) == {"net.0", "net.1", "net.4"}
    assert (4, True) not in want["net.1"].quant  # BatchNorm: no weight quantisation entry

    with epoch_table(tmp_path / "tb" / "version_0", "layers", 1).open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    assert [r["layer"] for r in rows] == ["net.0", "net.1", "net.4"]
    for row in rows:
        assert math.isclose(float(row["kl_noise"]), want[row["layer"]].noise[0.1], rel_tol=1e-6)
        fi = result.parameters.layers[row["layer"]]
        assert float(row["effective_rank_mean"]) == float(
            fi.parameters.effective_rank.double().mean()
        )
    assert math.isnan(float(rows[1]["kl_quant_channel"]))


class BatchStatsNet(TinyNet):
    """BatchNorm without running statistics: per-sample FI is undefined, the engine refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.net[1] = nn.BatchNorm2d(4, track_running_stats=False)


def test_scores_flags_and_tables_survive_a_failing_engine(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL)
    with pytest.warns(
        UserWarning, match="left out the exact engine.*track_running_stats"
    ) as caught:
        _trainer(tmp_path, [monitor], epochs=2).fit(BatchStatsNet(), train, val)
    assert sum("exact engine" in str(w.message) for w in caught) == 1
    assert len(monitor.history) == 2
    for history in monitor.history:
        assert keys.curve("true", "train", "q90") in history
        assert keys.flag_count("val") in history
        assert keys.closed_form_holds("val") not in history
    assert epoch_table(tmp_path / "tb" / "version_0", "flags", 1).exists()
    strict = SensitivityMonitor(SMALL, strict=True)
    with pytest.raises(ValueError, match="track_running_stats"):
        _trainer(tmp_path / "strict", [strict], epochs=1).fit(BatchStatsNet(), train, val)


@pytest.mark.parametrize(
    "off",
    [
        {"exact_probe_size": 0},
        {"log_images": False},
        {"score_training_steps": False},
        {"windows": ()},
        {"num_images": 0},
        {"layers": ()},
        {"exact_probe_size": 0, "log_images": False, "score_training_steps": False},
        {"budget": 1e-9},  # a budget that allows nothing optional
    ],
    ids=lambda off: ",".join(f"{k}={v}" for k, v in off.items()),
)
def test_every_off_setting_still_writes_every_epoch(tmp_path: Path, off: dict[str, Any]) -> None:
    """Each documented way to switch a part off leaves that part out, never the epoch: the
    curves, flag counts and flag tables are written every monitored epoch."""
    pl.seed_everything(0)
    train, val = _loaders()
    monitor = SensitivityMonitor(SMALL, **off)
    _trainer(tmp_path, [monitor], epochs=2).fit(TinyNet(), train, val)
    assert len(monitor.history) == 2
    folder = tmp_path / "tb" / "version_0"
    for epoch, row in enumerate(monitor.history):
        for split in ("train", "val"):
            assert keys.curve("true", split, "median") in row
            assert keys.flag_count(split) in row
        with epoch_table(folder, "flags", epoch).open() as stream:
            splits = {line["split"] for line in csv.DictReader(stream)}
        assert splits == {"train", "val"}
    layer_curves = any(k.startswith(keys.LAYERS) for k in monitor.history[-1])
    exact = off.get("exact_probe_size", 6) > 0 and off.get("budget", 1) > 1e-6
    assert layer_curves == (exact and off.get("layers") != ())
    assert (keys.closed_form_holds("val") in monitor.history[-1]) == exact
    map_curves = any("map_w" in k for k in monitor.history[-1])
    assert map_curves == (exact and off.get("windows") != ())
    drawn = off.get("log_images", True) and off.get("budget", 1) > 1e-6
    assert (monitor.figure_sets_drawn == 2) == drawn


def test_a_batch_that_fails_on_one_rank_skips_the_epoch_on_every_rank(tmp_path: Path) -> None:
    """DDP, 2 processes: a validation batch that fails on rank 1 only skips that validation's
    monitoring on both ranks (they agree before the gather; the epoch's training steps are
    decided at its end); the next epoch is monitored. Before the ranks agreed, rank 0 waited in
    the gather for a rank that had gone on training."""
    command = [sys.executable, "-m", "tests.ddp_one_rank_fails", str(tmp_path)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "done.pt").exists()
    assert "skipped the monitoring of epoch 0" in done.stderr
    splits = []
    for table in paths.flag_tables(tmp_path / "tb" / "version_0"):
        with table.open() as stream:
            splits.append(sorted({row["split"] for row in csv.DictReader(stream)}))
    # epoch 0: the training steps only, decided at the end of the epoch; epoch 1: both splits
    assert splits == [["train"], ["train", "val"]]


def test_histograms_hold_every_finite_score(tmp_path: Path) -> None:
    """The monitor bins its histograms itself (64 equal bins): each holds every finite value
    once, within its limits, with TensorBoard's own summary statistics."""
    from lightning_sens.reporting.writers import Writer

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    writer = Writer([logger])
    values = torch.cat([torch.randn(1000, dtype=torch.float64) * 3, torch.tensor([math.inf])])
    writer.histogram(keys.histogram("true", "val"), values, 7)
    writer.histogram(keys.histogram("pred", "val"), torch.full((5,), 2.5), 7)
    writer.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(paths.split_run(tmp_path / "tb" / "version_0", "val")))
    events.Reload()
    (event,) = events.Histograms(keys.route(keys.histogram("true", "val"))[1])
    h = event.histogram_value
    finite = values[values.isfinite()]
    assert event.step == 7
    assert h.num == 1000
    assert sum(h.bucket) == 1000
    assert h.bucket[0] == 0  # the empty bin that ends at the left edge
    assert h.bucket_limit[0] == pytest.approx(float(finite.min()))
    assert h.bucket_limit[-1] == pytest.approx(float(finite.max()))
    assert h.sum == pytest.approx(float(finite.sum()))
    assert h.sum_squares == pytest.approx(float(finite.square().sum()))
    (constant,) = events.Histograms(keys.route(keys.histogram("pred", "val"))[1])
    assert sum(constant.histogram_value.bucket) == 5
