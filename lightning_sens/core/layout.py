"""How a model's logits meet its labels, read from one batch (docs/tasks.md, "How the monitor
reads a task"): one class per sample, a class per token or pixel (the class axis where PyTorch or
Hugging Face put it, or the positions folded into the batch), one sigmoid per output, and the
labels of a causal language model, which are its inputs shifted by one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "OutputLayout",
    "Task",
    "TaskOption",
    "canonical_logits",
    "kept_positions",
    "read_layout",
]

Task = Literal["binary", "multiclass", "multilabel"]
TaskOption = Literal["auto", "binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = get_args(TaskOption)
"""The values of the ``task`` option (torchmetrics' names): "auto" reads it from one batch."""

IGNORE_INDEX = -100
"""The label of a position to skip in PyTorch's and Hugging Face's losses; segmentation data
sets also use 255, which :func:`read_layout` skips where the model has at most 255 classes."""

_SEGMENTATION_IGNORE = 255


@dataclass(frozen=True)
class OutputLayout:
    """How a model's logits meet its labels (:func:`read_layout`).

    Attributes:
        task: "multiclass": a softmax over a class axis, one class index per position;
            "binary": one logit per position, whose sigmoid is the probability of class 1;
            "multilabel": one sigmoid per output entry, targets of the logits' shape.
        class_dim: the class axis of the logits as the model returns them ("multiclass"; 1
            for ``(B, K, H, W)``, −1 for ``(B, T, V)``), else None.
        positions: the shape of one sample's positions: ``()`` for one label per sample,
            ``(T,)`` for text, ``(H, W)`` for an image's pixels, ``(K,)`` for multi-label.
        flattened: the logits come as ``(B · T, V)``, the positions folded into the batch (as
            Lightning's demo language models return them).
        shift: the logits at position t score the label at t + 1 (a causal language model
            whose labels are its input ids, the Hugging Face convention).
        ignore_index: the label values of positions to skip.
    """

    task: Task
    class_dim: int | None
    positions: tuple[int, ...]
    flattened: bool = False
    shift: bool = False
    ignore_index: tuple[int, ...] = (IGNORE_INDEX,)

    @property
    def dense(self) -> bool:
        """Whether a sample has more than one scored position (text, pixels, multi-label)."""
        return self.positions != ()

    def describe(self) -> str:
        """One line for messages and logs: ``"multiclass, positions (32,), shifted"``."""
        parts: list[str] = [self.task]
        if self.dense:
            parts.append(f"positions {self.positions}")
        if self.flattened:
            parts.append("flattened (B·T, V)")
        if self.shift:
            parts.append("labels shifted by one (causal language model)")
        return ", ".join(parts)


def read_layout(
    logits: Tensor,
    labels: Tensor,
    inputs: Any = None,
    task: str = "auto",
    ignore_index: int | None = None,
) -> OutputLayout:
    """How ``logits`` meet ``labels``, decided from one batch.

    - labels ``(B,)`` or ``(B, 1)``: one class per sample (``(B, K)`` logits, or one binary
      logit);
    - labels of the logits' shape without one axis: that axis holds the classes (axis 1 for
      PyTorch's ``(B, K, d1, ...)`` convention, the last for ``(B, T, V)``; where both fit,
      the last for sequences and axis 1 for images); an axis of size 1 is one binary logit;
    - labels ``(B, T)`` and logits ``(B · T, V)``: positions folded into the batch;
    - float (or 0/1) targets of the logits' shape: one sigmoid per entry (multi-label). Rows of
      ``(B, K)`` targets that all sum to one are one-hot or soft targets of a softmax as much
      as multi-label ones: ``task`` must say which.

    A causal language model whose labels are its input ids (``inputs`` a tensor or a dict with
    ``input_ids`` equal to the labels wherever they are not ignored) scores the label at t + 1
    with the logits at t, as its own loss does.

    Args:
        logits: the model's output for the batch.
        labels: the batch's labels.
        inputs: the batch's inputs (to recognise labels that are the input ids), or None.
        task: "auto", or torchmetrics' "binary", "multiclass", "multilabel".
        ignore_index: the label of positions to skip; None: −100, and also 255 where the model
            has at most 255 classes and several positions (segmentation masks).

    Raises:
        ValueError: a layout that is none of these, naming the shapes and the fix.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}.")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"Expected floating-point logits, got {_shape(logits)}"
            + (f" of dtype {logits.dtype}" if isinstance(logits, Tensor) else "")
            + "."
        )
    if not isinstance(labels, Tensor) or labels.dim() == 0:
        raise TypeError(f"Expected labels with a batch axis, got {_shape(labels)}.")
    z, y = tuple(logits.shape), tuple(labels.shape)
    same = z == y and len(z) >= 2
    if same and (len(z) > 2 or z[1] > 1) and task in ("auto", "multilabel", "binary"):
        if task == "auto" and len(z) == 2 and _distributions(labels):
            raise ValueError(
                f"The labels {y} have the logits' shape and every row sums to one: one-hot or "
                "soft targets of a softmax, or multi-label targets with one class per sample. "
                "Pass task='multilabel' for one sigmoid per class (BCEWithLogitsLoss), or class "
                "indices (labels.argmax(-1)) for a softmax."
            )
        if labels.is_floating_point() or bool(((labels == 0) | (labels == 1)).all()):
            kind: Task = "binary" if z[1] == 1 and len(z) > 2 else "multilabel"
            return OutputLayout(kind, None, z[1:], ignore_index=_ignored(ignore_index, 2, True))
    if len(y) == 1 or (len(y) == 2 and y[1] == 1 and len(z) <= 2):
        if task == "multilabel":
            raise ValueError(_mismatch(z, y, "multilabel targets of the logits' shape"))
        kind = "binary" if len(z) == 1 or z[1] == 1 else "multiclass"
        return OutputLayout(kind, -1, ())
    if task == "multilabel":
        raise ValueError(_mismatch(z, y, "multilabel targets of the logits' shape"))
    if len(z) == 2 and len(y) == 2 and z[0] == labels.numel() and z[0] != y[0]:
        classes, positions = z[1], y[1:]
        kind = "binary" if classes == 1 else "multiclass"
        shift = _shifted(labels, inputs, _ignored(ignore_index, classes, True))
        ignored = _ignored(ignore_index, classes, True)
        return OutputLayout(kind, -1, positions, True, shift, ignored)
    if len(z) == len(y) + 1 and z[0] == y[0]:
        fits = [d for d in (1, len(z) - 1) if z[:d] + z[d + 1 :] == y]
        if fits:
            d = fits[-1] if len(fits) == 1 or len(z) == 3 else fits[0]
            classes = z[d]
            ignored = _ignored(ignore_index, classes, True)
            kind = "binary" if classes == 1 else "multiclass"
            shift = len(y) == 2 and _shifted(labels, inputs, ignored)
            return OutputLayout(kind, d if d == 1 else -1, y[1:], False, shift, ignored)
    raise ValueError(
        _mismatch(
            z,
            y,
            "labels (B,) with logits (B, K); labels (B, T) with logits (B, T, V) or (B·T, V); "
            "labels (B, H, W) with logits (B, K, H, W); or targets of the logits' shape "
            "(multi-label)",
        )
    )


def _shape(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _mismatch(z: tuple[int, ...], y: tuple[int, ...], expected: str) -> str:
    return (
        f"Cannot read logits of shape {z} against labels of shape {y}; expected {expected}. "
        "Pass forward_fn (what returns the logits) or batch_fn (what returns the labels) so "
        "that they meet in one of these layouts."
    )


def _distributions(labels: Tensor) -> bool:
    """Whether every row of ``(B, K)`` targets is a probability vector."""
    t = labels.double()
    return bool(
        ((t >= 0).all() & torch.isclose(t.sum(-1), torch.ones((), dtype=t.dtype)).all()).item()
    )


def _ignored(ignore_index: int | None, classes: int, dense: bool) -> tuple[int, ...]:
    if ignore_index is not None:
        return (ignore_index,)
    if dense and classes <= _SEGMENTATION_IGNORE:
        return (IGNORE_INDEX, _SEGMENTATION_IGNORE)
    return (IGNORE_INDEX,)


def _shifted(labels: Tensor, inputs: Any, ignored: tuple[int, ...]) -> bool:
    """Whether ``labels`` are the input ids themselves (a causal language model's labels)."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if not isinstance(ids, Tensor) or ids.shape != labels.shape or ids.is_floating_point():
        return False
    kept = ~torch.isin(labels, torch.tensor(ignored, device=labels.device))
    return bool(kept.any()) and torch.equal(labels[kept], ids.to(labels.device)[kept])


def canonical_logits(logits: Tensor, layout: OutputLayout | None) -> Tensor:
    """The logits with one row per position: ``(B, P, K)`` for a softmax (one class per
    sample: P = 1), ``(B, P)`` for one sigmoid per entry; the shift of a causal language model
    is not applied (:func:`kept_positions` leaves out its last position)."""
    if layout is None:
        return logits.reshape(logits.shape[0], 1, -1)
    if layout.task != "multiclass":
        B = logits.shape[0] // math.prod(layout.positions) if layout.flattened else logits.shape[0]
        return logits.reshape(B, -1)
    K = logits.shape[-1] if layout.flattened or layout.class_dim != 1 else logits.shape[1]
    if layout.flattened:
        return logits.reshape(-1, math.prod(layout.positions), K)
    if layout.dense and layout.class_dim == 1:
        logits = logits.movedim(1, -1)
    return logits.reshape(logits.shape[0], -1, K)


def kept_positions(
    shape: tuple[int, int], layout: OutputLayout | None, mask: Tensor | None, device: torch.device
) -> Tensor:
    """``(B, P)`` bool: the positions that count, by ``mask`` (nonzero where a position counts)
    and, for a causal language model, all but the last (whose prediction has no label)."""
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    if mask is not None:
        keep &= mask.to(device).reshape(shape).bool()
    if layout is not None and layout.shift:
        keep[:, -1] = False
    return keep
