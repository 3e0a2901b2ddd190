"""Benchmark: which segmentation masks are wrong, flagged by a default ``SensitivityMonitor()``
during training, against cleanlab's segmentation filter on cross-validated probabilities.

Real images turned into masks: every Fashion-MNIST item's pixels above ``THRESHOLD`` are labelled
with its class (1–10), the rest background (0); a second data set and model, scikit-learn's 8 × 8
digits with a plain fully convolutional net (no skips, no global context), checks that the rule
was not tuned to the first. A share of the training masks is corrupted, one kind per run:

- ``class``: the whole object drawn with another class;
- ``shift``: the mask moved by a ninth of the image side (3 pixels of 28) diagonally;
- ``erode``: the object's border taken away (2 pixels of 28, 1 of 8) and labelled background;
- ``mixed``: each corrupted mask one of the three at random.

Ours: a Lightning ``Trainer`` with ``SensitivityMonitor()`` at its defaults trains the model
(``EPOCHS`` epochs, Adam); the flags are the positions table's ``flagged`` column of the training
split at the last decision (docs/tasks.md, "Flags: which samples' labels look wrong"); its AUROC
ranks by the ``evidence`` column. Cost: that run's time over the same run without the monitor.

cleanlab: ``cleanlab.segmentation.filter.find_label_issues`` on 2-fold cross-validated
probabilities (two more trainings of the same model on half the data each, as its docs ask:
out-of-sample probabilities); an image is flagged when any of its pixels is an issue, as
``cleanlab.segmentation.summary`` counts images with issues; its AUROC ranks by
``get_label_quality_scores``' image score. ``loss``: the cross-validated per-image loss, a
ranking only.

Cost, per data set, on the clean masks: the run with the monitor and cleanlab's two trainings and
filter, each over a plain run without the monitor; plain and monitored runs alternate twice and
the faster of each pair counts.

Usage: pip install -e ".[bench]"; python benchmarks/segmentation_noise.py [--small] [--out TAG]
[--data all|fashion|digits] [--strides] (without cleanlab installed, its columns are nan)
writes benchmarks/results/segmentation_noise_<TAG>.md (TAG: ``cpu``; ``small`` with
``--small``, a smoke test of a couple of minutes on 2 CPU cores), or the path TAG where it ends
in .md; ``--strides``: the flags at fixed ``position_stride`` values instead, in
segmentation_strides_<TAG>.md.
"""

from __future__ import annotations

import argparse
import csv
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.demos.data import load_images

THRESHOLD = 0.1  # Fashion-MNIST pixels above it are the item (0.3 for the digits)
EPOCHS = 6
SMALL_EPOCHS = 6
DIGITS_EPOCHS = (6, 24)  # 66 steps, the model still far from fitting; 264, about Fashion's 282
BATCH = 128
RATES = (0.05, 0.1, 0.2)
KINDS = ("class", "shift", "erode", "mixed")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def masks_of(images: Tensor, classes: Tensor, threshold: float) -> Tensor:
    """Per pixel: the item's class + 1 where the pixel is brighter than ``threshold``, else 0."""
    item = images[:, 0] > threshold
    return torch.where(item, classes[:, None, None] + 1, torch.zeros_like(item, dtype=torch.long))


def corrupt(masks: Tensor, rate: float, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """``rate`` of the masks corrupted by ``kind``; returns the masks and which changed."""
    g = torch.Generator().manual_seed(seed)
    n, side = len(masks), masks.shape[-1]
    chosen = torch.randperm(n, generator=g)[: round(rate * n)]
    out = masks.clone()
    shift, border = max(side // 9, 1), max(side // 14, 1)
    for i in chosen.tolist():
        how = kind if kind != "mixed" else KINDS[int(torch.randint(0, 3, (1,), generator=g))]
        m = masks[i]
        if how == "class":
            item = int(m.max())  # the item's class + 1 (0: an empty mask stays empty)
            other = (item - 1 + int(torch.randint(1, 10, (1,), generator=g))) % 10 + 1
            out[i] = torch.where(m > 0, other, 0)
        elif how == "shift":
            dy, dx = ((torch.randint(0, 2, (2,), generator=g) * 2 - 1) * shift).tolist()
            out[i] = torch.roll(m, shifts=(dy, dx), dims=(0, 1))
        else:  # erode: a pixel stays the item's where its whole neighbourhood is
            inside = -F.max_pool2d(-(m > 0).float()[None, None], 2 * border + 1, 1, border)
            out[i] = torch.where(inside[0, 0] > 0, m, 0)
    changed = (out != masks).flatten(1).any(1)
    return out, changed


class UNet(nn.Module):
    """A small U-Net: two strided stages, a global-context vector, two skip connections."""

    def __init__(self, classes: int = 11, width: int = 16) -> None:
        super().__init__()
        c = width
        self.enc1 = nn.Conv2d(1, c, 3, padding=1)
        self.enc2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.enc3 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.context = nn.Linear(4 * c, 4 * c)
        self.dec2 = nn.Conv2d(6 * c, 2 * c, 3, padding=1)
        self.dec1 = nn.Conv2d(3 * c, c, 3, padding=1)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.enc1(x))
        b = F.relu(self.enc2(a))
        c = F.relu(self.enc3(b))
        c = c + self.context(c.mean((2, 3)))[:, :, None, None]
        up = F.interpolate(c, size=b.shape[-2:])
        d = F.relu(self.dec2(torch.cat([up, b], 1)))
        e = F.relu(self.dec1(torch.cat([F.interpolate(d, size=a.shape[-2:]), a], 1)))
        return self.head(e)


def fcn(classes: int = 11, width: int = 32) -> nn.Module:
    """A plain fully convolutional net: every pixel sees a 7 × 7 window, nothing global."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, classes, 1),
    )


class Segmenter(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


@dataclass(frozen=True)
class Data:
    name: str
    model: str
    images: Tensor
    masks: Tensor
    val_images: Tensor
    val_masks: Tensor

    def net(self) -> nn.Module:
        return UNet() if self.model == "U-Net" else fcn()


def load(name: str, small: bool) -> Data:
    if name == "fashion":
        n = 3000 if small else 6000
        _, x, y, xv, yv = load_images("fashion-mnist", FASHION, subset=(n, 500))
        return Data("Fashion-MNIST", "U-Net", x, masks_of(x, y, 0.1), xv, masks_of(xv, yv, 0.1))
    _, x, y, xv, yv = load_images("digits", FASHION)
    return Data("digits (8 × 8)", "FCN", x, masks_of(x, y, 0.3), xv, masks_of(xv, yv, 0.3))


def fit(
    data: Data,
    masks: Tensor,
    epochs: int,
    monitor: bool,
    seed: int,
    options: dict[str, object] | None = None,
) -> tuple[float, Path]:
    """Train with Lightning (with or without a monitor, at its defaults unless ``options``);
    (seconds, log folder)."""
    L.seed_everything(seed, verbose=False)
    model = Segmenter(data.net())
    train = DataLoader(TensorDataset(data.images, masks), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(data.val_images, data.val_masks), batch_size=500)
    root = Path(tempfile.mkdtemp(prefix="segmentation-noise-"))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[SensitivityMonitor(**(options or {}))] if monitor else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val)
    return time.perf_counter() - start, Path(trainer.logger.log_dir)


def our_flags(log_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split's ``flagged`` and ``evidence`` at the last decision, per sample."""
    tables = sorted(
        (log_dir / "sensitivity").glob("positions_epoch*_step*.csv"),
        key=lambda p: int(p.stem.split("_step")[1]),
    )
    flagged, evidence = np.zeros(n, bool), np.full(n, np.nan)
    with tables[-1].open() as f:
        for row in csv.DictReader(f):
            if row["split"] == "train":
                i = int(row["sample"])
                flagged[i] = row["flagged"] == "True"
                evidence[i] = float(row["evidence"])
    return flagged, evidence


def stride_of(log_dir: Path) -> int:
    """Every how many positions the monitor scored at the end (its ``position_stride``, chosen
    from the measured cost): the largest ratio of a training sample's positions to those
    scored in the last table, rounded down to a power of two."""
    tables = sorted((log_dir / "sensitivity").glob("positions_epoch*_step*.csv"))
    ratio = 1.0
    with tables[-1].open() as f:
        for row in csv.DictReader(f):
            if row["split"] == "train" and float(row["scored"]) > 0:
                ratio = max(ratio, float(row["positions"]) / float(row["scored"]))
    return 1 << (int(ratio + 1e-9).bit_length() - 1)


def decisions_of(log_dir: Path) -> int:
    """How many decisions the monitor made (one positions table each): at defaults the time
    budget may leave some validations out, so a run's flags depend on the machine's speed."""
    return len(list((log_dir / "sensitivity").glob("positions_epoch*_step*.csv")))


def cross_validated(data: Data, masks: Tensor, epochs: int, seed: int) -> Tensor:
    """Out-of-sample probabilities ``(N, K, H, W)`` from two models, each trained on one half."""
    n = len(masks)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    out = torch.zeros(n, 11, *masks.shape[1:])
    for fold, (train, held) in enumerate((halves, halves[::-1])):
        torch.manual_seed(seed + fold)
        net = data.net()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed + fold)
        for _ in range(epochs):
            for step in torch.randperm(len(train), generator=g).split(BATCH):
                i = train[step]
                loss = F.cross_entropy(net(data.images[i]), masks[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            for part in held.split(500):
                out[part] = torch.softmax(net(data.images[part]), 1)
    return out


def scores(flagged: np.ndarray, bad: np.ndarray) -> tuple[float, float, float, float]:
    """Precision, recall, F1 and the share of clean samples flagged."""
    hit = int((flagged & bad).sum())
    precision = hit / max(int(flagged.sum()), 1)
    recall = hit / max(int(bad.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return precision, recall, f1, float((flagged & ~bad).sum() / max(int((~bad).sum()), 1))


def auroc(score: np.ndarray, bad: np.ndarray) -> float:
    """The probability that a corrupted mask outranks a clean one (ties count half)."""
    if bad.all() or not bad.any():
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.nan_to_num(score, nan=-np.inf))
    m, n = int(bad.sum()), int((~bad).sum())
    return float((ranks[bad].sum() - m * (m + 1) / 2) / (m * n))


@dataclass
class Row:
    data: str
    kind: str
    rate: float
    bad: int
    ours: tuple[float, float, float, float]
    ours_auroc: float
    cleanlab: tuple[float, float, float, float]
    cleanlab_auroc: float
    loss_auroc: float
    cleanlab_seconds: float
    stride: int = 1  # every how many positions of a mask the monitor scored
    decisions: int = 0  # how many decisions it made


NAN4 = (float("nan"),) * 4


def run(data: Data, kind: str, rate: float, epochs: int, label: str, seed: int = 0) -> Row:
    masks, changed = (
        corrupt(data.masks, rate, kind, seed + 1) if rate else (data.masks, torch.zeros(0))
    )
    bad = changed.numpy() if rate else np.zeros(len(masks), bool)
    _, log_dir = fit(data, masks, epochs, monitor=True, seed=seed)
    flagged, evidence = our_flags(log_dir, len(masks))
    start = time.perf_counter()
    probs = cross_validated(data, masks, epochs, seed + 2)
    labels, pred = masks.numpy(), probs.numpy()
    theirs, theirs_auroc, cleanlab_seconds = NAN4, float("nan"), float("nan")
    try:
        from cleanlab.segmentation.filter import find_label_issues
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:  # the --small test runs with the test extra: its columns stay nan
        log("cleanlab is not installed (pip install -e '.[bench]'): its columns are nan")
    else:
        issues = find_label_issues(labels, pred, verbose=False, n_jobs=1)
        cleanlab_seconds = time.perf_counter() - start
        theirs = scores(issues.reshape(len(issues), -1).any(1), bad)
        theirs_auroc = auroc(-get_label_quality_scores(labels, pred, verbose=False)[0], bad)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), masks, reduction="none").flatten(1).mean(1)
    row = Row(
        label,
        kind if rate else "none",
        rate,
        int(bad.sum()),
        scores(flagged, bad),
        auroc(evidence, bad),
        theirs,
        theirs_auroc,
        auroc(loss.numpy(), bad),
        cleanlab_seconds,
        stride_of(log_dir),
        decisions_of(log_dir),
    )
    log(f"{row.data} {row.kind} {rate}: ours F1 {row.ours[2]:.2f} cleanlab {row.cleanlab[2]:.2f}")
    return row


def timings(data: Data, epochs: int, repeats: int) -> tuple[float, float]:
    """Seconds of a plain run and of a run with a default monitor on the clean masks: the
    fastest of ``repeats`` of each, run alternately."""
    plain, monitored = [], []
    for _ in range(repeats):
        plain.append(fit(data, data.masks, epochs, monitor=False, seed=0)[0])
        monitored.append(fit(data, data.masks, epochs, monitor=True, seed=0)[0])
    return min(plain), min(monitored)


def report(
    rows: list[Row], costs: dict[str, tuple[float, float]], args: argparse.Namespace, took: float
) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    lines = [
        "| data, model, training | corruption | rate | wrong masks | ours: every n-th position "
        "| ours: decisions | ours P / R / F1 | ours clean flagged | ours AUROC "
        "| cleanlab P / R / F1 | cleanlab clean flagged | cleanlab AUROC | CV loss AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, theirs = r.ours, r.cleanlab
        lines.append(
            f"| {r.data} | {r.kind} | {pct(r.rate)} | {r.bad} | {r.stride} | {r.decisions} "
            f"| {ours[0]:.2f} / {ours[1]:.2f} / **{ours[2]:.2f}** | {pct(ours[3])} "
            f"| {r.ours_auroc:.3f} | {theirs[0]:.2f} / {theirs[1]:.2f} / **{theirs[2]:.2f}** "
            f"| {pct(theirs[3])} | {r.cleanlab_auroc:.3f} | {r.loss_auroc:.3f} |"
        )
    lines += [
        "",
        "| data, model, training | plain run | with the monitor | cleanlab (2-fold CV + filter) |",
    ]
    lines.append("|---|---|---|---|")
    for name, (plain, monitored) in costs.items():
        clean = next(r for r in rows if r.data == name and r.kind == "none")
        lines.append(
            f"| {name} | {plain:.0f} s | {monitored / plain:.2f}× "
            f"| {clean.cleanlab_seconds / plain:.2f}× |"
        )
    lines += [
        "",
        f"`python benchmarks/segmentation_noise.py{' --small' if args.small else ''}`: "
        f"batch {BATCH}, one seed. Costs: the "
        f"fastest of {1 if args.small else 2} runs each, plain and monitored alternating, on the "
        "clean masks. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; the whole benchmark {took / 60:.0f} min.",
    ]
    return "\n".join(lines) + "\n"


def strides(args: argparse.Namespace) -> str:
    """The flags at fixed strides (``position_stride``: every n-th pixel), on clean masks and
    with 10 % mixed corruption: why a stride leaves a mask where labels are judged at least
    4 / ``position_flag_share`` of its pixels (docs/tasks.md, "What scoring costs, and every n-th
    position")."""
    lines = [
        "| data, model, training | every n-th pixel | clean masks flagged (clean data) "
        "| F1, 10 % mixed | clean masks flagged, 10 % mixed |",
        "|---|---|---|---|---|",
    ]
    plans = [("fashion", SMALL_EPOCHS if args.small else EPOCHS, (1, 2, 4, 8))]
    plans += [] if args.small else [("digits", DIGITS_EPOCHS[0], (1, 2, 4))]
    for name, epochs, chosen in plans:
        data = load(name, args.small)
        masks, changed = corrupt(data.masks, 0.1, "mixed", 1)
        bad = changed.numpy()
        for stride in chosen:
            options = {"position_stride": stride, "budget": None}  # every decision made
            log_dir = fit(data, data.masks, epochs, True, 0, options)[1]
            clean = scores(our_flags(log_dir, len(data.masks))[0], np.zeros(len(bad), bool))[3]
            found = scores(
                our_flags(fit(data, masks, epochs, True, 0, options)[1], len(bad))[0], bad
            )
            lines.append(
                f"| {data.name}, {data.model}, {epochs} epochs | {stride} | {100 * clean:.1f} % "
                f"| {found[2]:.2f} | {100 * found[3]:.1f} % |"
            )
            log(lines[-1])
    lines += [
        "",
        f"`python benchmarks/segmentation_noise.py --strides{' --small' if args.small else ''}`: "
        f"batch {BATCH}, one seed, the monitor at its defaults but for `position_stride` and "
        "`budget=None` (a decision at every validation, whatever the machine's speed). "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few images and epochs: a smoke test")
    parser.add_argument("--out", default=None, help="results tag, or a path ending in .md")
    parser.add_argument("--data", choices=("all", "fashion", "digits"), default="all")
    parser.add_argument(
        "--strides", action="store_true", help="the flags at fixed strides instead (its own file)"
    )
    args = parser.parse_args()
    tag = args.out or ("small" if args.small else "cpu")
    out = Path(tag) if tag.endswith(".md") else Path(__file__).parent / "results"
    stem = "segmentation_strides" if args.strides else "segmentation_noise"
    out = out if tag.endswith(".md") else out / f"{stem}_{tag}.md"
    if args.strides:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(strides(args))
        return log(f"wrote {out}")
    start = time.perf_counter()
    rows, costs = [], {}
    plans = (
        [("fashion", SMALL_EPOCHS, [("none", 0.0), ("mixed", 0.1)])]
        if args.small
        else [("fashion", EPOCHS, [("none", 0.0)] + [(k, r) for k in KINDS for r in RATES])]
        + [("digits", e, [("none", 0.0), ("mixed", 0.1)]) for e in DIGITS_EPOCHS]
    )
    for name, epochs, settings in plans:
        if args.data not in ("all", name):
            continue
        data = load(name, args.small)
        label = f"{data.name}, {data.model}, {epochs} epochs"
        costs[label] = timings(data, epochs, 1 if args.small else 2)
        for kind, rate in settings:
            rows.append(run(data, kind, rate, epochs, label))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(rows, costs, args, time.perf_counter() - start))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
