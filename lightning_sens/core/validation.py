"""Input checks shared by the core: each error names the argument, what it got and what to do."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_inputs", "check_logits", "check_target", "check_windows"]


def check_logits(logits: object, hint: str = "") -> None:
    """Raise unless ``logits`` is a finite floating ``(B, K)`` tensor with B ≥ 1 and K ≥ 2."""
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"The model returned {type(logits).__name__}, expected a (B, K) tensor of logits.{hint}"
        )
    if logits.dim() != 2:
        raise ValueError(f"Expected logits of shape (B, K), got shape {tuple(logits.shape)}.{hint}")
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


def check_inputs(inputs: object) -> Tensor:
    """Raise unless ``inputs`` is a non-empty tensor with a batch dimension."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}.")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must be a non-empty batch (B, ...), got shape {tuple(inputs.shape)}."
        )
    return inputs


def check_windows(windows: Sequence[int], height: int, width: int) -> tuple[int, ...]:
    """Window sizes must be odd positive integers no larger than the image."""
    sizes = tuple(windows)
    for w in sizes:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0:
            raise ValueError(
                f"windows must be odd positive integers (2s + 1, e.g. (1, 3, 5, 7)), got {w!r}."
            )
        if w > height or w > width:
            raise ValueError(
                f"Window size {w} is larger than the {height}×{width} image; use windows of at "
                f"most {min(height, width)} pixels."
            )
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"windows must not repeat a size, got {sizes}.")
    return sizes
