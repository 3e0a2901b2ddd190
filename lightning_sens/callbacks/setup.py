"""What the monitor checks before any work: that it can read the batches and the model's
outputs (docs/monitor.md, "Failures"). No state; Lightning only through duck typing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sens.core.inputs import Inputs
from lightning_sens.core.validation import class_indices

__all__ = [
    "MonitorSetupError",
    "check_labels",
    "class_labels",
    "dataset_classes",
    "describe_inputs",
    "eval_mode",
    "shape_of",
]


class MonitorSetupError(TypeError):
    """The batches or the model's outputs cannot be read: raised even when ``strict=False``,
    since no later epoch would do better."""


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


def class_labels(labels: object, where: str = "a batch") -> Tensor:
    """One class index per sample, int64 ``(B,)``, from the labels a batch carries: integer
    class indices as they are, the 0/1 labels of a binary classifier (float or bool) as class 0
    and 1 of its two-class model (docs/monitor.md, "Supported models"), a ``(B, 1)`` column as
    ``(B,)``. Anything else raises :class:`MonitorSetupError` with the fix; ``where`` says
    where the labels come from (``"a val batch"``)."""
    fix = "Pass batch_fn=lambda batch: (inputs, labels, ids_or_None) that returns them."
    if not isinstance(labels, Tensor) or labels.dim() not in (1, 2):
        raise MonitorSetupError(
            f"SensitivityMonitor read labels of {_described(labels)} from {where}; it needs one "
            f"class index per sample, (B,) or (B, 1). {fix}"
        )
    if labels.dim() == 2 and labels.shape[1] > 1:
        kind = "float targets" if labels.is_floating_point() else f"{labels.dtype} labels"
        raise MonitorSetupError(
            f"SensitivityMonitor read {kind} of shape (B, K) = {tuple(labels.shape)} from "
            f"{where}, K values per sample: the targets of a multi-label model (one sigmoid per "
            "class, trained with BCEWithLogitsLoss), or one-hot or soft targets. "
            "Pass SensitivityMonitor(task='multilabel') for one sigmoid per class; for one-hot or "
            "soft targets of a softmax model, pass batch_fn=lambda batch: (inputs, "
            "targets.argmax(-1), ids_or_None)."
        )
    try:
        return class_indices(labels, "labels")
    except (TypeError, ValueError) as error:
        raise MonitorSetupError(
            f"SensitivityMonitor cannot use the labels of {where}: {error} {fix}"
        ) from error


def check_labels(split: str, labels: Tensor, logits: Tensor) -> None:
    """Raise :class:`MonitorSetupError` unless ``labels`` (read by :func:`class_labels`) are
    class indices of the model's ``(B, K)`` logits (a binary classifier's one logit is read as
    two, ``(0, z)``)."""
    labels = class_labels(labels, f"a {split} batch")
    classes = logits.shape[-1]
    if classes < 2:
        raise MonitorSetupError(
            f"The model returns {classes} logits per sample; SensitivityMonitor needs K >= 2 "
            "class logits, or one binary logit ((B,) or (B, 1))."
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


def _described(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return f"type {type(value).__name__}"


def shape_of(value: object) -> object:
    """A tensor's shape, or the type name of anything else (for error messages)."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
