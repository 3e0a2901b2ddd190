"""The influence measure in K-space: closed forms and FI from a block's Gram matrix.

Everything here is pure tensor math (docs/method.md, "The measure" and "Two facts you must
know"). A perturbation family ω (a block of input coordinates, a layer's parameters, a scaling
factor) enters through the Jacobian J = ∂z/∂ω of the logits z ∈ R^K. With p = softmax(z),
H = diag(p) − p pᵀ and c = ∂f/∂z (for f = log p_y: c = e_y − p),

    G = Jᵀ H J,    ∇f = Jᵀ c,    FI = ∇fᵀ G⁺ ∇f = max_v (vᵀ∇f)² / (vᵀ G v).

Writing u = J v for the change of logits a direction causes, FI = max over u ∈ range(J) of
(cᵀu)² / (uᵀ H u): only the span of achievable logit changes matters, and that span is read off the
K × K Gram matrix S = J Jᵀ. Nothing of size m is ever needed.

Numerics (docs/engine.md, "Numerics"): the rank of the family is decided on the p-independent
Gram; the probability-dependent algebra is done relative to the most probable class r, whose
probability p_r ≥ 1/K is never subtracted from 1, so that confident predictions
(p_r = 1 − 1e-26) lose no digits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BlockFI",
    "ClosedFormFI",
    "MetricFrame",
    "closed_form_fi",
    "contrast_basis",
    "default_rtol",
    "fi_along_direction",
    "fi_from_contrast_columns",
    "fi_from_contrast_gram",
    "fi_from_gram",
    "log_prob_gradient",
    "metric_frame",
    "resolve_target",
]

Target = Tensor | Literal["pred"]


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


@dataclass(frozen=True)
class ClosedFormFI:
    """Whole-family FI from the logits alone, for f = log p_y (docs/method.md, "Two facts you
    must know").

    Attributes:
        target: the class y of each sample (int64, ``(B,)``): the given label or the argmax.
        p_target: p_y (float64, ``(B,)``).
        log_fi: log FI = log((1 − p_y) / p_y) = logsumexp_{k≠y}(z_k − z_y) (float64, ``(B,)``),
            accurate at any logit margin.
    """

    target: Tensor
    p_target: Tensor
    log_fi: Tensor

    @property
    def fi(self) -> Tensor:
        """FI = (1 − p_y) / p_y; overflows to inf only beyond float64's range."""
        return torch.exp(self.log_fi)


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


def resolve_target(logits: Tensor, target: Target) -> Tensor:
    """The class index y per sample: ``target`` itself, or the argmax of the logits for "pred"."""
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(
                f"target must be a tensor of class indices or the string 'pred', got {target!r}."
            )
        return logits.argmax(dim=-1)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}.")
    return target.to(device=logits.device, dtype=torch.long)


def log_prob_gradient(probs: Tensor, target: Tensor) -> Tensor:
    """c = ∂ log p_y / ∂z = e_y − p, shape ``(..., K)``."""
    c = -probs
    return c.scatter_add(-1, target.unsqueeze(-1), torch.ones_like(c[..., :1]))


def closed_form_fi(logits: Tensor, target: Target) -> ClosedFormFI:
    """Whole-family FI for f = log p_y from the logits: (1 − p_y) / p_y, in log space.

    This is the exact FI of any perturbation family whose Gram has full rank K − 1, e.g. the
    whole input (Setups 1 and 3) or all parameters (docs/method.md, "Two facts you must know").
    It costs nothing once the logits exist. Computed as log FI = logsumexp_{k≠y}(z_k − z_y) in
    float64, so it stays exact at logit margins where (1 − p)/p in float32 is 0.

    Args:
        logits: ``(B, K)`` logits, any floating dtype.
        target: ``(B,)`` true labels (Setups 1, 2) or ``"pred"`` for the predicted class (3, 4).

    Example:
        >>> z = torch.tensor([[0.0, 60.0, 0.0], [2.0, 0.0, 0.0]])
        >>> closed_form_fi(z, torch.tensor([1, 0])).log_fi  # log(2 e^-60), log(2 e^-2)
        tensor([-59.3069,  -1.3069], dtype=torch.float64)
    """
    from lightning_sens.core.validation import check_logits, check_target

    check_logits(logits)
    y = resolve_target(logits, target)
    check_target(y, logits)
    z = logits.detach().to(torch.float64)
    z_y = z.gather(-1, y.unsqueeze(-1))
    others = (z - z_y).scatter(-1, y.unsqueeze(-1), float("-inf"))
    log_fi = torch.logsumexp(others, dim=-1)
    p_target = torch.log_softmax(z, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).exp()
    return ClosedFormFI(target=y, p_target=p_target, log_fi=log_fi)


def _drop_reference(x: Tensor, ref: Tensor, K: int) -> Tensor:
    """Remove row ``ref`` along dim −2: ``(N, K, n) -> (N, K−1, n)``."""
    keep = torch.arange(K - 1, device=x.device).expand(*ref.shape, K - 1)
    keep = keep + (keep >= ref.unsqueeze(-1)).long()
    return x.gather(-2, keep.unsqueeze(-1).expand(*keep.shape, x.shape[-1]))


class _Frame(NamedTuple):
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
    best: Tensor  # (N,) ‖v‖², the largest FI of any family: (1 − p_y)/p_y for log p_y

    def take(self, index: Tensor) -> _Frame:
        return _Frame(*(t[index] for t in self))


def _frame(probs: Tensor, c: Tensor) -> _Frame:
    K = probs.shape[-1]
    probs, c = probs.reshape(-1, K), c.reshape(-1, K)
    r = probs.argmax(dim=-1)
    q = _drop_reference(probs.unsqueeze(-1), r, K).squeeze(-1)
    q = q.clamp_min(torch.finfo(torch.float64).tiny)
    c_ref = _drop_reference(c.unsqueeze(-1), r, K).squeeze(-1)
    sigma = q.sum(-1, keepdim=True)
    root_pr = (1.0 - sigma).clamp_min(0.0).sqrt()  # p_r ≥ 1/K: no cancellation here
    alpha = 1.0 / (1.0 + root_pr)
    beta = 1.0 / (root_pr * (1.0 + root_pr))
    a = q.sqrt()
    v = c_ref / a + beta * a * c_ref.sum(-1, keepdim=True)
    return _Frame(r, a, q, alpha, v, c_ref, v.square().sum(-1))


def _broadcast(
    block_batch: torch.Size, probs: Tensor, c: Tensor
) -> tuple[torch.Size, _Frame, Tensor]:
    """The blocks' batch shape, the frame of each sample, and each block's sample index.

    The frame is computed once per sample, not once per block (maps have C·H·W blocks per
    sample).
    """
    K = probs.shape[-1]
    sample_batch = torch.broadcast_shapes(probs.shape[:-1], c.shape[:-1])
    batch = torch.broadcast_shapes(block_batch, sample_batch)
    frame = _frame(probs.expand(*sample_batch, K), c.expand(*sample_batch, K))
    samples = torch.arange(frame.r.numel(), device=probs.device).reshape(sample_batch)
    return batch, frame, samples.expand(batch).reshape(-1)


def _fi_on_range(basis: Tensor, keep: Tensor, frame: _Frame) -> Tensor:
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
    delta = _drop_reference(span - span.gather(-2, r.reshape(-1, 1, 1).expand(-1, 1, n)), r, K)
    y = frame.a.unsqueeze(-1) * (
        delta - frame.alpha.unsqueeze(-1) * (frame.q.unsqueeze(-2) @ delta)
    )
    # Householder QR: the first `rank` columns of Q_y span exactly the kept columns of y.
    q_y, _ = torch.linalg.qr(y)
    proj = (q_y.transpose(-1, -2) @ frame.v.unsqueeze(-1)).squeeze(-1)
    return (proj.square() * keep).sum(-1)


def _fi_rank_deficient(
    gram: Tensor, frame: _Frame, rtol: float, noise_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """FI and rank of flat batches ``(N, K', K')`` via eigh (rank and range) and QR."""
    K = gram.shape[-1] + 1
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending: kept directions come first
    top = torch.maximum(evals[..., :1], noise_scale.unsqueeze(-1))
    keep = (evals > rtol * K * top) & (evals > 0)
    return _fi_on_range(evecs, keep, frame), keep.sum(-1)


def _block_fi(fi: Tensor, best: Tensor, rank: Tensor, batch: torch.Size) -> BlockFI:
    relative = torch.where(best > 0, fi / best.where(best > 0, 1.0), 0.0).clamp(max=1.0)
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
    if m == 1:  # closed form 2 of docs/method.md, no factorisation needed
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
    batch, frame, owner = _broadcast(columns.shape[:-2], probs, c)
    columns = columns.expand(*batch, K1, m).reshape(-1, K1, m)
    evals, evecs = torch.linalg.eigh(columns.transpose(-1, -2) @ columns)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    top = evals[..., :1]
    if noise_scale is not None:
        noise = torch.zeros(batch, dtype=evals.dtype, device=evals.device) + noise_scale
        top = torch.maximum(top, noise.reshape(-1, 1))
    keep = (evals > rtol * (K1 + 1) * top) & (evals > 0)
    fi = _fi_on_range(columns @ evecs, keep, frame.take(owner))
    return _block_fi(fi, frame.best[owner], keep.sum(-1), batch)


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
    batch, frame, owner = _broadcast(gram.shape[:-2], probs, c)
    gram = gram.expand(*batch, K - 1, K - 1).reshape(-1, K - 1, K - 1)
    noise = torch.zeros(batch, dtype=gram.dtype, device=gram.device)
    if noise_scale is not None:
        noise = noise + noise_scale.to(gram.dtype)
    noise = noise.reshape(-1)

    best = frame.best[owner]
    trace = torch.maximum(gram.diagonal(dim1=-2, dim2=-1).sum(-1), noise)
    eye = torch.eye(K - 1, dtype=gram.dtype, device=gram.device)
    _, info = torch.linalg.cholesky_ex(gram - (rtol * K * trace)[:, None, None] * eye)
    full = (info == 0) & (trace > 0)
    fi = torch.where(full, best, 0.0)
    rank = torch.where(full, K - 1, 0)
    rest = (~full).nonzero().squeeze(-1)
    if len(rest):
        fi[rest], rank[rest] = _fi_rank_deficient(
            gram[rest], frame.take(owner[rest]), rtol, noise[rest]
        )
    return _block_fi(fi, best, rank, batch)


def fi_from_gram(gram: Tensor, probs: Tensor, c: Tensor, rtol: float | None = None) -> BlockFI:
    """FI of a perturbation family from its K × K Gram S = J Jᵀ (docs/method.md, "Numerics").

    Batched over any leading dimensions (samples, blocks): ``gram`` is ``(..., K, K)``, ``probs``
    and ``c`` are ``(..., K)`` and broadcast against it.

    Args:
        gram: S_ij = ⟨∂z_i/∂ω, ∂z_j/∂ω⟩, symmetric positive semi-definite.
        probs: p = softmax(z); must sum to 1.
        c: ∂f/∂z; for f = log p_y use :func:`log_prob_gradient` (e_y − p). Only its component
            orthogonal to the all-ones vector matters (every function of p has c ⟂ 1).
        rtol: relative eigenvalue tolerance for the rank decision; default from
            :func:`default_rtol` for ``gram``'s dtype.

    Returns:
        :class:`BlockFI`; its ``effective_rank`` is the rank of G = Jᵀ H J.

    Example:
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
    """FI of a one-parameter family (m = 1), closed form 2 of docs/method.md: (cᵀu)² / (uᵀHu).

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
    batch, frame, owner = _broadcast(u.shape[:-1], probs.to(torch.float64), c.to(torch.float64))
    u = u.to(torch.float64).expand(*batch, K).reshape(-1, K)
    here = frame.take(owner)
    r = here.r.unsqueeze(-1)
    delta = _drop_reference((u - u.gather(-1, r)).unsqueeze(-1), here.r, K).squeeze(-1)
    mean = (here.q * delta).sum(-1)
    curvature = ((here.q * delta.square()).sum(-1) - mean.square()).clamp_min(0.0)
    positive = curvature > 0
    slope = (here.c_ref * delta).sum(-1)
    fi = torch.where(positive, slope.square() / curvature.where(positive, 1.0), 0.0)
    return _block_fi(fi, here.best, positive.long(), batch)


@dataclass(frozen=True)
class MetricFrame:
    """The metric G = Jᵀ H J and the gradient ∇ log p_y = Jᵀ c of any family, per sample.

    Both depend on a family only through its logit changes u = J v. In contrast coordinates
    (u = Q x, the engine's native form, Q = :func:`contrast_basis`) the metric is
    uᵀ H u = ‖W x‖² and the gradient cᵀ u = gᵀ x, where W and g are built relative to the most
    probable class r (as :class:`_Frame`): no entry of H = diag(p) − p pᵀ is formed by
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
    frame = _frame(probs.to(torch.float64), c.to(torch.float64))
    Q = contrast_basis(K, torch.float64, probs.device)
    B = frame.r.shape[0]
    span = Q.expand(B, K, K - 1)
    r = frame.r.reshape(-1, 1, 1).expand(-1, 1, K - 1)
    delta = _drop_reference(span - span.gather(-2, r), frame.r, K)  # R Q, (B, K', K')
    whitened = frame.a.unsqueeze(-1) * (
        delta - frame.alpha.unsqueeze(-1) * (frame.q.unsqueeze(-2) @ delta)
    )
    gradient = (frame.c_ref.unsqueeze(-2) @ delta).squeeze(-2)
    return MetricFrame(whitened, gradient)
