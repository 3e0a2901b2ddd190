"""Input checks shared by the core: each error names the argument, what it got and what to do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "UnsupportedLayerError",
    "check_inputs",
    "check_logits",
    "check_target",
    "check_windows",
    "class_indices",
]


class UnsupportedLayerError(RuntimeError):
    """A layer (or model) whose FI cannot be computed; the message names it and what to do."""


def check_logits(logits: object, hint: str = "") -> None:
    """Raise unless ``logits`` is a finite floating ``(B, K)`` tensor with B ≥ 1 and K ≥ 2.

    One binary logit, ``(B,)`` or ``(B, 1)``, has been made ``(B, 2)`` by
    :func:`~lightning_sens.core.inputs.logits_of` before this check.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"The model returned {type(logits).__name__}, expected a (B, K) tensor of logits "
            f"(or (B,) / (B, 1), one binary logit).{hint}"
        )
    if logits.dim() != 2:
        raise ValueError(
            f"Expected logits of shape (B, K), or (B,) / (B, 1) for one binary logit, got shape "
            f"{tuple(logits.shape)}.{hint}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"Expected floating-point logits, got dtype {logits.dtype}.{hint}")
    if logits.shape[0] == 0:
        raise ValueError("The batch is empty (B = 0): pass at least one sample.")
    if logits.shape[1] < 2:
        raise ValueError(
            f"Expected logits for K >= 2 classes, got K = {logits.shape[1]}: FI is defined for "
            f"classifiers with at least two classes.{hint}"
        )
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = (~finite).any(dim=1).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"The logits contain NaN or Inf for samples {bad} (first 10 shown); FI needs "
            "finite logits. Check the inputs and the model's numerical stability."
        )


def check_target(target: Tensor, logits: Tensor) -> None:
    """Raise unless ``target`` holds one class index in [0, K) per sample."""
    B, K = logits.shape
    if target.shape != (B,):
        raise ValueError(
            f"target must have shape (B,) = ({B},) to match the logits, got {tuple(target.shape)}."
        )
    out_of_range = (target < 0) | (target >= K)
    if bool(out_of_range.any()):
        bad = target[out_of_range][:10].tolist()
        raise ValueError(
            f"target holds labels {bad} outside [0, {K}) for a model with K = {K} classes."
        )


def class_indices(labels: object, name: str = "target") -> Tensor:
    """One class index per sample, int64 ``(B,)``, from the labels classifiers are trained with.

    Integer labels are class indices already. Float and bool labels are the 0/1 targets of a
    binary classifier (``BCEWithLogitsLoss``): class 0 and class 1 of its two-class model
    ``(0, z)`` (docs/method.md, "Binary classifiers with one logit"). A ``(B, 1)`` column is
    read as ``(B,)``. Float labels other than 0 and 1, and ``(B, K)`` targets with K ≥ 2
    (multi-label, one-hot or soft), are refused with the fix; the range of the indices is
    checked against the logits by :func:`check_target`.

    Args:
        labels: the labels as given.
        name: the argument's name, for the error messages (``"target"``, ``"input_target"``).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a tensor of class indices (or 'pred'), got {type(labels).__name__}."
        )
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() == 2:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}: {labels.shape[1]} values per sample, as the "
            "targets of a multi-label model (one sigmoid per class) or one-hot or soft targets "
            "are. FI is defined for one class per sample (a softmax over K classes, or one "
            f"binary logit): pass one class index per sample, shape (B,) ({name}.argmax(-1) "
            "for one-hot targets)."
        )
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must hold one class index per sample, shape (B,) or (B, 1), got shape "
            f"{tuple(labels.shape)}."
        )
    if labels.is_complex():
        raise TypeError(f"{name} must hold class indices, got dtype {labels.dtype}.")
    if labels.is_floating_point():
        binary = (labels == 0) | (labels == 1)
        if not bool(binary.all()):
            found = labels[~binary].unique()
            bad = ", ".join(f"{v:.6g}" for v in found[:10].tolist())
            more = " (the first 10 shown)" if len(found) > 10 else ""
            raise ValueError(
                f"{name} holds the float values [{bad}]{more}. Float labels are read "
                "as the 0/1 targets of a binary classifier, so they must be 0 or 1. Pass class "
                f"indices as an integer tensor ({name}.long() where the floats are whole class "
                f"numbers), or hard 0/1 targets for soft ones (({name} > 0.5).long())."
            )
    return labels.long()


def check_inputs(inputs: object) -> None:
    """Raise unless ``inputs`` is a non-empty batch: a tensor, or a dict of tensors."""
    if isinstance(inputs, Mapping):
        tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not tensors:
            raise TypeError(
                f"inputs is a dict without a batched tensor (keys {sorted(inputs)}); pass a "
                "tensor or a dict such as {'input_ids': ..., 'attention_mask': ...}."
            )
        sizes = {v.shape[0] for v in tensors.values()}
        if 0 in sizes:
            raise ValueError("inputs is an empty batch (B = 0): pass at least one sample.")
        return
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}."
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must be a non-empty batch (B, ...), got shape {tuple(inputs.shape)}."
        )


def check_windows(
    windows: Sequence[int], height: int, width: int, what: str = "image of"
) -> tuple[int, ...]:
    """Window sizes must be odd positive integers no larger than the image (or sequence)."""
    sizes = tuple(windows)
    for w in sizes:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0:
            raise ValueError(
                f"windows must be odd positive integers (2s + 1, e.g. (1, 3, 5, 7)), got {w!r}."
            )
        if height == 1 and w > width:
            raise ValueError(
                f"Window size {w} is longer than the {what} {width} tokens; use windows of at "
                f"most {width} tokens."
            )
        if height > 1 and (w > height or w > width):
            raise ValueError(
                f"Window size {w} is larger than the {height}×{width} {what.split()[0]}; use "
                f"windows of at most {min(height, width)} pixels."
            )
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"windows must not repeat a size, got {sizes}.")
    return sizes
