"""The generic exact route: per-sample parameter Jacobians through a module's recorded calls.

For any module (attention, recurrent layers, custom code, parameters used in several places) the
route replays each recorded call of a *host* module sample by sample with :mod:`torch.func`
(``vjp`` of one sample, in a ``vmap`` over samples inside a ``vmap`` over the K' cotangents) and
pulls back the backprop that the host's outputs received. The host is the layer itself, or the
nearest enclosing module whose calls contain every use of the parameters; the whole model
(through ``forward_fn``) is the last resort. Where ``vmap`` cannot run a module (data-dependent
control flow, unsupported operators) or its numbers fail a check against autograd (a wrong
batching rule), a loop over samples computes the same Jacobians (docs/engine.md, "The Jacobian
route").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap

from lightning_sens.core.certificate import CERTIFICATE_TOL, disagree
from lightning_sens.core.routes.base import LayerGram, RouteResult, norm2

__all__ = ["JacobianCall", "ParamUse", "jacobian_route"]

Replay = Callable[[dict[str, Tensor], list[Tensor]], list[Tensor]]

# The per-sample Jacobians of one sub-batch may take this much memory (elements × bytes).
_MEMORY_BUDGET = 256 * 2**20


@dataclass
class JacobianCall:
    """One recorded call of a host, ready to be replayed per sample.

    Attributes:
        replay: ``(params, batched inputs) -> held outputs``; runs the host on the given inputs
            with ``params`` substituted (torch.func.functional_call).
        inputs: the call's batched input tensors.
        in_dims: the batch dimension of each of ``inputs``.
        cotangents: for each held output, its backprops ``(K', *output shape)``.
        out_dims: the batch dimension of each held output.
    """

    replay: Replay
    inputs: list[Tensor]
    in_dims: list[int]
    cotangents: list[Tensor]
    out_dims: list[int]


@dataclass(frozen=True)
class ParamUse:
    """A parameter handled by a Jacobian route, and the layers whose families contain it.

    Attributes:
        key: its name as the host's ``functional_call`` expects it.
        value: its value (in the compute dtype).
        layers: layer name → the parameter's output-channel axis in that layer (None: the layer
            has no channel notion).
        weight_of: the layers (Linear/Conv) whose ``weight`` this parameter is.
    """

    key: str
    value: Tensor
    layers: dict[str, int | None]
    weight_of: tuple[str, ...] = ()


def _vmapped(call: JacobianCall, params: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """``(B, K', *shape)`` Jacobians: ``vmap`` over the K' cotangents of ``vmap`` over samples.

    The samples are the inner vmap: every tensor of the replay is then batched over samples, and
    only the backward's are batched over cotangents too. Nested the other way, torch 2.14's
    batching rule for prelu's backward lines up the sample dimension of the forward's tensors
    with the cotangent dimension of the backward's (docs/engine.md, "The Jacobian route").
    """
    size = rows.stop - rows.start
    inputs = [t.narrow(d, rows.start, size) for t, d in zip(call.inputs, call.in_dims, strict=True)]
    cots = [
        c.narrow(d + 1, rows.start, size)
        for c, d in zip(call.cotangents, call.out_dims, strict=True)
    ]

    def one_sample(sample_inputs: list[Tensor], sample_cots: list[Tensor]) -> dict[str, Tensor]:
        kept = [t.unsqueeze(d) for t, d in zip(sample_inputs, call.in_dims, strict=True)]
        held = [c.unsqueeze(d) for c, d in zip(sample_cots, call.out_dims, strict=True)]
        pulled: dict[str, Tensor] = vjp(lambda p: call.replay(p, kept), params)[1](held)[0]
        return pulled

    def one_cotangent(k_cots: list[Tensor]) -> dict[str, Tensor]:
        samples: dict[str, Tensor] = vmap(one_sample, in_dims=(call.in_dims, call.out_dims))(
            inputs, k_cots
        )
        return samples

    if cots[0].shape[0] == 1:  # K' = 1 (a binary classifier): no vmap of size 1
        return {n: g.unsqueeze(1) for n, g in one_cotangent([c[0] for c in cots]).items()}
    return {n: g.movedim(0, 1) for n, g in vmap(one_cotangent)(cots).items()}


def _agrees(
    call: JacobianCall, params: dict[str, Tensor], rows: slice, found: dict[str, Tensor]
) -> bool:
    """Whether vmap's Jacobians are autograd's, along a random combination of samples and
    cotangents: one backward pass of the chunk, no vmap. A batching rule that mixes samples or
    cotangents fails it (docs/engine.md, "The Jacobian route")."""
    size = rows.stop - rows.start
    K1 = call.cotangents[0].shape[0]
    r = torch.randn(size, K1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        inputs = [
            t.narrow(d, rows.start, size).clone()  # a replay may modify its inputs in place
            for t, d in zip(call.inputs, call.in_dims, strict=True)
        ]
        outs = call.replay(leaves, inputs)
        combined = []
        for c, d in zip(call.cotangents, call.out_dims, strict=True):
            part = c.narrow(d + 1, rows.start, size)
            shape = [K1] + [size if i == d else 1 for i in range(part.dim() - 1)]
            weights = r.T.reshape(shape).to(part.device, part.dtype)
            combined.append((weights * part).sum(0))
        used = [(o, c) for o, c in zip(outs, combined, strict=True) if o.requires_grad]
        truth: tuple[Tensor | None, ...] = (None,) * len(leaves)
        if used:  # else no parameter reaches this call's outputs: every Jacobian is zero
            truth = torch.autograd.grad(
                [o for o, _ in used], list(leaves.values()), [c for _, c in used], allow_unused=True
            )
    tol = CERTIFICATE_TOL.get(call.cotangents[0].dtype, 1e-3)
    for (n, p), g in zip(params.items(), truth, strict=True):
        mine = torch.einsum("bk,bk...->...", r.to(found[n].device, found[n].dtype), found[n])
        if mine.shape != p.shape or disagree(mine, torch.zeros_like(p) if g is None else g, tol):
            return False
    return True


def _looped(call: JacobianCall, params: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """The same Jacobians, one sample and one cotangent at a time (no vmap)."""
    names = list(params)
    per_sample = []
    with torch.enable_grad():
        for b in range(rows.start, rows.stop):
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            kept = [t.narrow(d, b, 1) for t, d in zip(call.inputs, call.in_dims, strict=True)]
            outs = call.replay(leaves, kept)
            K1 = call.cotangents[0].shape[0]
            rows_k = []
            for k in range(K1):
                cots = [
                    c[k].narrow(d, b, 1)
                    for c, d in zip(call.cotangents, call.out_dims, strict=True)
                ]
                found = torch.autograd.grad(
                    outs,
                    [leaves[n] for n in names],
                    cots,
                    retain_graph=k < K1 - 1,
                    allow_unused=True,
                )
                rows_k.append(
                    [
                        torch.zeros_like(params[n]) if g is None else g
                        for n, g in zip(names, found, strict=True)
                    ]
                )
            per_sample.append({n: torch.stack([r[i] for r in rows_k]) for i, n in enumerate(names)})
    return {n: torch.stack([s[n] for s in per_sample]) for n in names}


def per_sample_jacobians(
    calls: Sequence[JacobianCall], params: dict[str, Tensor], batch: int
) -> tuple[dict[str, Tensor], bool]:
    """``(B, K', *shape)`` Jacobians of the contrasts w.r.t. each parameter, summed over calls.

    Returns the Jacobians and whether the vmap path ran (False: the per-sample loop).
    """
    K1 = calls[0].cotangents[0].shape[0]
    per_sample_size = K1 * sum(p.numel() * p.element_size() for p in params.values())
    step = max(1, min(batch, _MEMORY_BUDGET // max(per_sample_size, 1)))
    total: dict[str, Tensor] = {}
    vectorised = True
    # no_grad outside the transforms: the host's other parameters must not build a graph
    with torch.no_grad(), warnings.catch_warnings():
        # vmap's notice that an operator runs in a slower per-sample loop; results are exact
        warnings.filterwarnings("ignore", message="There is a performance drop because we have")
        for call in calls:
            parts = []
            for start in range(0, batch, step):
                rows = slice(start, min(batch, start + step))
                if vectorised:
                    # a batching rule may also be wrong without raising (cdist's backward over
                    # cotangents, torch 2.14): vmap's numbers are used only if checked
                    try:
                        found = _vmapped(call, params, rows)
                        trusted = _agrees(call, params, rows, found)
                    except Exception:  # any vmap limitation: the loop computes the same
                        trusted = False
                    if trusted:
                        parts.append(found)
                        continue
                    vectorised = False
                parts.append(_looped(call, params, rows))
            joined = {n: torch.cat([p[n] for p in parts]) for n in params}
            total = joined if not total else {n: total[n] + joined[n] for n in params}
    return total, vectorised


def _channel_columns(jac: Tensor, value: Tensor, axis: int) -> Tensor:
    """Σ over every axis but ``axis`` of J ⊙ θ: ``(B, K', C)`` derivatives of channel scalings."""
    weighted = jac * value.to(jac.dtype)
    moved = weighted.movedim(axis + 2, 2)
    return moved.reshape(*moved.shape[:3], -1).sum(-1)


def jacobian_route(
    calls: Sequence[JacobianCall], uses: Sequence[ParamUse], batch: int
) -> tuple[RouteResult, dict[str, Tensor], bool]:
    """Per-layer Grams and scaling derivatives of the parameters in ``uses``.

    Each parameter's Gram enters every layer that owns it and ``total`` once.

    Returns:
        The route's result; per parameter key, the Jacobian summed over samples ``(K', *shape)``
        (what the certificate compares with autograd); whether the vectorised path ran.
    """
    params = {use.key: use.value.detach() for use in uses}
    jacobians, vectorised = per_sample_jacobians(calls, params, batch)
    grams: dict[str, Tensor] = {}
    layers: dict[str, LayerGram] = {}
    for use in uses:
        jac = jacobians[use.key]
        flat = jac.reshape(batch, jac.shape[1], -1).to(torch.float64)
        grams[use.key] = flat @ flat.transpose(-1, -2)
        value = params[use.key]  # detached: the results carry no autograd graph
        scale = (flat * value.reshape(-1).to(torch.float64)).sum(-1)
        for layer, axis in use.layers.items():
            channel = None
            if axis is not None:
                channel = _channel_columns(flat.reshape(jac.shape), value, axis)
            rows = None
            if layer in use.weight_of:
                rows = flat.reshape(batch, flat.shape[1], use.value.shape[0], -1)
            theta = norm2([use.value])
            part = LayerGram(grams[use.key], scale, channel, "jacobian", theta, rows)
            layers[layer] = part if layer not in layers else layers[layer] + part
    total = sum(grams.values())
    assert isinstance(total, Tensor)  # a route covers at least one parameter
    sums = {key: jac.sum(0) for key, jac in jacobians.items()}
    return RouteResult(layers, total), sums, vectorised
