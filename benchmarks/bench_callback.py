"""Benchmark: a short training run with SensitivityMonitor at its defaults vs. without it.

Model: torchvision's ResNet-18 adapted to 32 × 32 inputs, K = 10, trained with Adam on random
CIFAR-sized data (CIFAR10 cannot be downloaded here; the cost of monitoring does not depend on
the pixel values). The two configurations run alternately, ``--repeats`` times each, and the
per-epoch wall time is taken from the epochs after the first (which pays for warm-up).

Usage: python benchmarks/bench_callback.py [--train-samples 2048] [--epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor

K = 10


class ResNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=K)
        self.net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, its validation (and monitoring) included."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def run(monitored: bool, args: argparse.Namespace, log_dir: str) -> list[float]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n_train, n_val = args.train_samples, args.val_samples
    x = torch.randn(n_train + n_val, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (n_train + n_val,), generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=256)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer] + ([SensitivityMonitor()] if monitored else [])
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.device,
        devices=1,
        callbacks=callbacks,
        default_root_dir=log_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ResNet(), train, val)
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--val-samples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--log-dir", default="/tmp/bench_callback")
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table")
    args = parser.parse_args()

    epochs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for monitored in (False, True):  # alternated, so that drift hits both alike
            epochs[monitored] += run(monitored, args, f"{args.log_dir}/{int(monitored)}")
    plain, with_monitor = statistics.median(epochs[False]), statistics.median(epochs[True])
    overhead = with_monitor - plain
    per_sample = plain / (args.train_samples + args.val_samples)
    cifar_epoch = per_sample * 50_000  # 45k training + 5k validation samples
    samples = f"{args.train_samples} train + {args.val_samples} val samples"
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# bench_callback: ResNet-18 (32×32), {samples}, device {args.device}, {machine}")
    for name, value, times in (
        ("epoch without monitor", plain, epochs[False]),
        ("epoch with monitor", with_monitor, epochs[True]),
    ):
        print(f"{name:28s}{value:8.2f} s   (epochs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"{'monitoring per epoch':28s}{overhead:8.2f} s   = {100 * overhead / plain:.1f} % of it")
    share = 100 * overhead / cifar_epoch
    label = "45k/5k CIFAR10 epoch, scaled"
    print(f"{label:28s}{cifar_epoch:8.0f} s   monitoring = {share:.1f} % of it")
    if args.out is not None:
        rows = [
            f"Measured on {machine}, device {args.device}, {samples}, {args.epochs} epochs per "
            f"run, median of the epochs after the first "
            f"(`python benchmarks/bench_callback.py --out ...`).",
            "",
            "| | per epoch |",
            "|---|---:|",
            f"| training epoch without the monitor | {plain:.1f} s |",
            f"| with the monitor at its defaults | {with_monitor:.1f} s |",
            f"| monitoring | **{overhead:.1f} s** ({100 * overhead / plain:.0f} % of this epoch) |",
            f"| a full 45k / 5k CIFAR10 epoch on this machine, scaled per sample | "
            f"{cifar_epoch:.0f} s |",
            f"| monitoring as a share of that epoch | **{share:.1f} %** |",
        ]
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
