"""A 2-process DDP fit (gloo, CPU) in which one validation batch fails on rank 1 only, in the
first epoch: run by tests/test_monitor.py in a subprocess with a timeout, since a rank that
skipped the end-of-epoch gather while the other joined it would leave that one waiting forever.

Usage: python -m tests.ddp_one_rank_fails <out folder>
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sens import SensitivityMonitor
from lightning_sens.demos.tiny import TinyClassifier, TinyData

VAL_BATCH = 5  # the validation batches are told apart from the training ones by their size
_seen = {"val": 0}


def batch_fn(batch: Any) -> tuple[Any, Any, None]:
    """Reads (x, y); the first validation batch of epoch 0 on rank 1 fails (the set-up check
    reads one validation batch first)."""
    x, y = batch[0], batch[1]
    if len(y) == VAL_BATCH and dist.is_initialized() and dist.get_rank() == 1:
        _seen["val"] += 1
        if _seen["val"] == 2:
            raise RuntimeError("a corrupt validation batch on rank 1")
    return x, y, None


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    monitor = SensitivityMonitor(
        batch_fn=batch_fn, budget=None, train_probe_size=16, exact_probe_size=2, windows=(1,)
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        logger=TensorBoardLogger(out, name="tb", version=0),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyClassifier(), datamodule=TinyData(val_batch=VAL_BATCH))
    torch.save({"done": True}, out / "done.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
