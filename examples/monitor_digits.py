"""Train a small CNN on real handwritten digits and watch its sensitivity in TensorBoard.

The data are scikit-learn's 1,797 real 8 × 8 digits (shipped inside the package, no download).
A few percent of the training labels are deliberately corrupted so that the influence measure has
something to find. Every validation epoch, a small callback built on the lightning-sens engine
logs to TensorBoard:

- the closed-form FI of every validation sample (true and predicted label), as quantiles of
  log FI (the paper's Setup 3 statistics);
- the exact engine on a fixed probe of training samples: the fraction of samples whose
  whole-input FI reaches the closed form (effective rank K − 1), per-layer scaling FI, and the
  mean single-pixel FI map as an image;
- at the end, how many of the corrupted samples rank among the highest-FI training samples.

This script stands in for the `SensitivityMonitor` callback until it exists.

Usage:
    python examples/monitor_digits.py [--max-epochs 15] [--out runs/digits]
    tensorboard --logdir runs/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import closed_form_fi, sensitivity

QUANTILES = (0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


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
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ProbeSensitivity(pl.Callback):
    """Closed-form FI of the validation set and the exact engine on a fixed training probe."""

    def __init__(self, data: dict[str, Tensor], probe_size: int = 64) -> None:
        self.data = data
        self.probe = torch.randperm(
            len(data["y_train"]), generator=torch.Generator().manual_seed(7)
        )[:probe_size]

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        writer = trainer.logger.experiment  # type: ignore[union-attr]
        with torch.no_grad():
            logits = module(self.data["x_val"])  # validation runs in eval mode already
        for target, name in ((self.data["y_val"], "true"), ("pred", "pred")):
            log_fi = closed_form_fi(logits, target).log_fi.float()
            for q, value in zip(
                QUANTILES, torch.quantile(log_fi, torch.tensor(QUANTILES)), strict=True
            ):
                writer.add_scalar(f"sensitivity/val_{name}/log_fi_q{int(q * 100)}", value, step)
            writer.add_histogram(f"sensitivity/val_{name}/log_fi", log_fi, step)

        x, y = self.data["x_train"][self.probe], self.data["y_train"][self.probe]
        result = sensitivity(module, x, y, windows=(1, 3))
        assert result.input is not None
        assert result.parameters is not None
        full_rank = (result.input.whole.effective_rank == 9).float().mean()
        writer.add_scalar("sensitivity/probe/closed_form_holds", full_rank, step)
        for layer, scores in result.parameters.layers.items():
            writer.add_scalar(
                f"sensitivity/layer_scale_log_fi/{layer}", scores.scale.log_fi.median(), step
            )
        pixel = result.input.maps[1].relative_fi.mean(0)  # (1, 8, 8) share of the maximum
        writer.add_image(
            "sensitivity/probe/mean_pixel_relative_fi", pixel / pixel.max().clamp_min(1e-12), step
        )

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        with torch.no_grad():
            logits = module.eval()(self.data["x_train"])
        log_fi = closed_form_fi(logits, self.data["y_train"]).log_fi
        top = log_fi.argsort(descending=True)[: 2 * len(self.data["corrupted"])]
        found = len(set(top.tolist()) & set(self.data["corrupted"].tolist()))
        trainer.logger.experiment.add_scalar(  # type: ignore[union-attr]
            "sensitivity/train/corrupted_in_top", found, trainer.global_step
        )
        n_bad = len(self.data["corrupted"])
        print(f"{found} of {n_bad} corrupted labels rank in the top {len(top)} training FI.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-epochs", type=int, default=15)
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
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        logger=logger,
        callbacks=[ProbeSensitivity(data)],
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=10,
    )
    trainer.fit(SmallCNN(), train, val)
    print(f"TensorBoard logs: {logger.log_dir}\nView them with: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
