"""Real project layouts, written the way users write them, for tests/test_layouts.py.

Each layout is a LightningModule (and its data) in the shape a popular template or tutorial
gives it, not in the shape this project's own tests would choose:

- ``hydra``: the lightning-hydra-template pattern: the network is passed to ``__init__`` and
  stored by ``save_hyperparameters``, ``model_step`` calls ``self.forward(x)``, torchmetrics
  metrics, ``validation_step`` returns nothing, checkpoints on;
- ``finetune``: a LightningCLI run with Lightning's ``BackboneFinetuning`` callback, which
  freezes ``self.backbone`` at the start and unfreezes it at epoch 1;
- ``huggingface``: a Hugging Face ``BertForSequenceClassification`` (tiny configuration, random
  weights) trained on a tokenizer's dict batches with the model's own loss;
- ``binary``: one logit, ``BCEWithLogitsLoss``, float targets of shape ``(B, 1)``;
- ``iterable``: a training ``IterableDataset`` that streams samples (with or without ids);
- data loaders with workers (prefetching) and the schedules of item 2 of the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

CLASSES = 4
TRAIN, VAL = 64, 32


def images(n: int, seed: int, classes: int = CLASSES) -> tuple[Tensor, Tensor]:
    """``n`` learnable 8 × 8 one-channel images (a pattern per class plus noise) and labels."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return patterns[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g), y


def image_loaders(
    batch_size: int = 16, workers: int = 0, ids: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled) and validation loaders of :func:`images`."""
    x, y = images(TRAIN + VAL, seed=0)
    extra = (torch.arange(TRAIN),) if ids else ()
    train = TensorDataset(x[:TRAIN], y[:TRAIN], *extra)
    val = TensorDataset(x[TRAIN:], y[TRAIN:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers),
        DataLoader(val, batch_size=batch_size, num_workers=workers),
    )


class Net(nn.Module):
    """A plain torch network, as a template's ``src/models/components`` holds it."""

    def __init__(self, classes: int = CLASSES, hidden: int = 16) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class HydraModule(pl.LightningModule):
    """The lightning-hydra-template's ``MNISTLitModule``, shortened: the net comes in through
    ``__init__`` and is stored in the hyperparameters (so it is pickled into every checkpoint)."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=CLASSES)
        self.val_acc = MulticlassAccuracy(num_classes=CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self.forward(x)
        return self.criterion(logits, y), logits.argmax(dim=1), y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, preds, targets = self.model_step(batch)
        self.train_acc(preds, targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, preds, targets = self.model_step(batch)
        self.val_acc(preds, targets)
        self.log("val/loss", loss, on_step=False, on_epoch=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Plain(pl.LightningModule):
    """The network trained on batches ``(x, y)`` or ``(x, y, ids)``, as many tutorials write it:
    ``self.net(x)`` in the steps, which return the loss and the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("val_loss", loss)
        return {"loss": loss, "logits": logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class FineTuned(pl.LightningModule):
    """A pretrained-backbone module as Lightning's fine-tuning example writes it: ``backbone``
    and ``head``, an optimizer over the trainable parameters only (``BackboneFinetuning`` adds
    the backbone's when it unfreezes it)."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 8 * 8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.hparams.lr)


class ImageData(pl.LightningDataModule):
    """The images of :func:`images` as a DataModule (for LightningCLI)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return image_loaders(self.batch_size)[0]

    def val_dataloader(self) -> DataLoader:
        return image_loaders(self.batch_size)[1]


class Binary(pl.LightningModule):
    """A binary classifier trained the usual way: one logit, ``BCEWithLogitsLoss``, float
    targets of shape ``(B, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def binary_loaders() -> tuple[DataLoader, DataLoader]:
    """Two classes of :func:`images`, targets as float ``(B, 1)``."""
    x, y = images(TRAIN + VAL, seed=1, classes=2)
    target = y.float().unsqueeze(1)
    return (
        DataLoader(TensorDataset(x[:TRAIN], target[:TRAIN]), batch_size=16, shuffle=True),
        DataLoader(TensorDataset(x[TRAIN:], target[TRAIN:]), batch_size=16),
    )


class Stream(IterableDataset):
    """Samples streamed in a shuffled order (as from shards or a database), with their ids
    (``(x, y, id)``) where asked."""

    def __init__(self, ids: bool, seed: int = 0) -> None:
        self.x, self.y = images(TRAIN, seed=0)
        self.ids = ids
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = torch.randperm(TRAIN, generator=torch.Generator().manual_seed(self.seed))
        self.seed += 1
        for i in order.tolist():
            yield (self.x[i], self.y[i], torch.tensor(i)) if self.ids else (self.x[i], self.y[i])


class Tokens(Dataset):
    """A tokenizer's output per sample: ``input_ids``, ``attention_mask`` (padding at the end
    of every third sequence) and ``labels``."""

    def __init__(self, size: int, seed: int, length: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (size,), generator=g)
        self.ids = torch.randint(5, 30, (size, length), generator=g)
        self.ids[:, 1] = 30 + self.labels  # a token that gives the label away: it learns
        self.mask = torch.ones(size, length, dtype=torch.long)
        self.mask[::3, -2:] = 0
        self.ids[::3, -2:] = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class HuggingFace(pl.LightningModule):
    """A Hugging Face sequence classifier wrapped as its tutorials do: the batch goes to the
    model as keyword arguments and the model's own loss is trained."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=2,
        )
        torch.manual_seed(0)
        self.model = BertForSequenceClassification(config)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.model(**batch)
        self.log("val_loss", output.loss)
        return output.logits

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loaders() -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(Tokens(TRAIN, seed=0), batch_size=16, shuffle=True),
        DataLoader(Tokens(VAL, seed=1), batch_size=16),
    )


def weights(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the module's parameters and buffers, to compare runs bit for bit."""
    return {k: v.detach().clone() for k, v in copy.deepcopy(module).state_dict().items()}
