"""Benchmark: which samples of a multi-label classifier carry a wrong tag, flagged by a default
``SensitivityMonitor()`` during training, against cleanlab's multi-label filter on
cross-validated probabilities.

Real images with tags that say what the image shows (each a fact of its class):

- Fashion-MNIST (6,000 training items, a small CNN), 6 tags: ``top`` (T-shirt, pullover, coat,
  shirt, dress), ``sleeves`` (pullover, coat, shirt), ``footwear`` (sandal, sneaker, ankle boot),
  ``warm`` (pullover, coat, ankle boot), ``open`` (sandal, bag, dress), ``legs`` (trouser);
- scikit-learn's 8 × 8 digits (a plain MLP, the second data set and model), 5 tags: ``even``,
  ``large`` (≥ 5), ``prime``, ``loop`` (0, 6, 8, 9), ``straight`` (1, 4, 7).

A share of the training samples gets one tag wrong: a tag it has is dropped (``missing``) or
one it does not have is added (``extra``), at random (``mixed``: either).

Ours: a Lightning ``Trainer`` with ``SensitivityMonitor()`` at its defaults. It writes every
sample's estimated share of wrong labels but flags no multi-label sample (this benchmark is why:
the rule is not yet quiet on clean tags); the flags here are what the rule would flag, the
training split's ``evidence`` at the last decision ≥ ``position_flag_share`` (0.02), and the
AUROC is the ``evidence``'s. cleanlab:
``cleanlab.multilabel_classification.filter.find_label_issues`` on 2-fold cross-validated
probabilities; its AUROC ranks by ``get_label_quality_scores``. ``loss``: the cross-validated
per-sample loss, a ranking only. Costs: the run with the monitor and cleanlab's two trainings
and filter over a plain run (plain and monitored runs alternate, the fastest of each counts).

Usage: pip install -e ".[bench]"; python benchmarks/multilabel_noise.py [--small] [--out TAG]
(without cleanlab installed, its columns are nan)
writes benchmarks/results/multilabel_noise_<TAG>.md (TAG: ``cpu``; ``small`` with ``--small``),
or the path TAG where it ends in .md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from segmentation_noise import FASHION, auroc, our_flags, scores
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.config import MonitorConfig
from lightning_sens.demos.data import load_images

EPOCHS = 6
BATCH = 64
RATES = (0.05, 0.1, 0.2)
FASHION_TAGS = {
    "top": (0, 2, 3, 4, 6), "sleeves": (2, 4, 6), "footwear": (5, 7, 9), "warm": (2, 4, 9),
    "open": (3, 5, 8), "legs": (1,),
}  # fmt: skip
DIGIT_TAGS = {
    "even": (0, 2, 4, 6, 8), "large": (5, 6, 7, 8, 9), "prime": (2, 3, 5, 7),
    "loop": (0, 6, 8, 9), "straight": (1, 4, 7),
}  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tags_of(classes: Tensor, tags: dict[str, tuple[int, ...]]) -> Tensor:
    """``(N, P)`` 0/1 targets: tag p is 1 where the class is one of its classes."""
    return torch.stack([torch.isin(classes, torch.tensor(c)) for c in tags.values()], 1).float()


def corrupt(targets: Tensor, rate: float, seed: int) -> tuple[Tensor, Tensor]:
    """``rate`` of the samples with one tag flipped (dropped or added); returns them and which."""
    g = torch.Generator().manual_seed(seed)
    out, bad = targets.clone(), torch.zeros(len(targets), dtype=torch.bool)
    for i in torch.randperm(len(targets), generator=g)[: round(rate * len(targets))].tolist():
        p = int(torch.randint(0, targets.shape[1], (1,), generator=g))
        out[i, p] = 1.0 - out[i, p]
        bad[i] = True
    return out, bad


def cnn(tags: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, tags),
    )  # fmt: skip


def mlp(tags: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, tags))


@dataclass(frozen=True)
class Data:
    name: str
    model: str
    images: Tensor
    targets: Tensor
    val_images: Tensor
    val_targets: Tensor

    def net(self) -> nn.Module:
        tags = self.targets.shape[1]
        return cnn(tags) if self.model == "CNN" else mlp(tags)


def load(name: str, small: bool) -> Data:
    if name == "fashion":
        n = 3000 if small else 6000
        _, x, y, xv, yv = load_images("fashion-mnist", FASHION, subset=(n, 500))
        t, tv = tags_of(y, FASHION_TAGS), tags_of(yv, FASHION_TAGS)
        return Data("Fashion-MNIST", "CNN", x, t, xv, tv)
    _, x, y, xv, yv = load_images("digits", FASHION)
    return Data("digits (8 × 8)", "MLP", x, tags_of(y, DIGIT_TAGS), xv, tags_of(yv, DIGIT_TAGS))


class Tagger(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, t = batch
        return F.binary_cross_entropy_with_logits(self(x), t)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, t = batch
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x), t))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def fit(data: Data, targets: Tensor, epochs: int, monitor: bool) -> tuple[float, Path]:
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    train = DataLoader(TensorDataset(data.images, targets), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(data.val_images, data.val_targets), batch_size=500)
    root = Path(tempfile.mkdtemp(prefix="multilabel-noise-"))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[SensitivityMonitor()] if monitor else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tagger(data.net()), train, val)
    return time.perf_counter() - start, Path(trainer.logger.log_dir)


def cross_validated(data: Data, targets: Tensor, epochs: int, seed: int) -> Tensor:
    """Out-of-sample probabilities ``(N, P)`` from two models, each trained on one half."""
    n = len(targets)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    out = torch.zeros(targets.shape)
    for fold, (train, held) in enumerate((halves, halves[::-1])):
        torch.manual_seed(seed + fold)
        net = data.net()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed + fold)
        for _ in range(epochs):
            for step in torch.randperm(len(train), generator=g).split(BATCH):
                i = train[step]
                loss = F.binary_cross_entropy_with_logits(net(data.images[i]), targets[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out[held] = torch.sigmoid(net(data.images[held]))
    return out


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def prf(v: tuple[float, ...]) -> str:
    return f"{v[0]:.2f} / {v[1]:.2f} / **{v[2]:.2f}**"


def run(data: Data, rate: float, epochs: int) -> tuple[list[str], float]:
    """One setting's table row, and how long cleanlab's cross-validation and filter took."""
    targets, bad_t = corrupt(data.targets, rate, seed=1) if rate else (data.targets, None)
    bad = bad_t.numpy() if bad_t is not None else np.zeros(len(targets), bool)
    _, log_dir = fit(data, targets, epochs, monitor=True)
    _, evidence = our_flags(log_dir, len(targets))  # the monitor flags no multi-label sample
    flagged = np.nan_to_num(evidence, nan=0.0) >= MonitorConfig().position_flag_share
    start = time.perf_counter()
    probs = cross_validated(data, targets, epochs, seed=2)
    labels = [np.flatnonzero(row).tolist() for row in targets.numpy()]
    cl, theirs_auroc, seconds = (float("nan"),) * 4, float("nan"), float("nan")
    try:
        from cleanlab.multilabel_classification.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores
    except ImportError:  # the --small test runs with the test extra: its columns stay nan
        log("cleanlab is not installed (pip install -e '.[bench]'): its columns are nan")
    else:
        theirs = find_label_issues(labels, probs.numpy(), n_jobs=1)
        seconds = time.perf_counter() - start
        cl = scores(theirs, bad)
        theirs_auroc = auroc(-get_label_quality_scores(labels, probs.numpy()), bad)
    loss = F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), targets, reduction="none")
    ours = scores(flagged, bad)
    log(f"{data.name} {rate}: ours F1 {ours[2]:.2f} cleanlab {cl[2]:.2f}")
    return [
        data.name, data.model, pct(rate), str(int(bad.sum())), prf(ours), pct(ours[3]),
        f"{auroc(evidence, bad):.3f}", prf(cl), pct(cl[3]), f"{theirs_auroc:.3f}",
        f"{auroc(loss.mean(1).numpy(), bad):.3f}",
    ], seconds  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few images: a smoke test")
    parser.add_argument("--out", default=None, help="results tag, or a path ending in .md")
    args = parser.parse_args()
    tag = args.out or ("small" if args.small else "cpu")
    out = Path(tag) if tag.endswith(".md") else Path(__file__).parent / "results"
    out = out if tag.endswith(".md") else out / f"multilabel_noise_{tag}.md"
    start = time.perf_counter()
    names = ["digits"] if args.small else ["fashion", "digits"]
    epochs = {"fashion": EPOCHS, "digits": 3 if args.small else 4 * EPOCHS}
    rows, cost = [], ""
    for c, name in enumerate(names):
        data = load(name, args.small)
        rates = (0.1,) if args.small else RATES
        found = [run(data, rate, epochs[name]) for rate in (0.0, *rates)]
        rows += [row for row, _ in found]
        if c == 0:  # costs on the first data set's clean tags
            repeats = 1 if args.small else 2
            plain, monitored = [], []
            for _ in range(repeats):
                plain.append(fit(data, data.targets, epochs[name], monitor=False)[0])
                monitored.append(fit(data, data.targets, epochs[name], monitor=True)[0])
            fastest = min(plain)
            cost = (
                f"| {data.name}, {data.model} | {fastest:.0f} s | "
                f"{min(monitored) / fastest:.2f}× | {found[0][1] / fastest:.2f}× |"
            )
    lines = [
        "| data | model | rate | wrong samples | ours (evidence ≥ 0.02) P / R / F1 | ours clean "
        "above the cut | ours AUROC | cleanlab P / R / F1 | cleanlab clean flagged "
        "| cleanlab AUROC | CV loss AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| data, model | plain run | with the monitor | cleanlab (2-fold CV + filter) |",
        "|---|---|---|---|",
        cost,
        "",
        f"`python benchmarks/multilabel_noise.py{' --small' if args.small else ''}`: "
        + "; ".join(f"{n}: {epochs[n]} epochs" for n in names)
        + f", batch {BATCH}, one seed; one tag of each corrupted sample flipped. Costs: the "
        f"fastest of {1 if args.small else 2} runs each, plain and monitored alternating, clean "
        f"tags. Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; the whole benchmark "
        f"{(time.perf_counter() - start) / 60:.0f} min.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
