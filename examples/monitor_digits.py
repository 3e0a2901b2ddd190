"""Train a small CNN on real handwritten digits with SensitivityMonitor watching, then look at it.

The data are scikit-learn's 1,797 real 8 × 8 digits (shipped inside the package, no download).
3 % of the training labels are deliberately corrupted, so that the flags have something to find:
the monitor scans the whole training set every epoch (``scan_train_set=True``) and flags samples
whose influence measure, with their (possibly wrong) label, is unusually high.

Usage:
    python examples/monitor_digits.py [--max-epochs 8] [--out runs/digits]
    tensorboard --logdir runs/digits
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor


def digits_data(corrupt_fraction: float, seed: int) -> dict[str, Tensor]:
    """Real digits scaled to [0, 1], split 1,297 / 500, with some training labels corrupted."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    x_train, y_train, x_val, y_val = x[:1297], y[:1297].clone(), x[1297:], y[1297:]
    generator = torch.Generator().manual_seed(seed + 1)
    n_bad = int(corrupt_fraction * len(y_train))
    corrupted = torch.randperm(len(y_train), generator=generator)[:n_bad]
    shift = torch.randint(1, 10, (n_bad,), generator=generator)
    y_train[corrupted] = (y_train[corrupted] + shift) % 10
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "corrupted": corrupted,
    }


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())
        return logits  # the monitor scores these: no second forward pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def flagged_per_epoch(folder: Path, corrupted: Tensor) -> list[tuple[int, int, int]]:
    """(epoch, training samples flagged, how many of them have a corrupted label) per epoch."""
    bad = set(corrupted.tolist())
    out = []
    for table in sorted(folder.glob("flags_epoch*.csv")):
        with table.open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "train_all"]
        flagged = {int(r["sample"]) for r in rows if r["flagged"] == "True"}
        out.append((int(rows[0]["epoch"]), len(flagged), len(flagged & bad)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument(
        "--corrupt", type=float, default=0.03, help="fraction of training labels to corrupt"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = digits_data(args.corrupt, args.seed)
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(data["x_val"], data["y_val"]), batch_size=250)
    logger = TensorBoardLogger(args.out, name="", version="")
    monitor = SensitivityMonitor(train_probe_size=256, exact_probe_size=32, scan_train_set=True)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=10,
    )
    trainer.fit(SmallCNN(), train, val)

    print(f"Flagged training samples ({len(data['corrupted'])} labels were corrupted):")
    for epoch, flagged, hits in flagged_per_epoch(
        Path(logger.log_dir) / "sensitivity", data["corrupted"]
    ):
        print(f"  epoch {epoch:2d}: {flagged:3d} flagged, {hits:3d} of them corrupted")
    print("(As the network memorises the wrong labels, their FI falls: flag early.)")
    print(f"TensorBoard logs: {logger.log_dir}\nView them with: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
