"""Training-set scores from the training steps: ids, logits, exactness, safety, resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor, WithIndex
from lightning_sens.label_noise import label_log_fi
from tests.checks import assert_close
from tests.test_monitor import CLASSES, SMALL, _trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


class Frozen(pl.LightningModule):
    """No BatchNorm, no dropout, learning rate 0: the logits of every step are those of the
    model after training, so the evidence must equal the closed form of them exactly."""

    def __init__(self, call_submodule: bool = False) -> None:
        super().__init__()
        self.call_submodule = call_submodule
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self.net(x) if self.call_submodule else self(x)
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data(n: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _fit(tmp_path: Path, model: Frozen, train: DataLoader, epochs: int = 2) -> SensitivityMonitor:
    x, y = _data(32)
    val = DataLoader(TensorDataset(x, y), batch_size=16)
    monitor = SensitivityMonitor(SMALL)
    pl.seed_everything(0)
    _trainer(tmp_path, [monitor], epochs=epochs).fit(model, train, val)
    return monitor


@pytest.mark.parametrize("call_submodule", [False, True])
def test_evidence_is_the_closed_form_of_the_training_logits(
    tmp_path: Path, call_submodule: bool
) -> None:
    x, y = _data()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = Frozen(call_submodule)
    monitor = _fit(tmp_path, model, train, epochs=1)
    evidence = monitor.tracker.evidence
    assert evidence is not None
    assert evidence.ids.tolist() == list(range(64))
    assert torch.equal(evidence.labels, y)
    # every step is scored, the first one too when the step calls a submodule (self.net(x)):
    # the first step watches every module for the logits
    assert torch.equal(evidence.seen, torch.full((64,), 1))
    with torch.no_grad():
        want = label_log_fi(model.net(x))
    assert_close("evidence", evidence.mean, want, 1e-6)  # float32 logits, summed in float64


class FrozenBinary(Frozen):
    """One logit and BCEWithLogitsLoss on float (B, 1) targets, learning rate 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self(batch[0]), batch[1])


def test_binary_evidence_is_the_closed_form_of_the_two_class_logits(tmp_path: Path) -> None:
    """A one-logit model's training steps are scored as the two-class model (0, z): the
    evidence of every label equals label_log_fi of (0, z), computed here apart from the
    package's own conversion; labels are the 0/1 targets as class indices."""
    x, y = _data()
    y = y % 2
    target = y.float().unsqueeze(1)
    train = DataLoader(TensorDataset(x, target), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:32], target[:32]), batch_size=16)
    model = FrozenBinary()
    monitor = SensitivityMonitor(SMALL)
    pl.seed_everything(0)
    _trainer(tmp_path, [monitor], epochs=2).fit(model, train, val)
    evidence = monitor.tracker.evidence
    assert evidence is not None
    assert torch.equal(evidence.labels, y)
    assert torch.equal(evidence.seen, torch.full((64,), 1))  # the second epoch's steps
    with torch.no_grad():
        z = model.net(x).double()
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    assert_close("binary evidence", evidence.mean, label_log_fi(two), 1e-6)


def test_ids_from_the_batch_and_from_with_index(tmp_path: Path) -> None:
    x, y = _data()
    ids = torch.arange(64) * 10 + 5
    train = DataLoader(TensorDataset(x, y, ids), batch_size=16, shuffle=True)
    monitor = _fit(tmp_path / "ids", Frozen(), train, epochs=1)
    assert monitor.tracker.evidence is not None
    assert monitor.tracker.evidence.ids.tolist() == ids.tolist()

    wrapped = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=16, shuffle=True)
    monitor = _fit(tmp_path / "wrapped", Frozen(), wrapped, epochs=1)
    assert monitor.tracker.evidence is not None
    assert monitor.tracker.evidence.ids.tolist() == list(range(64))
    assert WithIndex(TensorDataset(x, y))[3][2] == 3
    assert WithIndex([{"a": 1}])[0] == {"a": 1, "sample_id": 0}


def test_a_loader_that_reorders_its_batches_is_caught(tmp_path: Path) -> None:
    x, y = _data()

    def reverse(samples: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        return torch.utils.data.default_collate(samples[::-1])  # type: ignore[no-any-return]

    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, collate_fn=reverse)
    with pytest.warns(UserWarning, match="labels of the indices the training sampler dealt"):
        monitor = _fit(tmp_path, Frozen(), train, epochs=1)
    assert monitor.tracker.evidence is None  # nothing that may be wrong is kept


def test_evidence_survives_a_checkpoint(tmp_path: Path) -> None:
    x, y = _data()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    monitor = _fit(tmp_path, Frozen(), train)
    restored = SensitivityMonitor(SMALL)
    restored.load_state_dict(monitor.state_dict())
    assert restored.tracker.evidence is not None
    assert monitor.tracker.evidence is not None
    assert torch.equal(restored.tracker.evidence.total, monitor.tracker.evidence.total)
    assert torch.equal(restored.tracker.evidence.seen, monitor.tracker.evidence.seen)
