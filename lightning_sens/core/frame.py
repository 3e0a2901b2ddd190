"""The per-sample frame of K-space in which FI and the metric are computed.

FI and the metric depend on a family only through the logit changes u = J v it can cause, and
only through their part orthogonal to the all-ones vector (H·1 = 0, cᵀ1 = 0): the engine works
in the contrast basis Q of that complement (docs/engine.md, "One forward pass, K − 1 backward
products"). The probability-dependent algebra is done relative to the most probable class r,
whose probability p_r ≥ 1/K is never subtracted from 1, so that confident predictions
(p_r = 1 − 1e-26) lose no digits (docs/engine.md, "Numerics").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Frame",
    "MetricFrame",
    "broadcast_frame",
    "contrast_basis",
    "drop_reference",
    "metric_frame",
    "sample_frame",
]


@functools.lru_cache(maxsize=32)
def _helmert(K: int) -> Tensor:
    basis = torch.zeros(K, K - 1, dtype=torch.float64)
    for j in range(1, K):
        basis[:j, j - 1] = 1.0
        basis[j, j - 1] = -float(j)
        basis[:, j - 1] /= (j * (j + 1)) ** 0.5
    return basis


def contrast_basis(
    K: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Orthonormal basis of the complement of the all-ones vector in R^K (Helmert contrasts).

    Returns:
        Q of shape ``(K, K − 1)`` with ``Qᵀ Q = I`` and ``Qᵀ 1 = 0``. Because H·1 = 0 and
        cᵀ1 = 0, FI depends on J only through ``Qᵀ J``: the engine backpropagates the K − 1 columns
        of Q as cotangents (docs/engine.md, "One forward pass, K − 1 backward products").

    Example:
        >>> Q = contrast_basis(3)
        >>> torch.allclose(Q.T @ Q, torch.eye(2, dtype=torch.float64))
        True
    """
    if K < 2:
        raise ValueError(f"contrast_basis needs K >= 2 classes, got K={K}.")
    return _helmert(K).to(dtype=dtype, device=device)


def drop_reference(x: Tensor, ref: Tensor, K: int) -> Tensor:
    """Remove row ``ref`` along dim −2: ``(N, K, n) -> (N, K−1, n)``."""
    keep = torch.arange(K - 1, device=x.device).expand(*ref.shape, K - 1)
    keep = keep + (keep >= ref.unsqueeze(-1)).long()
    return x.gather(-2, keep.unsqueeze(-1).expand(*keep.shape, x.shape[-1]))


class Frame(NamedTuple):
    """Per-sample quantities relative to the most probable class r, flat over samples.

    With δ_k = u_k − u_r (k ≠ r) and q = p without r: uᵀHu = δᵀ(diag(q) − q qᵀ)δ and cᵀu = c̃ᵀδ
    for any u (H·1 = 0, cᵀ1 = 0). diag(q) − q qᵀ = D N D with D = diag(√q), N = I − √q√qᵀ, whose
    eigenvalues lie in [p_r, 1] ⊂ [1/K, 1]: all the bad conditioning sits in D.
    """

    r: Tensor  # (N,) the most probable class
    a: Tensor  # (N, K−1) √q
    q: Tensor  # (N, K−1)
    alpha: Tensor  # (N, 1), N^{1/2} = I − α √q√qᵀ
    v: Tensor  # (N, K−1), N^{-1/2} D⁻¹ c̃: FI of a family is ‖v projected on its range‖²
    c_ref: Tensor  # (N, K−1) c̃
    fi_max: Tensor  # (N,) ‖v‖², the largest FI of any family: (1 − p_y)/p_y for log p_y

    def take(self, index: Tensor) -> Frame:
        return Frame(*(t[index] for t in self))


def sample_frame(probs: Tensor, c: Tensor) -> Frame:
    """The :class:`Frame` of samples with probabilities ``(..., K)`` and c = ∂f/∂z ``(..., K)``."""
    K = probs.shape[-1]
    probs, c = probs.reshape(-1, K), c.reshape(-1, K)
    r = probs.argmax(dim=-1)
    q = drop_reference(probs.unsqueeze(-1), r, K).squeeze(-1)
    q = q.clamp_min(torch.finfo(torch.float64).tiny)
    c_ref = drop_reference(c.unsqueeze(-1), r, K).squeeze(-1)
    sigma = q.sum(-1, keepdim=True)
    root_pr = (1.0 - sigma).clamp_min(0.0).sqrt()  # p_r ≥ 1/K: no cancellation here
    alpha = 1.0 / (1.0 + root_pr)
    beta = 1.0 / (root_pr * (1.0 + root_pr))
    a = q.sqrt()
    v = c_ref / a + beta * a * c_ref.sum(-1, keepdim=True)
    return Frame(r, a, q, alpha, v, c_ref, v.square().sum(-1))


def broadcast_frame(
    block_batch: torch.Size, probs: Tensor, c: Tensor
) -> tuple[torch.Size, Frame, Tensor]:
    """The blocks' batch shape, the frame of each sample, and each block's sample index.

    The frame is computed once per sample, not once per block (maps have C·H·W blocks per
    sample).
    """
    K = probs.shape[-1]
    sample_batch = torch.broadcast_shapes(probs.shape[:-1], c.shape[:-1])
    batch = torch.broadcast_shapes(block_batch, sample_batch)
    frame = sample_frame(probs.expand(*sample_batch, K), c.expand(*sample_batch, K))
    samples = torch.arange(frame.r.numel(), device=probs.device).reshape(sample_batch)
    return batch, frame, samples.expand(batch).reshape(-1)


@dataclass(frozen=True)
class MetricFrame:
    """The metric G = Jᵀ H J and the gradient ∇ log p_y = Jᵀ c of any family, per sample.

    Both depend on a family only through its logit changes u = J v. In contrast coordinates
    (u = Q x, the engine's native form, Q = :func:`contrast_basis`) the metric is
    uᵀ H u = ‖W x‖² and the gradient cᵀ u = gᵀ x, where W and g are built relative to the most
    probable class r (as :class:`Frame`): no entry of H = diag(p) − p pᵀ is formed by
    subtracting numbers close to 1, so the metric of a confident prediction (H ≈ 1e-26) keeps
    every digit.

    Attributes:
        factor: W, ``(B, K', K')`` float64, with Qᵀ H Q = Wᵀ W.
        gradient: g, ``(B, K')`` float64, with Qᵀ c = g (c = ∂ log p_y / ∂z).
    """

    factor: Tensor
    gradient: Tensor

    def trace(self, gram: Tensor) -> Tensor:
        """tr(G) = tr(Qᵀ H Q · A) of blocks with contrast Gram A ``(B, *blocks, K', K')``."""
        W = self.factor.reshape(self.factor.shape[0], *([1] * (gram.dim() - 3)), *gram.shape[-2:])
        return ((W @ gram) * W).sum((-1, -2))

    def columns(self, columns: Tensor) -> Tensor:
        """uᵀ H u of each column x (u = Q x), ``(B, K', *rest)`` → ``(B, *rest)``."""
        return torch.einsum("bjk,bk...->bj...", self.factor, columns).square().sum(1)

    def slope(self, columns: Tensor) -> Tensor:
        """cᵀ u of each column x, ``(B, K', *rest)`` → ``(B, *rest)``: ∂ log p_y along it."""
        return torch.einsum("bk,bk...->b...", self.gradient, columns)


def metric_frame(probs: Tensor, c: Tensor) -> MetricFrame:
    """The :class:`MetricFrame` of samples with probabilities ``(B, K)`` and c = ∂f/∂z ``(B, K)``.

    With R the map u ↦ δ = (u_k − u_r)_{k≠r}, uᵀ H u = δᵀ (diag(q) − q qᵀ) δ (q = p without r)
    and diag(q) − q qᵀ = D N D with D = diag(√q), N = I − √q √qᵀ = (N^{1/2})²; so
    W = N^{1/2} D R Q and g = (R Q)ᵀ c̃ (c̃ = c without r).
    """
    K = probs.shape[-1]
    frame = sample_frame(probs.to(torch.float64), c.to(torch.float64))
    Q = contrast_basis(K, torch.float64, probs.device)
    B = frame.r.shape[0]
    span = Q.expand(B, K, K - 1)
    r = frame.r.reshape(-1, 1, 1).expand(-1, 1, K - 1)
    delta = drop_reference(span - span.gather(-2, r), frame.r, K)  # R Q, (B, K', K')
    whitened = frame.a.unsqueeze(-1) * (
        delta - frame.alpha.unsqueeze(-1) * (frame.q.unsqueeze(-2) @ delta)
    )
    gradient = (frame.c_ref.unsqueeze(-2) @ delta).squeeze(-2)
    return MetricFrame(whitened, gradient)
