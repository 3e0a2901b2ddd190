"""What the monitor checks before any work: that it can read the batches and the model's
outputs (docs/monitor.md, "Failures"). No state; Lightning only through duck typing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sens.core.inputs import Inputs

__all__ = [
    "MonitorSetupError",
    "check_labels",
    "dataset_classes",
    "describe_inputs",
    "eval_mode",
    "shape_of",
    "source_loader",
]


class MonitorSetupError(TypeError):
    """The batches or the model's outputs cannot be read: raised even when ``strict=False``,
    since no later epoch would do better."""


def source_loader(loop: object) -> DataLoader | None:
    """The loader a fit loop will use, asked from its source before the loop sets it up (the
    Trainer's own ``train_dataloader``/``val_dataloader`` call, or the loader passed to fit)."""
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    found = source.dataloader()
    found = found[0] if isinstance(found, list | tuple) and found else found
    return found if isinstance(found, DataLoader) else None


def dataset_classes(loaders: dict[str, DataLoader]) -> tuple[str, ...] | None:
    """``dataset.classes`` (torchvision's convention) of the validation loader's dataset, else
    the training loader's, looking through Subset-like wrappers."""
    dataset = getattr(loaders.get("val") or loaders.get("train"), "dataset", None)
    for _ in range(4):
        names = getattr(dataset, "classes", None)
        if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
            return tuple(names)
        dataset = getattr(dataset, "dataset", None)
    return None


def describe_inputs(inputs: Inputs) -> str:
    if isinstance(inputs, Tensor):
        return f"inputs of shape {tuple(inputs.shape)}"
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, Tensor)}
    return f"inputs {shapes}"


def check_labels(split: str, labels: Tensor, logits: Tensor) -> None:
    classes = logits.shape[-1]
    if classes < 2:
        raise MonitorSetupError(
            f"The model returns {classes} logit per sample; SensitivityMonitor needs K >= 2 "
            "class logits (for a binary classifier, return two: torch.cat([-z, z], dim=-1) / 2)."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise MonitorSetupError(
            f"The {split} labels are {labels.dtype}; SensitivityMonitor needs class indices "
            "(an integer tensor). Pass batch_fn to convert them."
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise MonitorSetupError(
            f"The {split} labels range over [{low}, {high}], but the model returns {classes} "
            f"logits per sample (classes 0 to {classes - 1}): is this the data the model was "
            "built for?"
        )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics updated, no dropout), every submodule's mode restored."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def shape_of(value: object) -> object:
    """A tensor's shape, or the type name of anything else (for error messages)."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
