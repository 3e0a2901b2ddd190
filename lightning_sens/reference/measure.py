"""The brute-force reference's building blocks: FI of one Jacobian, Jacobians by autograd.

See :mod:`lightning_sens.reference` for the notation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.fi import BlockFI

__all__ = [
    "ForwardFn",
    "Inputs",
    "Target",
    "authors_recipe_fi",
    "batch_of",
    "block",
    "contrasts",
    "exact_mode",
    "fi_from_jacobian",
    "fi_max",
    "grad_log_py",
    "jacobian",
    "logits_one",
    "metric_diagonal",
    "sample",
    "targets",
]

Target = Tensor | Literal["pred"]
Inputs = Tensor | Mapping[str, Any]
ForwardFn = Callable[[nn.Module, Any], Any]


@contextmanager
def exact_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on (even under inference mode), no fused attention fast path,
    no notices about vmap's per-sample fallback; restores every ``training`` flag."""
    flags = {module: module.training for module in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            torch.backends.mha.set_fastpath_enabled(False)
            model.eval()
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in flags.items():
            module.training = training


def batch_of(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0)


def sample(inputs: Inputs, b: int) -> Inputs:
    """A copy of sample ``b`` of a batch, keeping a batch dimension of 1 (a copy, so that tensors
    made under inference mode can enter autograd)."""
    if isinstance(inputs, Tensor):
        return inputs[b : b + 1].clone()
    B = batch_of(inputs)
    return {
        k: v[b : b + 1].clone() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v
        for k, v in inputs.items()
    }


def jacobian(fn: Callable[[Any], Tensor], at: Any) -> Any:
    """∂fn/∂at at ``at`` (a tensor or a dict of tensors), one output entry at a time.

    Plain autograd, one backward pass per output: slow and obviously correct, and it works
    where torch.func's transforms do not (packed sequences, fused kernels).

    Returns:
        ``(*out, *at)`` per tensor (the same structure as ``at``).
    """
    leaves = (
        {k: v.detach().requires_grad_(True) for k, v in at.items()}
        if isinstance(at, dict)
        else at.detach().requires_grad_(True)
    )
    out = fn(leaves)
    inputs = list(leaves.values()) if isinstance(leaves, dict) else [leaves]
    rows = []
    flat = out.reshape(-1)
    for i in range(flat.numel()):
        found = torch.autograd.grad(flat[i], inputs, retain_graph=True, allow_unused=True)
        rows.append(
            [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found, strict=True)]
        )
    stacked = [
        torch.stack([r[j] for r in rows]).reshape(*out.shape, *inputs[j].shape)
        for j in range(len(inputs))
    ]
    if isinstance(leaves, dict):
        return dict(zip(leaves, stacked, strict=True))
    return stacked[0]


def copy_inputs(x: Inputs) -> Inputs:
    if isinstance(x, Tensor):
        return x.clone()
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in x.items()}


def logits_one(forward: Callable[[Inputs], Tensor], x: Inputs) -> Tensor:
    """Logits ``z`` (K,) of one sample ``x`` (a batch of one); validates the (1, K) shape.

    The forward gets a copy of ``x``, so that a model that modifies its input in place sees the
    same input every time."""
    logits = forward(copy_inputs(x))
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
        raise ValueError(
            f"forward_fn must return logits of shape (1, K) with K >= 2 for one sample (or one "
            f"binary logit, (1,) or (1, 1)), got {tuple(logits.shape)}"
        )
    return logits[0]


def targets(target: Target, logits: Tensor) -> Tensor:
    """Labels (B,) int64: the given ones, or the argmax of ``logits`` (B, K) for ``"pred"``.

    Float or bool labels are the 0/1 targets of a binary classifier, class 0 and class 1 of its
    two-class model ``(0, z)`` (docs/method.md, "Binary classifiers with one logit"); other
    float values are refused. A ``(B, 1)`` column counts as ``(B,)``.
    """
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"target must be a label tensor or 'pred', got {target!r}")
        return logits.argmax(dim=1)
    labels = torch.as_tensor(target, device=logits.device)
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise ValueError(
            f"target must hold one class index per sample, (B,) or (B, 1); got shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        values = sorted({float(v) for v in labels.tolist()} - {0.0, 1.0})
        if values:
            raise ValueError(
                f"target holds the float values {values[:10]}, but float labels are the 0/1 "
                "targets of a binary classifier and must be 0 or 1; pass integer class indices "
                "(target.long()) or hard targets ((target > 0.5).long())"
            )
    labels = labels.to(torch.int64)
    if labels.numel() != logits.shape[0]:
        raise ValueError(f"target has {labels.numel()} labels for {logits.shape[0]} samples")
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"target labels must lie in [0, {logits.shape[1]})")
    return labels


def fi_from_jacobian(
    jacobian: Tensor, probs: Tensor, c: Tensor, rtol: float = 1e-10, floor: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Exact influence of one perturbation block from its logit Jacobian (docs/method.md, "The
    measure").

    Args:
        jacobian: ``J = ∂z/∂ω`` at ``ω0``, shape (K, m).
        probs: ``p = softmax(z)``, shape (K,).
        c: ``∂f/∂z``, shape (K,); ``e_y − p`` for ``f = log p_y``. Only its part orthogonal to
            the all-ones vector matters (every function of p has ``c ⟂ 1``).
        rtol: the rank rule (docs/method.md, "Numerics"): with ``S = Qᵀ J Jᵀ Q`` the
            p-independent Gram in the contrast basis Q (a basis of the complement of the
            all-ones vector), the
            directions kept are the eigenvectors of S with ``λ > rtol · K · max(λ_max(S), floor)``.
        floor: a size below which the family counts as numerically null (see
            :func:`parameter_fi`); the uncentred size ``trace(J Jᵀ)/K`` is always a floor, since
            a Jacobian that moves all logits alike leaves only rounding noise in S.

    Returns:
        ``(fi, rank)``: ``FI = ∇fᵀ G⁺ ∇f`` with ``G = Jᵀ H J``, ``H = diag(p) − p pᵀ``,
        ``∇f = Jᵀ c``, over the kept directions (0-dim float64), and their number (0-dim int64).
        Computed as the squared projection of ``b = H^{+1/2} c`` onto ``H^{1/2} Q U_r``, with
        U_r the kept left singular vectors of ``QᵀJ``: the same number, without forming the
        m × m matrix G or squaring J's condition number. Both are 0 when ``m = 0`` or nothing
        is kept.
    """
    J = jacobian.detach().to(torch.float64)
    p = probs.detach().to(torch.float64)
    c64 = c.detach().to(torch.float64)
    zero_fi = torch.zeros((), dtype=torch.float64, device=J.device)
    zero_rank = torch.zeros((), dtype=torch.int64, device=J.device)
    if J.dim() != 2 or J.shape[0] != p.shape[0]:
        raise ValueError(f"jacobian must be (K, m) with K = {p.shape[0]}, got {tuple(J.shape)}")
    K = len(p)
    if J.shape[1] == 0:
        return zero_fi, zero_rank
    Q = contrasts(K, J.device)
    # S's eigenpairs from the SVD of QᵀJ: λ = σ², accurate without squaring J's condition
    U, sigma, _ = torch.linalg.svd(Q.T @ J, full_matrices=False)
    lam = sigma.square()
    top = max(float(lam.max()), float(J.square().sum()) / K, floor)
    keep = (lam > rtol * K * top) & (lam > 0)
    rank = keep.sum()
    if int(rank) == 0:
        return zero_fi, zero_rank
    H = torch.diag(p) - torch.outer(p, p)
    evals, V = torch.linalg.eigh(H)
    positive = evals > 64 * K * torch.finfo(torch.float64).eps * evals.max()
    root = (V[:, positive] * evals[positive].sqrt()) @ V[:, positive].T
    b = (V[:, positive] / evals[positive].sqrt()) @ (V[:, positive].T @ c64)
    basis, _ = torch.linalg.qr(root @ Q @ U[:, keep])
    fi = (basis.T @ b).square().sum()
    return fi, rank.to(torch.int64)


def contrasts(K: int, device: torch.device) -> Tensor:
    """An orthonormal basis (K, K − 1) of the complement of the all-ones vector."""
    ones = torch.ones(K, 1, dtype=torch.float64, device=device) / K**0.5
    eye = torch.eye(K, dtype=torch.float64, device=device)
    full, _ = torch.linalg.qr(torch.cat([ones, eye], 1))
    return full[:, 1:K]


def metric_diagonal(J: Tensor, p: Tensor) -> Tensor:
    """diag(Jᵀ H J) with H = diag(p) − p pᵀ, by definition: Σ_k p_k J_ki² − (Σ_k p_k J_ki)².

    Args:
        J: ``(K, m)`` float64 Jacobian of the logits; p: ``(K,)`` probabilities.
    """
    return (p[:, None] * J.square()).sum(0) - (p @ J).square()


def fi_max(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(p_y, (1 − p_y) / p_y)`` per sample: the probability of the class used and the
    largest FI of any family, which every family of full rank K − 1 reaches (docs/method.md,
    "Two facts you must know").

    ``1 − p_y`` is summed from the other classes' probabilities, not subtracted from 1, so that
    it keeps its digits for confident samples.

    Args:
        probs: ``(B, K)`` float64 probabilities; labels: ``(B,)`` int64 classes.
    """
    p_target = probs.gather(1, labels[:, None])[:, 0]
    others = probs.scatter(1, labels[:, None], 0.0).sum(1)
    return p_target, others / p_target


def block(fi: Tensor, rank: Tensor, most: Tensor) -> BlockFI:
    """A family's FI as the engine's :class:`~lightning_sens.core.fi.BlockFI`, with its
    relative FI ``fi / most`` (0 where ``most`` is 0); ``most`` ``(B,)`` is :func:`fi_max`'s
    largest FI, broadcast over the blocks of each sample."""
    most = most.reshape(-1, *([1] * (fi.dim() - 1)))
    positive = most > 0
    relative = torch.where(positive, fi / torch.where(positive, most, 1.0), 0.0)
    return BlockFI(fi, relative, rank)


def grad_log_py(p: Tensor, y: Tensor) -> Tensor:
    """``c = e_y − p``, the gradient of ``log p_y`` with respect to the logits, shape (K,)."""
    return torch.nn.functional.one_hot(y, p.shape[0]).to(p.dtype) - p


def authors_recipe_fi(
    prob_jacobian: Tensor, probs: Tensor, target: int | Tensor, eps: float = 1e-3
) -> Tensor:
    """The ε-regularised FI of the authors' public code, for reproduction only (docs/method.md,
    "The authors' recipe").

    Batched over any leading dimensions (blocks, samples).

    Args:
        prob_jacobian: ``J_p = ∂p/∂ω`` at ``ω0``, shape (..., K, m) (probabilities, not logits).
        probs: ``p``, shape (..., K).
        target: the class ``y`` (an int, or an integer tensor of the leading shape).
        eps: the regulariser ``ε`` and the ABSOLUTE singular-value cut-off.

    Returns:
        float64 ``Σ_{σ_i > ε} (u_iᵀ ∇f)² / σ_i²`` of the leading shape, where
        ``L = J_pᵀ diag(1 / (√p + ε))`` (m × K) has the thin SVD ``U Σ Vᵀ`` and
        ``∇f = J_p[y, :] / (p_y + ε)``. As ``ε → 0`` it tends to the exact FI; at ``ε = 1e-3``
        it differs markedly when ``p_y`` is small.
    """
    Jp = prob_jacobian.to(torch.float64)
    p = probs.to(torch.float64).expand(*Jp.shape[:-2], Jp.shape[-2])
    y = torch.as_tensor(target, device=Jp.device).expand(Jp.shape[:-2])
    L = Jp.transpose(-1, -2) / (p.sqrt() + eps).unsqueeze(-2)
    row = Jp.gather(-2, y[..., None, None].expand(*Jp.shape[:-2], 1, Jp.shape[-1])).squeeze(-2)
    grad_f = row / (p.gather(-1, y.unsqueeze(-1)) + eps)
    U, S, _ = torch.linalg.svd(L, full_matrices=False)
    keep = eps < S
    proj = (U.transpose(-1, -2) @ grad_f.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, proj.square() / S.where(keep, 1.0).square(), 0.0).sum(-1)
