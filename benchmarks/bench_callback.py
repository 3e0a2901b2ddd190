"""Benchmark: whole training runs with SensitivityMonitor vs. the same runs without it.

Two models, each trained from scratch by ``trainer.fit`` with the same seed:

- ``demo``: the demo's small CNN on real Fashion-MNIST, 12,000 training and 2,000 validation
  images, batch 64 (the model size a newcomer meets first, where a fixed per-epoch cost shows);
- ``resnet18``: torchvision's ResNet-18 adapted to 32 × 32 inputs (3 × 3 stem, no max-pool),
  K = 10, batch 128, Adam, on random CIFAR-sized data (CIFAR10 is not available offline here;
  the cost does not depend on the pixel values);
- ``tiny`` (not run by default): ``lightning_sens.demos.tiny``'s classifier on its random 8 × 8
  images, 64 train / 32 val, batch 16, the model the monitor's tests train: the whole script in
  seconds (``--models tiny --repeats 1``), to check it runs; its ratios mean little, a fixed
  per-epoch cost dwarfs so small a fit.

Configurations, run interleaved (plain, then each monitored one, ``--repeats`` times) so that
the drift of a shared machine hits them alike; the whole ``fit`` is timed, first epoch included:

- ``plain``: no monitor;
- ``default``: ``SensitivityMonitor()``, the time budget of 5 %;
- ``fixed``: ``SensitivityMonitor(budget=None)``: every part every epoch (the schedule before
  the budget), for comparison.

Reported per model and configuration: the median wall time of ``fit``, its ratio to the plain
median, the cost share the monitor logged for itself (``sensitivity_monitor/cost_share`` at the
end of fit) next to the measured one (ratio − 1), and what the budget let run.

Usage: python benchmarks/bench_callback.py [--models demo resnet18 tiny] [--repeats 3]
       [--epochs 3] [--device cpu] [--out benchmarks/results/callback_demo_cpu.md]

docs/performance.md shows ``--models demo --repeats 9 --out .../callback_demo_cpu.md`` and
``--models resnet18 --repeats 3 --out .../callback_resnet_cpu.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.demos.data import load_images
from lightning_sens.demos.models import SmallCNN
from lightning_sens.demos.tiny import TinyClassifier, TinyData
from lightning_sens.reporting import keys

K = 10
CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "default": {},
    "fixed": {"budget": None},
}


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


@dataclass
class Setting:
    name: str
    describe: str
    make: Any  # () -> LightningModule
    train: TensorDataset
    val: TensorDataset
    batch: int


def settings(args: argparse.Namespace) -> dict[str, Setting]:
    out = {}
    if "demo" in args.models:
        _, x, y, xv, yv = load_images("auto", Path(tempfile.gettempdir()) / "lightning_sens")
        out["demo"] = Setting(
            "demo",
            f"demo CNN, Fashion-MNIST {len(y):,} train / {len(yv):,} val, batch 64",
            lambda channels=x.shape[1]: SmallCNN(channels=channels),
            TensorDataset(x, y),
            TensorDataset(xv, yv),
            64,
        )
    if "resnet18" in args.models:
        g = torch.Generator().manual_seed(0)
        n, nv = args.resnet_train, args.resnet_val
        x = torch.randn(n + nv, 3, 32, 32, generator=g)
        y = torch.randint(0, K, (n + nv,), generator=g)
        out["resnet18"] = Setting(
            "resnet18",
            f"ResNet-18 32×32, random data {n:,} train / {nv:,} val, batch 128",
            ResNet,
            TensorDataset(x[:n], y[:n]),
            TensorDataset(x[n:], y[n:]),
            128,
        )
    if "tiny" in args.models:
        tiny = TinyData()
        out["tiny"] = Setting(
            "tiny",
            "tiny CNN (lightning_sens.demos.tiny), random 8×8 data 64 train / 32 val, batch 16",
            TinyClassifier,
            tiny.train_set,
            tiny.val_set,
            16,
        )
    return out


@dataclass
class Run:
    seconds: float
    cpu: float  # CPU seconds of the process, all threads: less sensitive to a busy neighbour
    logged: float = float("nan")  # the monitor's own cost share at the end of fit
    exact: list[int] = field(default_factory=list)  # exact-probe samples per monitored epoch
    figures: int = 0  # figure sets drawn


def run(setting: Setting, options: dict[str, Any] | None, args: argparse.Namespace) -> Run:
    pl.seed_everything(0, verbose=False)
    train = DataLoader(setting.train, batch_size=setting.batch, shuffle=True)
    val = DataLoader(setting.val, batch_size=256)
    monitor = None if options is None else SensitivityMonitor(**options)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator=args.device,
            devices=1,
            callbacks=[] if monitor is None else [monitor],
            logger=TensorBoardLogger(folder, name="", version=""),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = setting.make()
        begin, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, train, val)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    if monitor is None:
        return Run(seconds, cpu)
    every = monitor.config.exact_probe_size  # without a budget: every epoch, all of them
    exact = [int(h.get(keys.exact_probe_size(), every)) for h in monitor.history]
    return Run(seconds, cpu, monitor.budget.cost_share, exact, monitor.figure_sets_drawn)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", choices=["demo", "resnet18", "tiny"], default=["demo", "resnet18"]
    )
    parser.add_argument("--device", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-train", type=int, default=512)
    parser.add_argument("--resnet-val", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table")
    args = parser.parse_args()

    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else "")
    )
    print(f"# bench_callback: {machine}, {args.epochs} epochs, {args.repeats} repeats")
    rows = [
        "| model | configuration | fit (median) | monitored / plain | cost share logged "
        "| measured (ratio − 1) | CPU time ratio | exact probes per epoch | figure sets |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for setting in settings(args).values():
        runs: dict[str, list[Run]] = {name: [] for name in args.configs}
        for _ in range(args.repeats):
            for name in args.configs:
                runs[name].append(run(setting, CONFIGS[name], args))
                print(f"{setting.name:9s} {name:8s} {runs[name][-1]}", flush=True)
        plain = statistics.median(r.seconds for r in runs["plain"])
        plain_cpu = statistics.median(r.cpu for r in runs["plain"])
        for name in args.configs:
            found = runs[name]
            seconds = statistics.median(r.seconds for r in found)
            if name == "plain":
                rows.append(f"| {setting.describe} | plain | {seconds:.1f} s | 1 | | | 1 | | |")
                continue
            logged = statistics.median(r.logged for r in found)
            cpu = statistics.median(r.cpu for r in found) / plain_cpu
            middle = sorted(found, key=lambda r: r.seconds)[len(found) // 2]
            exact = ", ".join(map(str, middle.exact))
            rows.append(
                f"| {setting.describe} | {name} | {seconds:.1f} s | **{seconds / plain:.3f}** "
                f"| {100 * logged:.1f} % | {100 * (seconds / plain - 1):.1f} % | {cpu:.3f} "
                f"| {exact} "
                f"| {middle.figures} |"
            )
    header = (
        f"Measured on {machine}; {args.epochs} epochs per run, whole `fit` timed (first epoch "
        f"included), median of {args.repeats} interleaved repeats "
        '(`python benchmarks/bench_callback.py --out ...`). "exact probes per epoch": samples '
        "per split the exact engine ran on in each monitored epoch of the median run (0: "
        'skipped by the budget); "figure sets": epochs whose figures were drawn.'
    )
    text = "\n".join([header, "", *rows]) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
