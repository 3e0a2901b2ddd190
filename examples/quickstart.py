"""Quickstart: add SensitivityMonitor to an existing Trainer. That is all it takes.

python examples/quickstart.py            # time: docs/quickstart.md
tensorboard --logdir runs/quickstart
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.demos.models import SmallCNN


def main(out: str = "runs/quickstart", epochs: int = 2) -> pl.Trainer:
    # Your model and data, unchanged: batches of (inputs, labels), a forward that returns logits.
    x, y = torch.rand(512, 1, 12, 12), torch.randint(0, 10, (512,))
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)

    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=out,
        callbacks=[SensitivityMonitor(exact_probe_size=8)],  # <- the one added line
        enable_checkpointing=False,
    )
    trainer.fit(SmallCNN(), train, val)
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:2])
