"""The influence measure of a perturbation family from its Gram matrix in K-space.

Everything here is pure tensor math (docs/method.md, "The measure" and "Two facts you must
know"). A perturbation family ω (a block of input coordinates, a layer's parameters, a scaling
factor) enters through the Jacobian J = ∂z/∂ω of the logits z ∈ R^K. With p = softmax(z),
H = diag(p) − p pᵀ and c = ∂f/∂z (for f = log p_y: c = e_y − p),

    G = Jᵀ H J,    ∇f = Jᵀ c,    FI = ∇fᵀ G⁺ ∇f = max_v (vᵀ∇f)² / (vᵀ G v).

Writing u = J v for the change of logits a direction causes, FI = max over u ∈ range(J) of
(cᵀu)² / (uᵀ H u): only the span of achievable logit changes matters, and that span is read off the
K × K Gram matrix S = J Jᵀ. Nothing of size m is ever needed.

Numerics (docs/engine.md, "Numerics"): the rank of the family is decided on the p-independent
Gram; the probability-dependent algebra is done in the frame of the most probable class
(:mod:`lightning_sens.core.frame`). The closed forms that need only the logits are in
:mod:`lightning_sens.core.closed_forms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sens.core.frame import (
    Frame,
    broadcast_frame,
    contrast_basis,
    drop_reference,
)

__all__ = [
    "BlockFI",
    "default_rtol",
    "fi_along_direction",
    "fi_from_contrast_columns",
    "fi_from_contrast_gram",
    "fi_from_gram",
]


@dataclass(frozen=True)
class BlockFI:
    """FI of one perturbation family per sample (and per block), with f = log p_y unless stated.

    Attributes:
        fi: FI = ∇fᵀ G⁺ ∇f (docs/method.md, "The measure"), float64, shape ``(B, *blocks)``.
            Dimensionless.
        relative_fi: FI divided by the largest FI any family can reach for that sample,
            ``(1 − p_y) / p_y`` for f = log p_y (docs/method.md, "The measure"); in [0, 1]; 0
            where both are 0.
        effective_rank: rank of G (int64), decided on the p-independent Gram with a relative
            tolerance; at most K − 1. FI equals the closed form exactly when it is K − 1.
    """

    fi: Tensor
    relative_fi: Tensor
    effective_rank: Tensor

    @property
    def log_fi(self) -> Tensor:
        """Natural log of ``fi`` (−inf where FI is 0)."""
        return torch.log(self.fi)

    def __getitem__(self, index: int | slice | Tensor) -> BlockFI:
        return BlockFI(self.fi[index], self.relative_fi[index], self.effective_rank[index])

    @staticmethod
    def cat(parts: list[BlockFI]) -> BlockFI:
        """Concatenate per-chunk results along the sample dimension."""
        return BlockFI(
            torch.cat([p.fi for p in parts]),
            torch.cat([p.relative_fi for p in parts]),
            torch.cat([p.effective_rank for p in parts]),
        )


def default_rtol(dtype: torch.dtype) -> float:
    """Relative eigenvalue tolerance for rank decisions on a Gram *formed* in ``dtype``.

    An eigenvalue λ of the block Gram is kept when λ > rtol · K · λ_max. Gram entries carry a
    relative error of a few units of the precision they were summed in, so the tolerance scales
    with it. The engine forms every Gram in float64, also from float32 Jacobians, and so uses
    the float64 value for float32 models too: there, a truly null direction's eigenvalue ratio
    is the square of the Jacobian's relative error, at most about 2e-13 on the test zoo, while
    real directions reach down to 1e-9 in every architecture measured (docs/engine.md,
    "Numerics"; ``benchmarks/rank_tolerance.py``).
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def _fi_on_range(basis: Tensor, keep: Tensor, frame: Frame) -> Tensor:
    """FI of the family whose logit changes span the kept leading columns of ``basis``.

    Args:
        basis: ``(N, K−1, n)`` columns in contrast coordinates; kept ones first, full rank.
        keep: ``(N, n)`` bool, a prefix of True per row.
        frame: the frame of each block's sample, ``N`` rows.
    """
    K = basis.shape[-2] + 1
    n = basis.shape[-1]
    span = contrast_basis(K, basis.dtype, basis.device) @ basis  # (N, K, n), ⟂ 1
    r = frame.r
    # Range of the family in δ-coordinates (relative to class r), then whitened by D N^{1/2}.
    delta = drop_reference(span - span.gather(-2, r.reshape(-1, 1, 1).expand(-1, 1, n)), r, K)
    y = frame.a.unsqueeze(-1) * (
        delta - frame.alpha.unsqueeze(-1) * (frame.q.unsqueeze(-2) @ delta)
    )
    # Householder QR: the first `rank` columns of Q_y span exactly the kept columns of y.
    q_y, _ = torch.linalg.qr(y)
    proj = (q_y.transpose(-1, -2) @ frame.v.unsqueeze(-1)).squeeze(-1)
    return (proj.square() * keep).sum(-1)


def _fi_rank_deficient(
    gram: Tensor, frame: Frame, rtol: float, noise_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """FI and rank of flat batches ``(N, K', K')`` via eigh (rank and range) and QR."""
    K = gram.shape[-1] + 1
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending: kept directions come first
    top = torch.maximum(evals[..., :1], noise_scale.unsqueeze(-1))
    keep = (evals > rtol * K * top) & (evals > 0)
    return _fi_on_range(evecs, keep, frame), keep.sum(-1)


def _block_fi(fi: Tensor, fi_max: Tensor, rank: Tensor, batch: torch.Size) -> BlockFI:
    relative = torch.where(fi_max > 0, fi / fi_max.where(fi_max > 0, 1.0), 0.0).clamp(max=1.0)
    return BlockFI(fi.reshape(batch), relative.reshape(batch), rank.reshape(batch))


def fi_from_contrast_columns(
    columns: Tensor, probs: Tensor, c: Tensor, rtol: float, noise_scale: Tensor | None = None
) -> BlockFI:
    """FI of a family of m < K − 1 coordinates from its Jacobian columns in contrast coordinates.

    The cheap route for small blocks (one pixel's channels, a layer's few scaling factors):
    the rank is decided on the m × m Gram UᵀU, whose nonzero eigenvalues are those of U Uᵀ,
    so it agrees with :func:`fi_from_contrast_gram` on ``U Uᵀ``.

    Args:
        columns: ``(..., K−1, m)``, U = Qᵀ J.
        probs: ``(..., K)`` probabilities, as in :func:`fi_from_contrast_gram`.
        c: ``(..., K)`` gradient of the objective w.r.t. the logits.
        rtol: relative eigenvalue tolerance of the rank decision.
        noise_scale: ``(...)`` optional floor for the reference eigenvalue, as in
            :func:`fi_from_contrast_gram`.
    """
    K1, m = columns.shape[-2:]
    if m >= K1:
        gram = columns @ columns.transpose(-1, -2)
        return fi_from_contrast_gram(gram, probs, c, rtol, noise_scale)
    if m == 1:  # docs/derivations.md, "One-parameter families": no factorisation needed
        Q = contrast_basis(K1 + 1, columns.dtype, columns.device)
        found = fi_along_direction((Q @ columns).squeeze(-1), probs, c)
        if noise_scale is None:
            return found
        size = columns.square().sum((-1, -2))
        null = size <= rtol * (K1 + 1) * noise_scale.to(size.dtype)
        return BlockFI(
            torch.where(null, 0.0, found.fi),
            torch.where(null, 0.0, found.relative_fi),
            torch.where(null, 0, found.effective_rank),
        )
    batch, frame, owner = broadcast_frame(columns.shape[:-2], probs, c)
    columns = columns.expand(*batch, K1, m).reshape(-1, K1, m)
    evals, evecs = torch.linalg.eigh(columns.transpose(-1, -2) @ columns)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    top = evals[..., :1]
    if noise_scale is not None:
        noise = torch.zeros(batch, dtype=evals.dtype, device=evals.device) + noise_scale
        top = torch.maximum(top, noise.reshape(-1, 1))
    keep = (evals > rtol * (K1 + 1) * top) & (evals > 0)
    fi = _fi_on_range(columns @ evecs, keep, frame.take(owner))
    return _block_fi(fi, frame.fi_max[owner], keep.sum(-1), batch)


def fi_from_contrast_gram(
    gram: Tensor, probs: Tensor, c: Tensor, rtol: float, noise_scale: Tensor | None = None
) -> BlockFI:
    """FI from a block Gram expressed in the contrast basis (the engine's native form).

    Blocks whose Gram passes a Cholesky test of full rank (λ_min > rtol · K · trace, stricter
    than the eigenvalue rule below) get the closed form ‖v‖² = max FI directly; the others go
    through eigh and QR. Both give the same value to rounding where both apply.

    Args:
        gram: ``(..., K−1, K−1)`` float64, ``Qᵀ J Jᵀ Q`` with Q = :func:`contrast_basis`.
        probs: ``(..., K)`` float64 probabilities (broadcastable against ``gram``'s batch dims).
        c: ``(..., K)`` float64 gradient of the objective w.r.t. the logits (its component along
            the all-ones vector is irrelevant and ignored).
        rtol: eigenvalues λ > rtol · K · λ_ref of ``gram`` span the family's range, where
            λ_ref is the largest eigenvalue of ``gram``, or ``noise_scale`` where that is larger.
        noise_scale: ``(...)`` optional size of the uncentred Gram (e.g. trace(J Jᵀ)/K): a
            Jacobian that moves all logits together carries rounding noise of that size into
            the contrasts, which must not count as rank.

    Returns:
        :class:`BlockFI` with the batch shape of ``gram``.
    """
    K = gram.shape[-1] + 1
    batch, frame, owner = broadcast_frame(gram.shape[:-2], probs, c)
    gram = gram.expand(*batch, K - 1, K - 1).reshape(-1, K - 1, K - 1)
    noise = torch.zeros(batch, dtype=gram.dtype, device=gram.device)
    if noise_scale is not None:
        noise = noise + noise_scale.to(gram.dtype)
    noise = noise.reshape(-1)

    fi_max = frame.fi_max[owner]
    trace = torch.maximum(gram.diagonal(dim1=-2, dim2=-1).sum(-1), noise)
    eye = torch.eye(K - 1, dtype=gram.dtype, device=gram.device)
    _, info = torch.linalg.cholesky_ex(gram - (rtol * K * trace)[:, None, None] * eye)
    full = (info == 0) & (trace > 0)
    fi = torch.where(full, fi_max, 0.0)
    rank = torch.where(full, K - 1, 0)
    rest = (~full).nonzero().squeeze(-1)
    if len(rest):
        fi[rest], rank[rest] = _fi_rank_deficient(
            gram[rest], frame.take(owner[rest]), rtol, noise[rest]
        )
    return _block_fi(fi, fi_max, rank, batch)


def fi_from_gram(gram: Tensor, probs: Tensor, c: Tensor, rtol: float | None = None) -> BlockFI:
    """FI of a perturbation family from its K × K Gram S = J Jᵀ (docs/method.md, "Numerics").

    Batched over any leading dimensions (samples, blocks): ``gram`` is ``(..., K, K)``, ``probs``
    and ``c`` are ``(..., K)`` and broadcast against it.

    Args:
        gram: S_ij = ⟨∂z_i/∂ω, ∂z_j/∂ω⟩, symmetric positive semi-definite.
        probs: p = softmax(z); must sum to 1.
        c: ∂f/∂z; for f = log p_y use
            :func:`~lightning_sens.core.closed_forms.log_prob_gradient` (e_y − p). Only its
            component orthogonal to the all-ones vector matters (every function of p has c ⟂ 1).
        rtol: relative eigenvalue tolerance for the rank decision; default from
            :func:`default_rtol` for ``gram``'s dtype.

    Returns:
        :class:`BlockFI`; its ``effective_rank`` is the rank of G = Jᵀ H J.

    Example:
        >>> from lightning_sens.core.closed_forms import log_prob_gradient
        >>> J = torch.randn(4, 10, dtype=torch.float64)
        >>> p = torch.softmax(torch.randn(4, dtype=torch.float64), -1)
        >>> c = log_prob_gradient(p, torch.tensor(2))
        >>> out = fi_from_gram(J @ J.T, p, c)
        >>> bool(torch.isclose(out.fi, (1 - p[2]) / p[2])), int(out.effective_rank)
        (True, 3)
    """
    K = gram.shape[-1]
    if gram.dim() < 2 or gram.shape[-2] != K:
        raise ValueError(f"gram must have shape (..., K, K), got {tuple(gram.shape)}.")
    if K < 2:
        raise ValueError(f"gram must describe K >= 2 classes, got K={K}.")
    tol = default_rtol(gram.dtype) if rtol is None else rtol
    Q = contrast_basis(K, torch.float64, gram.device)
    gram = gram.to(torch.float64)
    noise_scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / K
    return fi_from_contrast_gram(
        Q.T @ gram @ Q, probs.to(torch.float64), c.to(torch.float64), tol, noise_scale
    )


def fi_along_direction(u: Tensor, probs: Tensor, c: Tensor) -> BlockFI:
    """FI of a one-parameter family (m = 1): (cᵀu)² / (uᵀHu) (docs/derivations.md,
    "One-parameter families").

    Args:
        u: ``(..., K)`` the logits' derivative along the single direction (u = J for m = 1).
        probs: ``(..., K)`` probabilities, broadcastable against ``u``.
        c: ``(..., K)`` gradient of the objective w.r.t. the logits (as in :func:`fi_from_gram`).

    Returns:
        :class:`BlockFI`; FI is defined as 0 (rank 0) where uᵀHu = 0, i.e. u ∝ 1.
        Computed relative to the most probable class r, so that the variance uᵀHu loses at
        most a factor K to cancellation even for confident predictions.
    """
    K = u.shape[-1]
    batch, frame, owner = broadcast_frame(
        u.shape[:-1], probs.to(torch.float64), c.to(torch.float64)
    )
    u = u.to(torch.float64).expand(*batch, K).reshape(-1, K)
    here = frame.take(owner)
    r = here.r.unsqueeze(-1)
    delta = drop_reference((u - u.gather(-1, r)).unsqueeze(-1), here.r, K).squeeze(-1)
    mean = (here.q * delta).sum(-1)
    curvature = ((here.q * delta.square()).sum(-1) - mean.square()).clamp_min(0.0)
    positive = curvature > 0
    slope = (here.c_ref * delta).sum(-1)
    fi = torch.where(positive, slope.square() / curvature.where(positive, 1.0), 0.0)
    return _block_fi(fi, here.fi_max, positive.long(), batch)
