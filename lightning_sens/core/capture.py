"""The engine's forward passes and backward products, and the context that makes them exact.

The model is treated as a function: modes are restored per module, hooks are removed, no
parameter, buffer or ``.grad`` is touched, and parameters need not require grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "Backward",
    "CallShape",
    "Captured",
    "backprops",
    "capture_calls",
    "eval_mode",
    "exact_context",
    "record_shapes",
    "unwrap_compiled",
]

Backward = Literal["auto", "batched", "loop"]
Unroll = Callable[[nn.Module, tuple[Any, ...], dict[str, Tensor]], Any]

# How far a recomputed layer output may be from the layer's own (relative to its size).
_RECOMPUTE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


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


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (hooks do not fire inside compiled code)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def _has_compiled_parts(model: nn.Module) -> bool:
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


@contextlib.contextmanager
def exact_context(model: nn.Module) -> Iterator[None]:
    """Eval mode with autograd on, and nothing that trades exactness for speed.

    Inside: ``inference_mode(False)`` and ``enable_grad`` (Lightning validates under inference
    mode); autocast off; TF32 off; the fused fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` off (it is not differentiable); compiled submodules run
    eagerly, so that forward hooks fire (``torch.compiler.set_stance``).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(eval_mode(model))
        for device in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device, enabled=False))
        stack.enter_context(torch.backends.cudnn.flags(allow_tf32=False))
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", matmul_tf32)
        if hasattr(torch.backends, "mha"):
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        if _has_compiled_parts(model):
            if not hasattr(torch.compiler, "set_stance"):
                raise RuntimeError(
                    "The model contains torch.compile'd submodules, whose forward hooks do not "
                    f"fire; this needs torch >= 2.6 (found {torch.__version__}). Pass the "
                    "uncompiled module instead."
                )
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield


@dataclass
class CallShape:
    """The structure of one module call in a probe forward pass (shapes only, no data)."""

    in_spec: Any
    in_shapes: list[tuple[int, ...] | None]
    out_spec: Any
    out_shapes: list[tuple[int, ...] | None]
    out_floating: list[bool]
    first_arg: int | None  # data pointer of the first positional argument
    versions: list[int | None] = field(default_factory=list)
    modified: bool = False


def _shape(leaf: Any) -> tuple[int, ...] | None:
    return tuple(leaf.shape) if isinstance(leaf, Tensor) else None


@contextlib.contextmanager
def record_shapes(model: nn.Module) -> Iterator[dict[str, list[CallShape]]]:
    """Record every module call's input and output structure while the context is open.

    On exit, ``modified`` says whether a call's input tensors were changed in place afterwards
    (their values at call time must then be copied when captured).
    """
    records: dict[str, list[CallShape]] = {}
    inputs: list[tuple[CallShape, list[Any]]] = []
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            in_leaves, in_spec = pytree.tree_flatten((args, kwargs))
            out_leaves, out_spec = pytree.tree_flatten(output)
            first = args[0] if args else None
            shape = CallShape(
                in_spec=in_spec,
                in_shapes=[_shape(x) for x in in_leaves],
                out_spec=out_spec,
                out_shapes=[_shape(x) for x in out_leaves],
                out_floating=[isinstance(x, Tensor) and x.is_floating_point() for x in out_leaves],
                first_arg=first.data_ptr() if isinstance(first, Tensor) else None,
                versions=[x._version if isinstance(x, Tensor) else None for x in in_leaves],
            )
            records.setdefault(name, []).append(shape)
            inputs.append((shape, in_leaves))

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for shape, leaves in inputs:
            now = [x._version if isinstance(x, Tensor) else None for x in leaves]
            shape.modified = now != shape.versions


@dataclass
class Captured:
    """One call of a hooked module in the engine's forward pass.

    Attributes:
        args, kwargs: what the module was called with (detached; copied if modified later).
        tensors: the module's weight, bias and running statistics as the call saw them.
        out_spec: the structure of the output; ``held`` maps output leaf positions to the
            tensors the backward products differentiate against.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensors: dict[str, Tensor]
    out_spec: Any
    held: dict[int, Tensor]
    first_arg: int | None = None  # data pointer of the first positional argument
    extra: Any = None  # a route's record of the call (see ``unroll``)
    mismatch: bool = False  # the recomputed output was not the layer's own


def _detach(x: Any, copy: bool) -> Any:
    if not isinstance(x, Tensor):
        return x
    x = x.detach()
    return x.clone() if copy else x


def _same(recomputed: Any, output: Any) -> bool:
    """The recomputed output equals the layer's own, to the rounding of its dtype."""
    mine, theirs = pytree.tree_leaves(recomputed), pytree.tree_leaves(output)
    if len(mine) != len(theirs):
        return False
    for a, b in zip(mine, theirs, strict=True):
        if not isinstance(b, Tensor) or a.shape != b.shape:
            return False
        scale = float(b.detach().abs().max()) if b.numel() else 0.0
        tol = _RECOMPUTE_TOL.get(b.dtype, 1e-2)
        if b.numel() and float((a.detach() - b.detach()).abs().max()) > tol * max(scale, 1.0):
            return False
    return True


@contextlib.contextmanager
def capture_calls(
    modules: dict[str, nn.Module],
    copy_inputs: set[str],
    unroll: dict[str, Unroll] | None = None,
) -> Iterator[dict[str, list[Captured]]]:
    """Record the calls of ``modules``, holding each floating output tensor for differentiation.

    The hook hands the rest of the network clones of the held outputs, so that an in-place
    operation downstream (``ReLU(inplace=True)``, ``out += identity``) cannot change what we
    differentiate against. An output that does not require grad becomes a leaf that does, so
    parameters never need ``requires_grad``.

    For a module in ``unroll``, the hook instead recomputes the output with
    ``unroll[name](module, args, tensors)`` (a record with ``output`` and ``held``), checks that it
    equals the module's own, and hands the network the recomputed output, whose intermediate
    tensors ``held`` are then what is differentiated against (recurrent layers). Where it differs,
    the call is marked ``mismatch`` and left as it was.
    """
    records: dict[str, list[Captured]] = {name: [] for name in modules}
    handles = []

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            copy = name in copy_inputs
            names = [*module._parameters, *module._buffers]
            tensors = {n: t.detach() for n in names if isinstance(t := getattr(module, n), Tensor)}
            first = args[0] if args else None
            record = Captured(
                args=tuple(_detach(a, copy) for a in args),
                kwargs={k: _detach(v, copy) for k, v in kwargs.items()},
                tensors=tensors,
                out_spec=None,
                held={},
                first_arg=first.data_ptr() if isinstance(first, Tensor) else None,
            )
            records[name].append(record)
            if unroll is not None and name in unroll:
                live = {n: getattr(module, n) for n in module._parameters}
                found = unroll[name](module, args, live)
                if _same(found.output, output):
                    record.extra = found
                    record.held = dict(enumerate(found.held))
                    return found.output
                record.mismatch = True
            leaves, spec = pytree.tree_flatten(output)
            record.out_spec = spec
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.is_floating_point():
                    held = leaf if leaf.requires_grad else leaf.detach().requires_grad_(True)
                    record.held[i] = held
                    leaves[i] = held.clone()
            return pytree.tree_unflatten(leaves, spec)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def backprops(
    logits: Tensor,
    targets: list[Tensor],
    cotangents: Tensor,
    consume: Callable[[list[Tensor]], None],
    method: Backward = "auto",
    retain_graph: bool = False,
) -> None:
    """Backpropagate each cotangent row of ``cotangents`` to every tensor in ``targets``: rows
    ``(R, K)`` shared by every sample (the contrasts Qᵀ, ``(K', K)``), or
    ``(R, *logits.shape)``, one per sample (the sampled labels of
    :mod:`~lightning_sens.core.trace`).

        ``consume`` receives, for one cotangent after the other, the list of backprops (one per
        target, shaped like it; zeros where a target does not reach the logits), so that callers can
        reduce them at once instead of holding all K' of them. "loop" runs K' backward passes over a
        retained graph; "batched" runs one vectorised backward (``is_grads_batched``) and then hands
        out its slices; "auto" picks "batched" on CUDA and "loop" on CPU, where the loop measured
        faster (docs/performance.md, "The exact engine (`benchmarks/bench_engine.py`)").
    """
    K1, B = cotangents.shape[0], logits.shape[0]
    if cotangents.dim() == logits.dim() + 1:
        grad_outputs = cotangents.to(logits.dtype)
    else:
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
            logits,
            targets,
            grad_outputs,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain_graph,
        )
        for k in range(K1):
            consume(filled(found, k))
        return
    for k in range(K1):
        found = torch.autograd.grad(
            logits,
            targets,
            grad_outputs[k],
            retain_graph=retain_graph or k < K1 - 1,
            allow_unused=True,
        )
        consume(filled(found, None))
