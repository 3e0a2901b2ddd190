"""The certificate: every route's recorded calls account for every use of its parameters.

For a random unit combination r of the K' contrast cotangents, one extra backward pass gives the
true gradient of Σ_b rᵀQᵀz_b with respect to each routed parameter (autograd, every use counted).
A fast route's share is the same gradient through its own recorded calls only: the backprop of
its outputs for r, pulled back through the layer alone; a Jacobian route's share is its
per-sample Jacobians contracted with r and summed over samples. Where the two disagree, the route
missed a use (a weight also used functionally elsewhere, a call that bypasses ``__call__``, an
output changed by a hook) and its layers are recomputed through the whole model
(docs/engine.md, "The certificate").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.capture import Captured

__all__ = ["CERTIFICATE_TOL", "FastShare", "HostShare", "certify", "disagree"]

# Relative disagreement (in norm) between a route's gradient and autograd's that fails it.
CERTIFICATE_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}


@dataclass(frozen=True)
class FastShare:
    """A layer on a fast route: its module, its recorded calls, its parameters' canonical names
    (in ``named_parameters`` order of the trainable ones)."""

    module: nn.Module
    calls: list[Captured]
    params: list[str]


@dataclass(frozen=True)
class HostShare:
    """A Jacobian route: per canonical parameter name, its Jacobian summed over samples
    ``(K', *shape)``, and the layers that own each parameter."""

    sums: dict[str, Tensor]
    owners: dict[str, list[str]]


def disagree(mine: Tensor, truth: Tensor, tol: float) -> bool:
    """‖mine − truth‖ > tol · max(‖mine‖, ‖truth‖) (both zero: agree)."""
    scale = max(float(truth.norm()), float(mine.norm()))
    return scale > 0 and float((mine.to(truth.dtype) - truth).norm()) > tol * scale


def _fast_share(share: FastShare, backprops: tuple[Tensor | None, ...]) -> list[Tensor]:
    """The gradient of Σ_calls ⟨ḡ, layer(x)⟩ w.r.t. the layer's trainable parameters."""
    trainable = [n for n, p in share.module.named_parameters(recurse=False) if p.requires_grad]
    leaves = {n: share.calls[0].tensors[n].detach().requires_grad_(True) for n in trainable}
    parts = []
    position = 0
    for call in share.calls:
        found = backprops[position : position + len(call.held)]
        position += len(call.held)
        if call.extra is not None:  # a recurrent layer: its linear uses, recomputed
            outputs = call.extra.replay({**call.tensors, **leaves})
        else:
            substitutes = {**call.tensors, **leaves}
            outputs = [functional_call(share.module, substitutes, call.args, call.kwargs)]
        parts += [(g * out).sum() for g, out in zip(found, outputs, strict=True) if g is not None]
    if not parts:
        return [torch.zeros_like(leaf) for leaf in leaves.values()]
    found = torch.autograd.grad(torch.stack(parts).sum(), list(leaves.values()), allow_unused=True)
    return [
        torch.zeros_like(leaf) if g is None else g
        for leaf, g in zip(leaves.values(), found, strict=True)
    ]


def certify(
    logits: Tensor,
    cotangents: Tensor,
    fast: dict[str, FastShare],
    hosts: list[HostShare],
    tensors: dict[str, Tensor],
) -> set[str]:
    """The layers whose route missed a use of their parameters.

    Args:
        logits: the engine's forward pass's logits, their graph still alive.
        cotangents: the cotangents the routes were given: the contrast basis Q ``(K, K')``,
            shared by every sample, or ``(R, *logits.shape)``, one set per sample.
        fast: layers on fast routes.
        hosts: the Jacobian routes (the whole-model route sees every use and needs no check).
        tensors: canonical parameter name → the tensor the forward pass used.
    """
    per_sample = cotangents.dim() == logits.dim() + 1
    K1 = cotangents.shape[0] if per_sample else cotangents.shape[1]
    r = torch.randn(K1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = (r / r.norm()).to(logits.device)
    if per_sample:
        cotangent = torch.einsum("r,r...->...", r, cotangents.to(torch.float64))
        cotangent = cotangent.to(logits.dtype)
    else:
        Q = cotangents
        cotangent = (Q.to(torch.float64) @ r).to(logits.dtype).expand(logits.shape[0], -1)
    held = [
        call.held[i] for share in fast.values() for call in share.calls for i in sorted(call.held)
    ]
    names = sorted(
        {p for share in fast.values() for p in share.params}
        | {p for host in hosts for p in host.sums}
    )
    found = torch.autograd.grad(
        logits, held + [tensors[p] for p in names], cotangent, allow_unused=True
    )
    truth = {
        p: torch.zeros_like(tensors[p]) if g is None else g
        for p, g in zip(names, found[len(held) :], strict=True)
    }
    tol = CERTIFICATE_TOL.get(logits.dtype, 1e-3)
    failed: set[str] = set()
    position = 0
    for layer, share in fast.items():
        count = sum(len(call.held) for call in share.calls)
        backprops = found[position : position + count]
        position += count
        shares = _fast_share(share, backprops)
        if any(disagree(g, truth[p], tol) for g, p in zip(shares, share.params, strict=True)):
            failed.add(layer)
    for host in hosts:
        for p, summed in host.sums.items():
            along_r = torch.einsum("k,k...->...", r.to(summed.dtype), summed)
            if disagree(along_r, truth[p], tol):
                failed.update(host.owners[p])
    return failed
