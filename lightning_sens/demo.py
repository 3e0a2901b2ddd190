"""``lightning-sens demo``: a short real training run with SensitivityMonitor watching.

A small CNN is trained on real images (Fashion-MNIST from Debian's ``dataset-fashion-mnist``
package when it is installed, scikit-learn's 1,797 handwritten 8 × 8 digits otherwise, or MNIST /
CIFAR10 / Fashion-MNIST through torchvision when named and downloadable). A few percent of the
training labels are deliberately corrupted; the monitor scores every training sample from the
logits of its training step (no extra pass), estimates how many labels of each class are wrong,
and flags that many. At the end, the demo reports the precision and recall of the flags against
the labels it corrupted.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens.callbacks import SensitivityMonitor
from lightning_sens.config import MonitorConfig
from lightning_sens.reporting import paths
from lightning_sens.reporting.html import write_report
from lightning_sens.reporting.tables import write_table

__all__ = [
    "CLASS_NAMES",
    "DemoData",
    "DigitsData",
    "SmallCNN",
    "flagged_per_epoch",
    "load_images",
    "run_demo",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_SUBSET = (12_000, 2_000)  # training and validation samples of the 28 × 28 and 32 × 32 sets
# The class names of the sets the demo reads (torchvision's ``classes``); digits: the numbers.
CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
}  # fmt: skip


class NamedImages(TensorDataset):
    """Images and labels with the class names as ``classes`` (torchvision's attribute, which
    the monitor reads for its figures)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: tuple[str, ...] | None) -> None:
        super().__init__(images, labels)
        if classes is not None:
            self.classes = list(classes)


def _read_idx(path: Path) -> Tensor:
    """An IDX file (the MNIST format): big-endian dims after a 4-byte magic number."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - the examples extra installs it
        raise ImportError(
            "The digits demo needs scikit-learn: pip install 'lightning-sens[examples]'."
        ) from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1297], y[:1297], x[1297:], y[1297:]


def _torchvision(name: str, root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}.get(
        name, torchvision.datasets.FashionMNIST
    )
    parts = [cls(root, train=train, download=True) for train in (True, False)]
    tensors = []
    for part in parts:
        data = torch.as_tensor(part.data)
        images = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)
        tensors += [images.float() / 255.0, torch.as_tensor(part.targets).long()]
    return tensors[0], tensors[1], tensors[2], tensors[3]


def load_images(
    dataset: str, root: Path, subset: tuple[int, int] | None = _SUBSET
) -> tuple[str, Tensor, Tensor, Tensor, Tensor]:
    """(name, train images, train labels, test images, test labels); pixels in [0, 1].

    ``subset`` keeps the first (train, test) samples of the 28 × 28 and 32 × 32 sets; the
    demo's default keeps it to a few minutes on 2 CPU cores. The digits are never cut.
    """
    if dataset == "auto":
        dataset = "fashion-mnist-debian" if DEBIAN_FASHION_MNIST.is_dir() else "digits"
    if dataset == "digits":
        return ("digits", *_digits())
    if dataset == "fashion-mnist-debian" or (
        dataset == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir()
    ):
        files = {
            f.name.split("-")[0] + f.name.split("-")[1]: f
            for f in DEBIAN_FASHION_MNIST.glob("*-ubyte*")
        }
        x_train = _read_idx(files["trainimages"]).unsqueeze(1).float() / 255.0
        x_val = _read_idx(files["t10kimages"]).unsqueeze(1).float() / 255.0
        y_train, y_val = (
            _read_idx(files["trainlabels"]).long(),
            _read_idx(files["t10klabels"]).long(),
        )
        loaded = ("fashion-mnist", x_train, y_train, x_val, y_val)
    else:
        loaded = (dataset, *_torchvision(dataset, root))
    name, x_train, y_train, x_val, y_val = loaded
    if subset is None:
        return loaded
    n_train, n_val = subset  # the demo: a few minutes on 2 CPU cores
    return name, x_train[:n_train], y_train[:n_train], x_val[:n_val], y_val[:n_val]


def corrupt_labels(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Labels with ``fraction`` of them moved to another class, and the indices moved."""
    generator = torch.Generator().manual_seed(seed)
    count = int(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, 10, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (noisy[chosen] + shift) % 10
    return noisy, chosen


class SmallCNN(pl.LightningModule):
    """Two conv blocks with BatchNorm and a linear head, for 1- or 3-channel images."""

    def __init__(self, channels: int = 1, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
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
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsData(pl.LightningDataModule):
    """scikit-learn's real 8 × 8 digits as a DataModule (1,297 training, 500 validation samples),
    with ``corrupt`` of the training labels moved to another class."""

    def __init__(self, corrupt: float = 0.0, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        _, x_train, y_train, self.x_val, self.y_val = load_images("digits", Path("."))
        self.x_train = x_train
        self.y_train, self.corrupted = corrupt_labels(y_train, corrupt, seed + 1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.x_train, self.y_train)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=250)


class DemoData(pl.LightningDataModule):
    """The demo's data as a DataModule, so that ``lightning-sens evaluate --config`` reads what
    the demo trained on: the same images, the same corrupted labels, the same loaders.

    Args:
        dataset: "auto", "digits", "fashion-mnist", "mnist" or "cifar10" (see :func:`load_images`).
        corrupt: share of the training labels moved to another class.
        seed: the demo's seed (labels are corrupted with ``seed + 1``).
        root: where torchvision downloads MNIST / CIFAR10.
    """

    def __init__(
        self, dataset: str = "auto", corrupt: float = 0.03, seed: int = 0, root: str = "data"
    ) -> None:
        super().__init__()
        self.dataset, self.corrupt, self.seed, self.root = dataset, corrupt, seed, root
        self.dataset_name = ""
        self.corrupted = torch.empty(0, dtype=torch.long)
        self.true_labels = torch.empty(0, dtype=torch.long)
        self.train_set: NamedImages | None = None
        self.val_set: NamedImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.dataset_name, x_train, y_train, x_val, y_val = load_images(
            self.dataset, Path(self.root)
        )
        y_noisy, self.corrupted = corrupt_labels(y_train, self.corrupt, self.seed + 1)
        self.true_labels = y_train
        classes = CLASS_NAMES.get(self.dataset_name)
        self.train_set = NamedImages(x_train, y_noisy, classes)
        self.val_set = NamedImages(x_val, y_val, classes)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=250)


def flagged_per_epoch(log_dir: Path, corrupted: Tensor) -> list[tuple[int, int, int]]:
    """(epoch, training samples flagged, how many of them have a corrupted label) per epoch of
    the run logged under ``log_dir``."""
    bad = set(corrupted.tolist())
    out = []
    for table in paths.flag_tables(log_dir):
        with table.open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
        flagged = {int(r["sample"]) for r in rows if r["flagged"] == "True"}
        out.append((int(rows[0]["epoch"]), len(flagged), len(flagged & bad)))
    return out


# The demo's monitor; the evaluate command it prints passes the same sizes.
_MONITOR: dict[str, Any] = {"train_probe_size": 256, "exact_probe_size": 16}


def _config(path: Path, model: dict[str, object], data: dict[str, object]) -> None:
    """A LightningCLI config naming the demo's model and data (``--config`` of evaluate)."""
    import yaml

    module = __name__
    config = {
        "model": {"class_path": f"{module}.SmallCNN", "init_args": model},
        "data": {"class_path": f"{module}.DemoData", "init_args": data},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _write_corrupted(path: Path, corrupted: Tensor, true: Tensor, given: Tensor) -> None:
    """The corrupted labels (sample, true label, given label): the demo's precision and recall
    can be checked against the flag tables."""
    rows = [
        {"sample": i, "true_label": int(true[i]), "given_label": int(given[i])}
        for i in sorted(corrupted.tolist())
    ]
    write_table(rows, path, ("sample", "true_label", "given_label"))


def evaluate_command(out: Path) -> list[str]:
    """The ``lightning-sens evaluate`` command that measures the demo's checkpoints again."""
    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in _MONITOR.items()]
    return [
        "lightning-sens",
        "evaluate",
        str(out / "checkpoints"),
        "--output",
        str(out / "evaluate"),
        *sizes,
        "--",
        "--config",
        str(out / "config.yaml"),
    ]


def run_demo(out: Path, max_epochs: int | None, dataset: str, corrupt: float, seed: int) -> int:
    """Train, monitor, and print where the logs are, what the flags found, and how to evaluate
    the saved checkpoints again."""
    import shlex

    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(seed, verbose=False)
    data = DemoData(dataset, corrupt, seed, str(out / "data"))
    data.setup("fit")
    assert data.train_set is not None
    assert data.val_set is not None
    train_set, val_set = data.train_set, data.val_set
    x_train, y_train = train_set.tensors
    corrupted = data.corrupted
    epochs = max_epochs or (8 if data.dataset_name == "digits" else 3)
    print(
        f"Demo: {data.dataset_name}, {len(y_train)} training samples ({len(corrupted)} labels "
        f"corrupted), {len(data.val_set)} validation samples, {epochs} epochs."
    )
    logger = TensorBoardLogger(out, name="training", version="", default_hp_metric=False)
    # A showcase: every part every epoch (budget=None), so that three short epochs show every
    # figure. In a real run the default budget keeps the monitor within 5 % of training time.
    config = MonitorConfig(**_MONITOR, save_figures=True, budget=None)
    monitor = SensitivityMonitor(config)
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        save_top_k=-1,
        every_n_epochs=1,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor, checkpoints],
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=10,
    )
    model = SmallCNN(channels=x_train.shape[1])
    trainer.fit(model, datamodule=data)
    _config(
        out / "config.yaml",
        {"channels": int(x_train.shape[1]), "lr": model.lr},
        {
            "dataset": data.dataset_name,
            "corrupt": corrupt,
            "seed": seed,
            "root": str((out / "data").resolve()),  # the same downloads from any folder
        },
    )

    _write_corrupted(out / "corrupted.csv", corrupted, data.true_labels, y_train)
    print(f"Flagged training labels ({len(corrupted)} of {len(y_train)} were corrupted):")
    folder = Path(logger.log_dir)
    per_epoch = flagged_per_epoch(folder, corrupted)
    for epoch, flagged, hits in per_epoch:
        print(f"  epoch {epoch:2d}: {flagged:4d} flagged, {hits:4d} of them corrupted")
    if per_epoch:
        _, flagged, hits = per_epoch[-1]
        precision = hits / flagged if flagged else float("nan")
        recall = hits / len(corrupted) if len(corrupted) else float("nan")
        print(
            f"Last epoch: precision {precision:.2f} ({hits} of {flagged} flags are corrupted "
            f"labels), recall {recall:.2f} ({hits} of {len(corrupted)} corrupted labels found)."
        )
    last = trainer.current_epoch - 1
    figures = paths.figures(folder, last)
    rows = [(f"epoch {int(h['epoch'])}", int(h["epoch"]), int(h["step"])) for h in monitor.history]
    report = out / "report.html"
    table = paths.flag_table(folder, last)
    write_report(
        report,
        f"lightning-sens demo: {data.dataset_name}",
        rows,
        monitor.history,
        figures,
        table,
        monitor.config.to_dict(),
        thumbnails=lambda split, i: (val_set if split == "val" else train_set)[i][0],
        class_names=CLASS_NAMES.get(data.dataset_name),
    )
    print(
        f"Monitoring took {100 * monitor.budget.cost_share:.0f} % of the training time "
        "(budget=None for this demo: every part every epoch; the default budget=0.05 keeps it "
        "within 5 %)."
    )
    print(f"Report: {report}")
    print(f"Flag tables and figures: {folder / 'sensitivity'}")
    print(f"Checkpoints, one per epoch: {out / 'checkpoints'}")
    print(f"The corrupted labels (to check the flags against): {out / 'corrupted.csv'}")
    print(f"View the curves: tensorboard --logdir {out}")
    print("Measure the checkpoints again (the validation curves come out the same):")
    print(f"  {shlex.join(evaluate_command(out))}")
    return 0
