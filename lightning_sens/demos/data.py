"""The demo's data: real images available offline, their class names, corrupted labels.

Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package when it is installed,
scikit-learn's 1,797 handwritten 8 × 8 digits otherwise, or MNIST / CIFAR10 / Fashion-MNIST
through torchvision when named and downloadable; a share of the training labels moved to another
class (:func:`corrupt_labels`), so that the monitor's flags have something to find.
:class:`DemoData` is what ``lightning-sens demo`` trains on, and what the ``evaluate`` command it
prints reads again (by class path, in its LightningCLI config).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "CLASS_NAMES",
    "DemoData",
    "DigitsData",
    "NamedImages",
    "corrupt_labels",
    "load_images",
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
