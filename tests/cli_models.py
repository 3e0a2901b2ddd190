"""A LightningModule and a LightningDataModule importable by class path, for the CLI tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(pl.LightningModule):
    def __init__(self, width: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 8 * 8, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyModule3D(TinyModule):
    """Returns (B, K, 1), not (B, K) logits."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[..., None]


class ExtraModule(TinyModule):
    """TinyModule with one more layer: TinyModule's checkpoints lack two of its keys."""

    def __init__(self, width: int = 4, classes: int = 4) -> None:
        super().__init__(width, classes)
        self.extra = nn.Linear(classes, classes)


class FailingModule(TinyModule):
    """Fails in its validation step: with an error, or as if interrupted (Ctrl+C)."""

    def __init__(self, width: int = 4, classes: int = 4, interrupt: bool = False) -> None:
        super().__init__(width, classes)
        self.interrupt = interrupt

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        raise KeyboardInterrupt if self.interrupt else RuntimeError("boom")


class TinyData(pl.LightningDataModule):
    """Random ``size`` × ``size`` images (64 training, 32 validation samples); with ``signal``,
    each class adds its own pattern (learnable); ``shift`` moves the validation labels by one
    class per unit (so that they disagree with what a model learnt)."""

    def __init__(
        self,
        classes: int = 4,
        seed: int = 0,
        size: int = 8,
        signal: float = 0.0,
        shift: int = 0,
        val_batch: int = 16,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(96, 1, size, size, generator=g)
        self.y = torch.randint(0, classes, (96,), generator=g)
        if signal:
            self.x += signal * torch.randn(classes, 1, size, size, generator=g)[self.y]
        self.y[64:] = (self.y[64:] + shift) % classes
        self.val_batch = val_batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[64:], self.y[64:]), batch_size=self.val_batch)
