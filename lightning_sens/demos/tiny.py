"""A tiny classifier and its data, for tests and benchmarks: a monitored ``fit`` in seconds.

Lightning keeps such classes in ``lightning.pytorch.demos.boring_classes`` so that its tests and
benchmarks share them; the test suite (``tests/test_monitor.py``, ``tests/cli_models.py``) and
``benchmarks/bench_callback.py`` import these rather than writing them again.

:class:`TinyClassifier` is a convolution, BatchNorm and a linear layer on 8 × 8 one-channel
images; :class:`TinyData` draws random 8 × 8 images (96 samples from one seed: 64 for training,
32 for validation), with an optional pattern per class that makes them learnable, and with the
sample ids in the batches where asked.

Example:
    >>> data = TinyData(classes=3, ids=True)
    >>> x, y, ids = next(iter(data.val_dataloader()))
    >>> tuple(x.shape), ids[:4].tolist()
    ((16, 1, 8, 8), [0, 1, 2, 3])
    >>> TinyClassifier(classes=3)(x).shape
    torch.Size([16, 3])
    >>> train, val = tiny_loaders()
    >>> len(train.dataset), len(val.dataset), train.batch_size, val.batch_size
    (64, 32, 16, 16)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CLASSES", "TinyClassifier", "TinyData", "tiny_loaders"]

CLASSES = 4  # K of both classes unless told otherwise
_SAMPLES, _TRAIN = 96, 64  # drawn from one seed; the first 64 train, the rest validate


class TinyClassifier(pl.LightningModule):
    """conv 3 × 3 (``width`` channels) → BatchNorm → ReLU → linear: ``classes`` logits of an
    8 × 8 one-channel image; cross-entropy, SGD with learning rate 0.1.

    Batches are ``(x, y)`` or ``(x, y, ids)``. It saves no hyperparameters (subclasses that
    need them, e.g. for a checkpoint's init args, call ``save_hyperparameters``).

    Args:
        width: channels of the convolution.
        classes: K, the number of logits.
        return_logits: ``validation_step`` returns the logits (the monitor scores them, no
            second forward pass); False: it returns None.
        log_loss: ``validation_step`` logs the validation loss as ``val_loss``.
    """

    def __init__(
        self,
        width: int = 4,
        classes: int = CLASSES,
        return_logits: bool = True,
        log_loss: bool = True,
    ) -> None:
        super().__init__()
        self.return_logits = return_logits
        self.log_loss = log_loss
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 8 * 8, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.log_loss:
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
        return logits if self.return_logits else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(pl.LightningDataModule):
    """Random ``size`` × ``size`` one-channel images and labels from ``seed``: 64 training and
    32 validation samples, training batches of 16 (shuffled), validation batches of
    ``val_batch``.

    Args:
        classes: K; labels are uniform in 0 … K − 1.
        seed: seed of the images, the labels and the class patterns.
        size: image height and width (:class:`TinyClassifier` reads 8).
        signal: with a positive value, each class adds its own random pattern times ``signal``
            to its images: a model can learn them.
        shift: moves the validation labels by ``shift`` classes (modulo K), so that they
            disagree with what a model learnt.
        val_batch: validation batch size.
        ids: batches ``(x, y, ids)``, ``ids`` the samples' indices in their split's dataset
            (what the monitor needs to score the training steps); else ``(x, y)``.
    """

    def __init__(
        self,
        classes: int = CLASSES,
        seed: int = 0,
        size: int = 8,
        signal: float = 0.0,
        shift: int = 0,
        val_batch: int = 16,
        ids: bool = False,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(_SAMPLES, 1, size, size, generator=g)
        self.y = torch.randint(0, classes, (_SAMPLES,), generator=g)
        if signal:
            self.x += signal * torch.randn(classes, 1, size, size, generator=g)[self.y]
        self.y[_TRAIN:] = (self.y[_TRAIN:] + shift) % classes
        self.val_batch = val_batch
        self.ids = ids

    def _dataset(self, part: slice) -> TensorDataset:
        x, y = self.x[part], self.y[part]
        return TensorDataset(x, y, torch.arange(len(y))) if self.ids else TensorDataset(x, y)

    @property
    def train_set(self) -> TensorDataset:
        """The 64 training samples."""
        return self._dataset(slice(None, _TRAIN))

    @property
    def val_set(self) -> TensorDataset:
        """The 32 validation samples."""
        return self._dataset(slice(_TRAIN, None))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch)


def tiny_loaders(seed: int = 0, **options: Any) -> tuple[DataLoader, DataLoader]:
    """The (training, validation) loaders of ``TinyData(seed=seed, **options)``."""
    data = TinyData(seed=seed, **options)
    return data.train_dataloader(), data.val_dataloader()
