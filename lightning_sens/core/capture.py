"""One forward pass with the layers' inputs and outputs kept, then the K − 1 backward products.

The model is treated as a function: modes are restored per module, hooks are removed, no
parameter, buffer or ``.grad`` is touched, and parameters need not require grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["Backward", "Captured", "backprops", "eval_mode", "forward_capture"]

Backward = Literal["auto", "batched", "loop"]
ForwardFn = Callable[[nn.Module, Tensor], Any]


@dataclass
class Captured:
    """What the forward pass recorded for one monitored layer."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Tensor | None = None
    calls: int = 0
    versions: tuple[int, ...] = ()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def _versions(tensors: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors if isinstance(t, Tensor))


@contextlib.contextmanager
def forward_capture(layers: dict[str, nn.Module]) -> Iterator[dict[str, Captured]]:
    """Record each layer's inputs and output while the context is open.

    The hook hands the rest of the network a clone of the layer's output, so that an in-place
    operation downstream (``ReLU(inplace=True)``, ``out += identity``) cannot change the tensor
    we differentiate against. Where nothing upstream requires grad, the output becomes a leaf
    that does, so parameters never need ``requires_grad``.
    """
    records = {name: Captured() for name in layers}
    handles = []

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Tensor:
            record = records[name]
            record.calls += 1
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Layer {name!r} ({type(module).__name__}) returned {type(output).__name__}; "
                    "per-layer FI needs layers that return one tensor. Leave it out with `layers=`."
                )
            held = output if output.requires_grad else output.detach().requires_grad_(True)
            record.args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            record.kwargs = dict(kwargs)
            record.output = held
            record.versions = _versions(record.args)
            return held.clone()

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def check_captured(records: dict[str, Captured]) -> None:
    """Fail clearly on layers that ran more than once or whose inputs were modified in place."""
    for name, record in records.items():
        if record.calls > 1:
            raise ValueError(
                f"Layer {name!r} ran {record.calls} times in one forward pass (shared weights); "
                "its Gram needs every call's cross terms. Leave it out with `layers=`."
            )
        if _versions(record.args) != record.versions:
            raise ValueError(
                f"The input of layer {name!r} was modified in place after the layer ran, so it "
                "can no longer be used. Make the in-place operation out of place."
            )


def backprops(
    logits: Tensor,
    targets: list[Tensor],
    cotangents: Tensor,
    consume: Callable[[list[Tensor]], None],
    method: Backward = "auto",
) -> None:
    """Backpropagate each cotangent row of ``cotangents`` (K', K) to every tensor in ``targets``.

    ``consume`` receives, for one cotangent after the other, the list of backprops (one per
    target, shaped like it; zeros where a target does not reach the logits), so that callers can
    reduce them at once instead of holding all K' of them. "loop" runs K' backward passes over a
    retained graph; "batched" runs one vectorised backward (``is_grads_batched``) and then hands
    out its slices; "auto" picks "batched" on CUDA and "loop" on CPU, where the loop measured
    faster (docs/performance.md).
    """
    K1, B = cotangents.shape[0], logits.shape[0]
    grad_outputs = cotangents.to(logits.dtype).unsqueeze(1).expand(K1, B, -1)
    if method == "auto":
        method = "batched" if logits.is_cuda else "loop"

    def filled(found: tuple[Tensor | None, ...], k: int | None) -> list[Tensor]:
        return [
            (g if k is None else g[k]) if g is not None else torch.zeros_like(t)
            for g, t in zip(found, targets, strict=True)
        ]

    if method == "batched":
        found = torch.autograd.grad(
            logits, targets, grad_outputs, is_grads_batched=True, allow_unused=True
        )
        for k in range(K1):
            consume(filled(found, k))
        return
    for k in range(K1):
        found = torch.autograd.grad(
            logits, targets, grad_outputs[k], retain_graph=k < K1 - 1, allow_unused=True
        )
        consume(filled(found, None))
