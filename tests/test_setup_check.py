"""Errors in seconds: the monitor reads one batch of each split and runs the model and the
engine on one sample before the first step, in fit and in validate, sanity check or not."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.callbacks import MonitorSetupError
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.stats import log_fi_summary
from lightning_sens.reporting.writers import read_scalars
from tests.logged import read_logged
from tests.test_monitor import CLASSES, SMALL, PairNet, TinyNet, _loaders, _trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),  # few-batch and worker hints
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


class Counted:
    """Counts the steps a model ran (a mixin for the test models)."""

    steps = 0

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        type(self).steps += 1


class DictBatches(Counted, TinyNet):
    """Batches {"x", "y"}: the default batch_fn finds no labels."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["x"])


class CountedPairNet(Counted, PairNet):
    pass


class CountedNet(Counted, TinyNet):
    pass


def _dict_loader() -> DataLoader:
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, CLASSES, (16,))
    return DataLoader([{"x": x[i], "y": y[i]} for i in range(16)], batch_size=8)


@pytest.mark.parametrize("sanity_steps", [0, 2])
def test_unreadable_batches_fail_before_the_first_step(tmp_path: Path, sanity_steps: int) -> None:
    DictBatches.steps = 0
    loader = _dict_loader()
    trainer = _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1)
    trainer.num_sanity_val_steps = sanity_steps
    with pytest.raises(MonitorSetupError, match=r"labels of a dict batch.*batch_fn"):
        trainer.fit(DictBatches(), loader, loader)
    assert DictBatches.steps == 0  # before any training step: seconds, not an epoch


@pytest.mark.parametrize("sanity_steps", [0, 2])
def test_outputs_that_are_not_logits_fail_before_the_first_step(
    tmp_path: Path, sanity_steps: int
) -> None:
    CountedPairNet.steps = 0
    train, val = _loaders()
    trainer = _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1)
    trainer.num_sanity_val_steps = sanity_steps
    with pytest.raises(MonitorSetupError, match=r"not \(B, K\) logits.*forward_fn"):
        trainer.fit(CountedPairNet(), train, val)
    assert CountedPairNet.steps == 0


def test_labels_outside_the_models_classes_fail_before_the_first_step(tmp_path: Path) -> None:
    CountedNet.steps = 0
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % (CLASSES + 2)  # labels 0..5 for a model of 4 classes
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    train, _ = _loaders()
    with pytest.raises(MonitorSetupError, match=r"val labels range over \[0, 5\].*4 logits"):
        _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1).fit(CountedNet(), train, loader)
    assert CountedNet.steps == 0


def test_a_model_that_cannot_read_the_inputs_fails_with_their_shape(tmp_path: Path) -> None:
    train, _ = _loaders()
    wrong = DataLoader(TensorDataset(torch.randn(8, 1, 5, 7), torch.zeros(8).long()), batch_size=4)
    with pytest.raises(MonitorSetupError, match=r"val batch \(inputs of shape \(4, 1, 5, 7\)\)"):
        _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1).fit(TinyNet(), train, wrong)


def test_validate_checks_before_the_first_batch(tmp_path: Path) -> None:
    _, val = _loaders()
    trainer = _trainer(tmp_path, [SensitivityMonitor(SMALL)], epochs=1)
    with pytest.raises(MonitorSetupError, match="forward_fn"):
        trainer.validate(PairNet(), val)
    monitor = SensitivityMonitor(SMALL, forward_fn=lambda module, x: module(x)[0])
    _trainer(tmp_path / "adapted", [monitor], epochs=1).validate(PairNet(), val)
    assert monitor.history


def test_the_check_leaves_training_as_it_was(tmp_path: Path) -> None:
    """The check runs the model in eval mode on two samples: BatchNorm statistics, modes and
    the random stream are as they were (the same weights after training as without it)."""
    weights = []
    for callbacks in ([], [SensitivityMonitor(SMALL, exact_probe_size=0, log_images=False)]):
        pl.seed_everything(0)
        train, val = _loaders()
        model = TinyNet()
        _trainer(tmp_path / str(len(callbacks)), callbacks, epochs=1).fit(model, train, val)
        weights.append(torch.cat([p.detach().flatten() for p in model.state_dict().values()]))
    assert torch.equal(weights[0], weights[1])


class NamedSet(TensorDataset):
    classes = ("ant", "bee", "cat", "dog")  # torchvision's attribute


def test_class_names_from_the_dataset_or_the_option(tmp_path: Path) -> None:
    train, val = _loaders()
    named = DataLoader(NamedSet(*val.dataset.tensors), batch_size=16)  # type: ignore[attr-defined]
    monitor = SensitivityMonitor(SMALL)
    _trainer(tmp_path, [monitor], epochs=1).fit(TinyNet(), train, named)
    assert monitor.class_names == ("ant", "bee", "cat", "dog")
    assert keys.image("manhattan", "val") in read_logged(tmp_path / "tb" / "version_0").images

    chosen = SensitivityMonitor(SMALL, class_names=("a", "b", "c", "d"))
    _trainer(tmp_path / "chosen", [chosen], epochs=1).fit(TinyNet(), train, named)
    assert chosen.class_names == ("a", "b", "c", "d")

    wrong = SensitivityMonitor(SMALL, class_names=("a", "b"))
    with pytest.warns(UserWarning, match="2 class names for a model with 4 classes"):
        _trainer(tmp_path / "wrong", [wrong], epochs=1).fit(TinyNet(), train, val)
    with pytest.raises(ValueError, match="class_names must be a sequence of strings"):
        SensitivityMonitor(class_names="abcd")


# -- binary classifiers with one logit, and multi-label models ----------------------------------


class OneLogitNet(Counted, TinyNet):
    """One logit z per image, trained with BCEWithLogitsLoss on float 0/1 targets ``(B, 1)``;
    ``outputs`` says what ``validation_step`` returns: the logit ``(B, 1)``, or the per-sample
    losses ``(B,)`` (which must not be read as logits), or None."""

    def __init__(self, outputs: str = "logits") -> None:
        super().__init__(classes=1)
        self.outputs = outputs

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        z = self(x)
        if self.outputs == "losses":
            return nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")[:, 0]
        return z if self.outputs == "logits" else None


def _binary_loaders(targets: Tensor | None = None) -> tuple[DataLoader, DataLoader]:
    """The tiny images with float 0/1 targets (B, 1) (or ``targets``): the label is whether the
    image's mean is positive, which a model can learn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).float()[:, None] if targets is None else targets
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)


@pytest.mark.parametrize("outputs", ["logits", "losses", "none"])
def test_a_binary_classifier_with_one_logit_is_monitored_as_the_model_0_z(
    tmp_path: Path, outputs: str
) -> None:
    """The monitor at its defaults on BCEWithLogitsLoss with float targets (B, 1): every
    validation sample's score is the closed form of the two-class logits (0, z), log FI = −z
    for y = 1 and z for y = 0, whatever the validation step returns."""
    pl.seed_everything(0)
    train, val = _binary_loaders()
    model, monitor = OneLogitNet(outputs), SensitivityMonitor()
    _trainer(tmp_path, [monitor], epochs=1).fit(model, train, val)
    with torch.no_grad():
        z = torch.cat([model.eval()(x) for x, _ in val])[:, 0].double()
    y = torch.cat([y for _, y in val])[:, 0].double()
    log_fi = (1 - 2 * y) * z  # log((1 − p_y)/p_y), p_1 = sigmoid(z)
    (table,) = paths.flag_tables(tmp_path / "tb" / "version_0")
    with table.open() as f:
        rows = {int(r["sample"]): r for r in csv.DictReader(f) if r["split"] == "val"}
    assert sorted(rows) == list(range(32))
    for i, row in rows.items():
        assert float(row["fi"]) == pytest.approx(math.exp(log_fi[i]), rel=1e-6), i
        p_label = torch.sigmoid((2 * y[i] - 1) * z[i])
        assert float(row["p_label"]) == pytest.approx(float(p_label), rel=1e-6), i
    logged = read_scalars(tmp_path / "tb" / "version_0")
    want = {
        "true": log_fi_summary(log_fi),
        "pred": log_fi_summary(-z.abs()),  # the predicted class: the sign of z
    }
    for target, stats in want.items():
        for stat in ("median", "mean", "q90", "q100"):
            key = keys.curve(target, "val", stat)
            assert monitor.history[-1][key] == pytest.approx(stats[stat], rel=1e-6), key
            assert logged[key][-1][1] == pytest.approx(stats[stat], rel=1e-5), key


def test_binary_labels_as_int_bool_or_flat_floats_are_read_as_classes(tmp_path: Path) -> None:
    for made in (lambda y: y.long(), lambda y: y.bool(), lambda y: y[:, 0]):
        train, val = _binary_loaders()
        labels = made(val.dataset.tensors[1])  # type: ignore[attr-defined]
        val = DataLoader(TensorDataset(val.dataset.tensors[0], labels), batch_size=16)  # type: ignore[attr-defined]
        monitor = SensitivityMonitor(SMALL, score_training_steps=False)
        _trainer(tmp_path / str(labels.dtype), [monitor], epochs=1).fit(OneLogitNet(), train, val)
        # the exact probes (budget=None: every epoch) certify the closed form: rank K − 1 = 1
        assert monitor.history[-1][keys.closed_form_holds("val")] == 1.0


def test_float_labels_other_than_0_and_1_fail_before_the_first_step(tmp_path: Path) -> None:
    OneLogitNet.steps = 0
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(96, 1, generator=g)  # soft targets, as label smoothing makes them
    train, val = _binary_loaders(soft)
    with pytest.raises(
        MonitorSetupError,
        match=r"labels of the first train batch: labels holds the float values \[0\.\d+, .*"
        r"must be 0 or 1.*\(labels > 0\.5\)\.long\(\).*batch_fn",
    ):
        _trainer(tmp_path, [SensitivityMonitor()], epochs=1).fit(OneLogitNet(), train, val)
    assert OneLogitNet.steps == 0
