"""Benchmark: whole training runs with SensitivityMonitor vs. the same runs without it.

Two models, each trained from scratch by ``trainer.fit`` with the same seed:

- ``demo``: the demo's small CNN on real Fashion-MNIST, 12,000 training and 2,000 validation
  images, batch 64 (the model size a newcomer meets first, where a fixed per-epoch cost shows);
- ``resnet18``: torchvision's ResNet-18 adapted to 32 × 32 inputs (3 × 3 stem, no max-pool),
  K = 10, batch 128, Adam, on random CIFAR-sized data (CIFAR10 is not available offline here;
  the cost does not depend on the pixel values);
- ``hydra``: the same CNN and data in the lightning-hydra-template's layout (the network passed
  to ``__init__``, ``model_step`` calling ``self.forward``, a ``validation_step`` that returns
  nothing): the monitor runs a second forward of every validation batch, which its budget counts
  but cannot skip;
- ``mlp``: a model and data set the budget was never tuned on: a two-layer MLP on scikit-learn's
  1,797 real 8 × 8 digits (1,497 train / 300 val, batch 8), hundreds of fifth-of-a-second
  epochs, so that the costs of every decision recur often;
- ``lm``: a tiny Llama (Hugging Face ``LlamaForCausalLM``, 2 layers, width 64, a 2,048-token
  vocabulary) on the Python standard library's source (``benchmarks/lm_damage.py``'s corpus),
  batches of 16 sequences of 64 tokens whose labels are the inputs (the causal shift): every
  training step's 16 × 64 × 2,048 logits are scored (docs/tasks.md);
- ``segmentation``: a small U-Net on masks made from Fashion-MNIST (foreground pixels labelled
  with the item's class, 11 classes), 6,000 train / 1,000 val, batch 64;
- ``tiny`` (not run by default): ``lightning_sens.demos.tiny``'s classifier on its random 8 × 8
  images, 64 train / 32 val, batch 16, the model the monitor's tests train: the whole script in
  seconds (``--models tiny --repeats 1``), to check it runs; its ratios mean little, a fixed
  per-epoch cost dwarfs so small a fit.

Each model trains for enough epochs that a plain ``fit`` lasts about a minute or more on a 2-core
CPU (the budget's promise holds for runs of a minute or more; ``--epochs`` overrides).

Configurations, run interleaved (plain, then each monitored one, ``--repeats`` times) so that
the drift of a shared machine hits them alike; the whole ``fit`` is timed, first epoch included:

- ``plain``: no monitor;
- ``default``: ``SensitivityMonitor()``, the time budget of 5 %;
- ``fixed``: ``SensitivityMonitor(budget=None)``: every part every epoch (the schedule before
  the budget), for comparison.

Reported per model and configuration: the median wall time of ``fit``, its ratio to the plain
median, the cost share the monitor logged for itself (``sensitivity_monitor/cost_share`` at the
end of fit) next to the measured one (ratio − 1) and their difference in points, the largest
share of a part it never skips (``monitor.budget.totals``), and what the budget let run.

Usage: python benchmarks/bench_callback.py [--models demo resnet18 hydra mlp tiny]
       [--repeats 3] [--epochs N] [--device cpu] [--out benchmarks/results/callback_demo_cpu.md]

docs/performance.md shows ``--models demo hydra mlp --repeats 5 --out
.../callback_demo_cpu.md`` and ``--models lm segmentation --repeats 2 --out
.../callback_tasks_cpu.md``.
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
from lightning_sens.callbacks.planner import FLAGS, SECOND_FORWARD, TRAIN_STEPS, VALIDATION_SCORES
from lightning_sens.demos.data import load_images
from lightning_sens.demos.models import SmallCNN
from lightning_sens.demos.tiny import TinyClassifier, TinyData
from lightning_sens.reporting import keys

NEVER_SKIPPED = (SECOND_FORWARD, VALIDATION_SCORES, TRAIN_STEPS, FLAGS)

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


class Hydra(pl.LightningModule):
    """The lightning-hydra-template's layout around any network: no logits returned from
    ``validation_step``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.forward(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model_step(batch), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, K)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class CausalLM(pl.LightningModule):
    """A tiny Llama trained on its own next-token loss; batches (input ids, labels = ids)."""

    def __init__(self) -> None:
        super().__init__()
        from lm_damage import build

        self.model = build(0)

    def forward(self, input_ids: Tensor) -> Any:
        return self.model(input_ids=input_ids)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        output = self.model(input_ids=batch[0], labels=batch[1])
        self.log("val_loss", output.loss)
        return output.logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _masks(x: Tensor, y: Tensor) -> Tensor:
    """Foreground pixels (above 0.1) labelled with the item's class + 1, background 0."""
    return torch.where(x[:, 0] > 0.1, y[:, None, None] + 1, torch.zeros_like(x[:, 0]).long())


class Segmenter(pl.LightningModule):
    """A small U-Net: two strided encoder stages, a global context vector, two decoder stages
    with skips; (B, 11, H, W) logits, cross-entropy per pixel."""

    def __init__(self, width: int = 16, classes: int = 11) -> None:
        super().__init__()
        c = width
        self.e1, self.e2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.e3, self.context = nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.Linear(4 * c, 4 * c)
        self.d2, self.d1 = nn.Conv2d(6 * c, 2 * c, 3, padding=1), nn.Conv2d(3 * c, c, 3, padding=1)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.e1(x))
        b = torch.relu(self.e2(a))
        c = torch.relu(self.e3(b))
        c = c + self.context(c.mean((2, 3)))[:, :, None, None]
        up = nn.functional.interpolate
        d = torch.relu(self.d2(torch.cat([up(c, size=b.shape[-2:]), b], 1)))
        return self.head(torch.relu(self.d1(torch.cat([up(d, size=a.shape[-2:]), a], 1))))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        logits = self(batch[0])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


@dataclass
class Setting:
    name: str
    describe: str
    make: Any  # () -> LightningModule
    train: TensorDataset
    val: TensorDataset
    batch: int
    epochs: int  # a plain fit of about a minute on a 2-core CPU


def settings(args: argparse.Namespace) -> dict[str, Setting]:
    out = {}
    if "demo" in args.models or "hydra" in args.models:
        _, x, y, xv, yv = load_images("auto", Path(tempfile.gettempdir()) / "lightning_sens")
        data = f"Fashion-MNIST {len(y):,} train / {len(yv):,} val, batch 64"
        channels = x.shape[1]
        if "demo" in args.models:
            out["demo"] = Setting(
                "demo",
                f"demo CNN, {data}",
                lambda: SmallCNN(channels=channels),
                TensorDataset(x, y),
                TensorDataset(xv, yv),
                64,
                36,
            )
        if "hydra" in args.models:
            out["hydra"] = Setting(
                "hydra",
                f"demo CNN in the hydra template's layout (no logits from validation_step), {data}",
                lambda: Hydra(SmallCNN(channels=channels).net),
                TensorDataset(x, y),
                TensorDataset(xv, yv),
                64,
                36,
            )
    if "mlp" in args.models:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        out["mlp"] = Setting(
            "mlp",
            "MLP 64-512-10 with dropout, scikit-learn digits 1,497 train / 300 val, batch 8",
            MLP,
            TensorDataset(x[300:], y[300:]),
            TensorDataset(x[:300], y[:300]),
            8,
            400,
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
            7,
        )
    if "lm" in args.models:
        from lm_damage import corpus, sequences

        tokens = sequences(corpus(300_000)[0])
        cut = int(0.9 * len(tokens))
        out["lm"] = Setting(
            "lm",
            f"tiny Llama (V = 2,048), Python stdlib source, {cut:,} train / {len(tokens) - cut:,} "
            "val sequences of 64 tokens, batch 16",
            CausalLM,
            TensorDataset(tokens[:cut], tokens[:cut]),
            TensorDataset(tokens[cut:], tokens[cut:]),
            16,
            4,
        )
    if "segmentation" in args.models:
        _, x, y, xv, yv = load_images(
            "fashion-mnist", Path(tempfile.gettempdir()) / "lightning_sens", subset=(6_000, 1_000)
        )
        out["segmentation"] = Setting(
            "segmentation",
            "small U-Net, Fashion-MNIST masks (11 classes) 6,000 train / 1,000 val, batch 64",
            Segmenter,
            TensorDataset(x, _masks(x, y)),
            TensorDataset(xv, _masks(xv, yv)),
            64,
            4,
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
            3,
        )
    return out


@dataclass
class Run:
    seconds: float
    cpu: float  # CPU seconds of the process, all threads: less sensitive to a busy neighbour
    logged: float = float("nan")  # the monitor's own cost share at the end of fit
    exact: list[int] = field(default_factory=list)  # exact-probe samples per decision
    figures: int = 0  # figure sets drawn
    never: tuple[str, float] = ("", float("nan"))  # the largest never-skipped part, its share
    positions: str = ""  # many positions: every n-th scored, and what scoring all took


def run(setting: Setting, options: dict[str, Any] | None, args: argparse.Namespace) -> Run:
    pl.seed_everything(0, verbose=False)
    train = DataLoader(setting.train, batch_size=setting.batch, shuffle=True)
    val = DataLoader(setting.val, batch_size=256)
    monitor = None if options is None else SensitivityMonitor(**options)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_epochs=args.epochs or setting.epochs,
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
    budget = monitor.budget
    largest = max(NEVER_SKIPPED, key=lambda part: budget.totals.get(part, 0.0))
    never = (largest, budget.share_of((largest,)))
    positions = ""
    if monitor.reader.layout is not None:  # the stride the monitor chose, from what all took
        full = monitor._train.stride.full if monitor._train.stride is not None else float("nan")
        positions = f"every {monitor.reader.stride} (all: {100 * full:.1f} %)"
    drawn = monitor.figure_sets_drawn
    return Run(seconds, cpu, budget.cost_share, exact, drawn, never, positions)


def _runs_of(values: list[int]) -> str:
    """``[4, 0, 0, 0]`` as ``4 × 1, 0 × 3``."""
    parts: list[list[int]] = []
    for value in values:
        if parts and parts[-1][0] == value:
            parts[-1][1] += 1
        else:
            parts.append([value, 1])
    return ", ".join(f"{value} × {count}" for value, count in parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["demo", "resnet18", "hydra", "mlp", "tiny", "lm", "segmentation"],
        default=["demo", "hydra", "mlp"],
    )
    parser.add_argument("--device", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=None, help="default: each model's own")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-train", type=int, default=512)
    parser.add_argument("--resnet-val", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=["plain", "default"])
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table")
    args = parser.parse_args()

    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else "")
    )
    print(f"# bench_callback: {machine}, {args.repeats} repeats")
    rows = [
        "| model | epochs | configuration | fit (median) | monitored / plain | cost share logged "
        "| measured (ratio − 1) | logged − measured | each repeat's ratio | largest never-skipped "
        "part | positions scored (scoring all took) | CPU time ratio | exact probes per decision "
        "| figure sets |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|",
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
            epochs = args.epochs or setting.epochs
            if name == "plain":
                rows.append(
                    f"| {setting.describe} | {epochs} | plain | {seconds:.1f} s | 1 | | | | | "
                    "| | 1 | | |"
                )
                continue
            logged = statistics.median(r.logged for r in found)
            measured = seconds / plain - 1
            cpu = statistics.median(r.cpu for r in found) / plain_cpu
            middle = sorted(found, key=lambda r: r.seconds)[len(found) // 2]
            exact = _runs_of(middle.exact)
            part, share = middle.never
            # Each repeat against the plain run beside it: the spread the median hides.
            pairs = zip(found, runs["plain"], strict=True)
            paired = sorted(watched.seconds / beside.seconds for watched, beside in pairs)
            spread = ", ".join(f"{ratio:.2f}" for ratio in paired)
            rows.append(
                f"| {setting.describe} | {epochs} | {name} | {seconds:.1f} s "
                f"| **{seconds / plain:.3f}** | {100 * logged:.1f} % | {100 * measured:.1f} % "
                f"| {100 * (logged - measured):+.1f} | {spread} | {part}, {100 * share:.1f} % "
                f"| {middle.positions} | {cpu:.3f} "
                f"| {exact} | {middle.figures} |"
            )
    header = (
        f"Measured on {machine}; whole `fit` timed (first epoch included), median of "
        f"{args.repeats} interleaved repeats (`python benchmarks/bench_callback.py --out ...`). "
        '"logged − measured": points between the share the monitor logged and the measured one; '
        '"each repeat\'s ratio": each monitored run over the plain run beside it, sorted; '
        '"largest never-skipped part": its share of the rest of training in the median run; '
        '"positions scored": every how many positions of a sample the monitor scored, and the '
        "share of training time that scoring every position took over its first steps; "
        '"exact probes per decision": samples per split the exact engine ran on at each '
        "decision of the median run (0: skipped by the budget; `4 × 1, 0 × 12`: 4 at one "
        'decision, then 0 at twelve); "figure sets": decisions whose figures were drawn.'
    )
    text = "\n".join([header, "", *rows]) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
