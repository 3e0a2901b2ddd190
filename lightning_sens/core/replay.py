"""What the Jacobian route replays sample by sample: a host module's calls, or the whole model.

A host's recorded call is rebuilt with its batched inputs replaced by one sample's slice and its
parameters substituted by ``torch.func.functional_call``; its outputs are pulled back with the
backprops they received in the engine's backward products. The whole model is replayed through
``forward_fn`` on the chunk's inputs, pulled back with the contrast cotangents themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.capture import Captured
from lightning_sens.core.inputs import Inputs, batch_size, batched_tensors, get, replace
from lightning_sens.core.routes import JacobianCall
from lightning_sens.core.runner import Runner

__all__ = ["host_calls", "model_call"]


def host_calls(
    module: nn.Module,
    records: list[Captured],
    in_dims: list[list[int | None]],
    out_dims: list[list[int | None]],
    backprops: dict[tuple[int, int], list[Tensor]],
    extra: dict[str, Tensor],
) -> list[JacobianCall]:
    """One :class:`JacobianCall` per recorded call of a host module.

    Args:
        module: the host.
        records: its calls in the engine's forward pass.
        in_dims, out_dims: per call, the batch dim of each input and output leaf (or None).
        backprops: (call, output leaf) → the backprop of that output for each cotangent.
        extra: substitutes for the host's other tensors (an upcast low-precision model).
    """
    calls = []
    for i, call in enumerate(records):
        dims = in_dims[i]
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        batched = [j for j, d in enumerate(dims) if d is not None]
        held = sorted(call.held)

        def replay(
            params: dict[str, Tensor],
            values: list[Tensor],
            leaves: list[Any] = leaves,
            spec: Any = spec,
            batched: list[int] = batched,
            held: list[int] = held,
        ) -> list[Tensor]:
            full = list(leaves)
            for j, v in zip(batched, values, strict=True):
                full[j] = v
            args, kwargs = pytree.tree_unflatten(full, spec)
            out = functional_call(module, {**extra, **params}, tuple(args), dict(kwargs))
            out_leaves = pytree.tree_leaves(out)
            return [out_leaves[j] for j in held]

        calls.append(
            JacobianCall(
                replay,
                [leaves[j].clone() for j in batched],  # a replay may modify them in place
                [d for d in dims if d is not None],
                [torch.stack(backprops[(i, j)]) for j in held],
                [_dim(out_dims[i][j]) for j in held],
            )
        )
    return calls


def _dim(found: int | None) -> int:
    if found is None:  # the plan hosts only modules whose floating outputs carry the batch
        raise ValueError("a held output of a host does not carry the batch")
    return found


def model_call(runner: Runner, inputs: Inputs, Q: Tensor, dtype: torch.dtype) -> JacobianCall:
    """The whole model through ``forward_fn``, pulled back with the K' contrasts (rows of Qᵀ)."""
    size = batch_size(inputs)
    keys = batched_tensors(inputs, size)

    def replay(params: dict[str, Tensor], values: list[Tensor]) -> list[Tensor]:
        rebuilt = inputs
        for key, v in zip(keys, values, strict=True):
            rebuilt = replace(rebuilt, key, v)
        return [runner(rebuilt, params)]

    cotangents = Q.T.to(dtype).unsqueeze(1).expand(Q.shape[1], size, -1)
    copies = [get(inputs, k).detach().clone() for k in keys]
    return JacobianCall(replay, copies, [0] * len(keys), [cotangents], [0])
