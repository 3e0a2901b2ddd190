"""The model's inputs: one tensor or a dict of tensors, and which part of them is perturbed.

Hugging Face conventions work out of the box: a dict batch is passed as keyword arguments
(``model(**inputs)``), an output object with a ``logits`` attribute or key gives the logits, and
token ids are perturbed where they become continuous, at the output of the input embedding
(docs/method.md, "Families computed").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ForwardFn",
    "ForwardModule",
    "Inputs",
    "Perturbed",
    "batch_size",
    "batched_tensors",
    "default_forward",
    "found_logits",
    "get",
    "input_embedding_name",
    "logits_of",
    "one_logit",
    "perturbed_input",
    "repeat_first",
    "replace",
    "select",
    "to_device",
    "to_dtype",
    "two_class_logits",
    "usable_windows",
]

Inputs = Tensor | Mapping[str, Any]
ForwardFn = Callable[[nn.Module, Any], Any]

# Keys of continuous inputs in Hugging Face models, in order of preference.
_CONTINUOUS_KEYS = ("pixel_values", "input_values", "input_features", "inputs_embeds")
_TOKEN_KEYS = ("input_ids",)

FORWARD_HINT = (
    " If the model's forward does not return logits (or an object with a `logits` attribute), "
    "pass `forward_fn=lambda model, inputs: ...` that returns them."
)


def default_forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a dict of inputs, ``model(inputs)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def found_logits(output: Any) -> Any:
    """The tensor that holds the logits in a model's output, as the model returned it: the output
    itself, ``output.logits`` or ``output["logits"]``; anything else unchanged."""
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    return output


def one_logit(logits: Any) -> bool:
    """Whether ``logits`` is the output of a binary classifier with one logit: a floating
    ``(B,)`` or ``(B, 1)`` tensor."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        return False
    return logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)


def two_class_logits(z: Tensor) -> Tensor:
    """The two-class model ``(0, z)`` of one logit z per sample, ``(B, 2)``: softmax gives
    p_1 = sigmoid(z) and p_0 = 1 − sigmoid(z), the probabilities a binary classifier trained
    with ``BCEWithLogitsLoss`` predicts (docs/method.md, "Binary classifiers with one logit").

    Differentiable: the backward products through it are those of z.
    """
    column = z.reshape(z.shape[0], 1)
    return torch.cat([torch.zeros_like(column), column], dim=1)


def logits_of(output: Any) -> Any:
    """The logits in a model's output: the tensor itself, ``output.logits`` or
    ``output["logits"]``, ``(B, K)``.

    A binary classifier with one logit, a floating ``(B,)`` or ``(B, 1)`` output z, is read as
    the two-class model with logits ``(0, z)`` (p_1 = sigmoid(z); :func:`two_class_logits`),
    inside autograd. Anything else is returned unchanged, for the caller to reject with a clear
    message.
    """
    found = found_logits(output)
    return two_class_logits(found) if one_logit(found) else found


class ForwardModule(nn.Module):
    """``logits_of(forward_fn(model, inputs))`` as a module, so that
    ``torch.func.functional_call`` can substitute the model's parameters (as ``model.<name>``)."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, inputs: Inputs) -> Any:
        return logits_of(self.forward_fn(self.model, inputs))


def batch_size(inputs: Inputs) -> int:
    """B: the first dimension of the tensor, or of the dict's first tensor value."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(
        f"inputs is a dict without a batched tensor (keys {sorted(inputs)}); every sample's "
        "tensors must share the first dimension."
    )


def _batched(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def select(inputs: Inputs, rows: slice, batch: int) -> Inputs:
    """A copy of the rows ``rows`` of every batched tensor (dim 0 of size ``batch``); the rest
    unchanged. Copies are normal tensors even when ``inputs`` were made under inference mode."""
    if isinstance(inputs, Tensor):
        return inputs[rows].clone()
    return {k: v[rows].clone() if _batched(v, batch) else v for k, v in inputs.items()}


def repeat_first(inputs: Inputs, times: int, batch: int) -> Inputs:
    """The first sample repeated ``times`` times (probe passes that reveal the batch dims)."""

    def rep(v: Tensor) -> Tensor:
        return v[:1].repeat(times, *([1] * (v.dim() - 1)))

    if isinstance(inputs, Tensor):
        return rep(inputs)
    return {k: rep(v) if _batched(v, batch) else v for k, v in inputs.items()}


def batched_tensors(inputs: Inputs, batch: int) -> list[str]:
    """Keys of the batched tensors of a dict (``[""]`` for a single tensor)."""
    if isinstance(inputs, Tensor):
        return [""]
    return [k for k, v in inputs.items() if _batched(v, batch)]


def get(inputs: Inputs, key: str) -> Tensor:
    return inputs if isinstance(inputs, Tensor) else inputs[key]


def replace(inputs: Inputs, key: str, value: Tensor) -> Inputs:
    """``inputs`` with the tensor under ``key`` ("" for a single tensor) replaced."""
    if isinstance(inputs, Tensor):
        return value
    return {**inputs, key: value}


@dataclass(frozen=True)
class Perturbed:
    """What input FI perturbs.

    Attributes:
        kind: "direct" (a floating input tensor, additively), "tokens" (the output of the
            embedding that reads the token ids), or "none" (nothing continuous to perturb).
        key: the dict key of that tensor ("" for a single tensor input).
    """

    kind: Literal["direct", "tokens", "none"]
    key: str


def perturbed_input(inputs: Inputs, batch: int) -> Perturbed:
    """Choose the input that input FI perturbs (docs/method.md, "Families computed")."""
    if isinstance(inputs, Tensor):
        return Perturbed("direct" if inputs.is_floating_point() else "tokens", "")
    for key in _CONTINUOUS_KEYS:
        if _batched(inputs.get(key), batch) and inputs[key].is_floating_point():
            return Perturbed("direct", key)
    floating = [
        k
        for k, v in inputs.items()
        if _batched(v, batch) and v.is_floating_point() and "mask" not in k
    ]
    if len(floating) == 1:
        return Perturbed("direct", floating[0])
    for key in _TOKEN_KEYS:
        if _batched(inputs.get(key), batch):
            return Perturbed("tokens", key)
    integers = [
        k
        for k, v in inputs.items()
        if _batched(v, batch)
        and not v.is_floating_point()
        and not any(part in k for part in ("mask", "type", "position", "label"))
    ]
    if len(integers) == 1:
        return Perturbed("tokens", integers[0])
    return Perturbed("none", "")


def usable_windows(inputs: Inputs, windows: tuple[int, ...]) -> tuple[int, ...]:
    """The window sizes that fit the perturbed input: images (B, C, H, W) and token sequences
    (B, T) get those no larger than the image or the sequence; other inputs none."""
    perturbed = perturbed_input(inputs, batch_size(inputs))
    if perturbed.kind == "none":
        return ()
    shape = get(inputs, perturbed.key).shape
    if perturbed.kind == "direct" and len(shape) == 4:
        return tuple(w for w in windows if w <= min(shape[2], shape[3]))
    if perturbed.kind == "tokens" and len(shape) == 2:
        return tuple(w for w in windows if w <= shape[1])
    return ()


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Every tensor of ``inputs`` moved to ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def input_embedding_name(model: nn.Module) -> str | None:
    """The module a Hugging Face model reports as its input embedding, by name (or None)."""
    for name, module in model.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(found, nn.Module):
                for inner, candidate in module.named_modules():
                    if candidate is found:
                        return f"{name}.{inner}" if name else inner
    return None


def to_dtype(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating tensors of lower precision than ``dtype`` cast up to it."""

    def cast(v: Any) -> Any:
        low = isinstance(v, Tensor) and v.is_floating_point()
        if low and torch.finfo(v.dtype).bits < torch.finfo(dtype).bits:
            return v.to(dtype)
        return v

    if isinstance(inputs, Tensor):
        return cast(inputs)
    return {k: cast(v) for k, v in inputs.items()}
