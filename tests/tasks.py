"""Tasks with many positions per sample, written the way their tutorials write them, for
tests/test_tasks.py:

- ``causal_lm``: a Hugging Face GPT-2 (tiny configuration, random weights) trained with its own
  loss on dict batches whose ``labels`` are the input ids, padding marked −100;
- ``segmentation``: a small fully convolutional network, ``(B, K, H, W)`` logits, masks
  ``(B, H, W)`` with a border of 255 (the segmentation data sets' "ignore"), cross-entropy with
  ``ignore_index=255``;
- ``tagger``: token classification, ``(x, y)`` batches, ``(B, T, K)`` logits, padding −100;
- ``multilabel``: one sigmoid per class, float targets ``(B, K)``, ``BCEWithLogitsLoss``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

TRAIN, VAL = 48, 24
VOCAB, LENGTH = 24, 10
CLASSES, SIZE = 3, 8


class Texts(Dataset):
    """Sequences of a repeating pattern (learnable), padded at the end of every third."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(1, VOCAB - 1, (size, 1), generator=g)
        step = torch.randint(1, 3, (size, 1), generator=g)
        self.ids = (start + step * torch.arange(LENGTH)) % (VOCAB - 1) + 1
        self.mask = torch.ones(size, LENGTH, dtype=torch.long)
        self.mask[::3, -3:] = 0
        self.ids[::3, -3:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class CausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32
        )
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.model(**batch)
        self.log("val_loss", output.loss)
        return output.logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def text_loaders() -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(Texts(TRAIN, seed=0), batch_size=12, shuffle=True),
        DataLoader(Texts(VAL, seed=1), batch_size=12),
    )


def masks(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images of one bright square on a dark background; the mask labels the square with
    its class (its brightness) and the rest background (0), the outer ring 255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, SIZE, SIZE)
    y = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, CLASSES, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(1, SIZE - 4, (2,), generator=g))
        x[i, 0, r : r + 3, c : c + 3] = float(k)
        y[i, r : r + 3, c : c + 3] = k
    x += 0.1 * torch.randn(x.shape, generator=g)
    y[:, 0], y[:, -1], y[:, :, 0], y[:, :, -1] = 255, 255, 255, 255
    return x, y


class Segmenter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, CLASSES, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, ignore_index=255)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y, ignore_index=255))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def mask_loaders() -> tuple[DataLoader, DataLoader]:
    x, y = masks(TRAIN + VAL, seed=0)
    return (
        DataLoader(TensorDataset(x[:TRAIN], y[:TRAIN]), batch_size=12, shuffle=True),
        DataLoader(TensorDataset(x[TRAIN:], y[TRAIN:]), batch_size=12),
    )


class Tagger(pl.LightningModule):
    """Tags each token with its id modulo the number of tags."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).transpose(1, 2), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _y = batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=5e-2)


def tag_loaders() -> tuple[DataLoader, DataLoader]:
    texts = Texts(TRAIN + VAL, seed=2)
    tags = (texts.ids % CLASSES).masked_fill(texts.mask == 0, -100)
    return (
        DataLoader(TensorDataset(texts.ids[:TRAIN], tags[:TRAIN]), batch_size=12, shuffle=True),
        DataLoader(TensorDataset(texts.ids[TRAIN:], tags[TRAIN:]), batch_size=12),
    )


class MultiLabel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _y = batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def multilabel_loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(TRAIN + VAL, 6, generator=g)
    y = (x[:, :4] > 0).float()  # label k present where feature k is positive
    return (
        DataLoader(TensorDataset(x[:TRAIN], y[:TRAIN]), batch_size=12, shuffle=True),
        DataLoader(TensorDataset(x[TRAIN:], y[TRAIN:]), batch_size=12),
    )


class MaskData(pl.LightningDataModule):
    """:func:`mask_loaders` as a data module, for ``lightning-sens evaluate``."""

    def train_dataloader(self) -> DataLoader:
        return mask_loaders()[0]

    def val_dataloader(self) -> DataLoader:
        return mask_loaders()[1]


class TokenBlocks(Dataset):
    """(inputs, target) blocks of a token stream, the target shifted by one, as Lightning's
    demo ``WikiText2`` gives them (whose download is not available offline)."""

    def __init__(self, size: int, block: int = 12) -> None:
        stream = (torch.arange(size * block + 1) * 7 + torch.arange(size * block + 1) // 5) % VOCAB
        self.data, self.block = stream, block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block
        return self.data[start : start + self.block], self.data[start + 1 : start + self.block + 1]


def demo_transformer() -> pl.LightningModule:
    """Lightning's demo Transformer as it is, its data offline."""
    from lightning.pytorch.demos.transformer import LightningTransformer

    class Demo(LightningTransformer):
        def prepare_data(self) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TokenBlocks(32), batch_size=8)

    return Demo(vocab_size=VOCAB)


def demo_lstm() -> pl.LightningModule:
    """Lightning's demo LSTM (no forward(), a hidden state carried across steps, a batch
    sampler of its own) as it is, its data offline."""
    from lightning.pytorch.demos.lstm import LightningLSTM, SequenceSampler

    class Demo(LightningLSTM):
        def prepare_data(self) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            data = TokenBlocks(32)
            return DataLoader(data, batch_sampler=SequenceSampler(data, batch_size=8))

    return Demo(vocab_size=VOCAB)
