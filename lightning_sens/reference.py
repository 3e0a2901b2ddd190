"""Slow, float64, brute-force reference for the influence measure of Shu & Zhu (AAAI 2019).

This module is a test oracle: it materialises full Jacobians with :mod:`torch.func`, builds the
metric ``G = Jᵀ H J`` explicitly and uses a Moore–Penrose pseudo-inverse. It favours obviously
correct code over speed; see ``/work/shared/METHOD.md`` (sections 1–7) for the math.

Notation (per sample, METHOD.md §1–3):

- ``z ∈ R^K``: logits, ``forward_fn(model, x.unsqueeze(0))[0]``; ``p = softmax(z)`` (float64).
- ``y``: target class, the true label or ``"pred"`` (the argmax of ``z``).
- ``c = e_y − p``: gradient of ``f = log p_y`` with respect to ``z``.
- ``H = diag(p) − p pᵀ``: Hessian of the cross-entropy with respect to ``z``.
- ``J = ∂z/∂ω`` (K × m) for a perturbation ``ω ∈ R^m`` at its unperturbed value ``ω0``.
- ``G = Jᵀ H J``, ``∇f = Jᵀ c``, ``FI = ∇fᵀ G⁺ ∇f`` (dimensionless), effective rank ``rank(G)``.

Only :mod:`torch` is imported.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

Target = Tensor | Literal["pred"]
ForwardFn = Callable[[nn.Module, Tensor], Tensor]

# Where "output channel c" lives, for channel scaling (anything else: not supported, None).
_CHANNEL_DIM_1: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)
_CHANNEL_DIM_1 += (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_DIM_1 += (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CHANNEL_DIM_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.Embedding)


def _default_forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


class _Forward(nn.Module):
    """Wraps ``forward_fn(model, x)`` so that :func:`functional_call` can substitute parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_fn(self.model, x)


@contextmanager
def _exact_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on (even under inference mode); restores every ``training`` flag."""
    flags = {module: module.training for module in model.modules()}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in flags.items():
            module.training = training


def _logits_one(forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Logits ``z`` (K,) of one sample ``x`` (no batch dim); validates the (1, K) shape."""
    logits = forward(x.unsqueeze(0))
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
        raise ValueError(
            f"forward_fn must return logits of shape (1, K) with K >= 2 for one sample, "
            f"got {tuple(logits.shape)}"
        )
    return logits[0]


def _targets(target: Target, logits: Tensor) -> Tensor:
    """Labels (B,) int64: the given ones, or the argmax of ``logits`` (B, K) for ``"pred"``."""
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"target must be a label tensor or 'pred', got {target!r}")
        return logits.argmax(dim=1)
    labels = torch.as_tensor(target, device=logits.device).to(torch.int64).reshape(-1)
    if labels.numel() != logits.shape[0]:
        raise ValueError(f"target has {labels.numel()} labels for {logits.shape[0]} samples")
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"target labels must lie in [0, {logits.shape[1]})")
    return labels


def fi_from_jacobian(
    jacobian: Tensor, probs: Tensor, c: Tensor, rtol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Exact influence of one perturbation block from its logit Jacobian (METHOD.md §2–3).

    Args:
        jacobian: ``J = ∂z/∂ω`` at ``ω0``, shape (K, m).
        probs: ``p = softmax(z)``, shape (K,).
        c: ``∂f/∂z``, shape (K,); ``e_y − p`` for ``f = log p_y``.
        rtol: relative tolerance of the pseudo-inverse and of the rank: eigenvalues of ``G``
            below ``max(rtol · λ_max(G), atol)`` count as zero, where the rounding floor
            ``atol = 64 K ε_float64 ‖H‖₂ ‖J‖₂²`` only removes noise (e.g. ``J = 1``, a shift of
            all logits, gives ``G ≈ 1e-17`` instead of 0).

    Returns:
        ``(fi, rank)``: ``FI = ∇fᵀ G⁺ ∇f`` with ``G = Jᵀ H J``, ``H = diag(p) − p pᵀ``,
        ``∇f = Jᵀ c`` (0-dim float64), and ``rank(G)`` (0-dim int64). Both are 0 when ``m = 0``
        or ``G = 0``.
    """
    J = jacobian.detach().to(torch.float64)
    p = probs.detach().to(torch.float64)
    c64 = c.detach().to(torch.float64)
    zero_fi = torch.zeros((), dtype=torch.float64, device=J.device)
    zero_rank = torch.zeros((), dtype=torch.int64, device=J.device)
    if J.dim() != 2 or J.shape[0] != p.shape[0]:
        raise ValueError(f"jacobian must be (K, m) with K = {p.shape[0]}, got {tuple(J.shape)}")
    if J.shape[1] == 0:
        return zero_fi, zero_rank
    H = torch.diag(p) - torch.outer(p, p)
    G = J.T @ H @ J
    G = (G + G.T) / 2  # remove rounding asymmetry before the Hermitian routines
    if not bool(G.any()):
        return zero_fi, zero_rank
    grad_f = J.T @ c64
    scale = torch.linalg.matrix_norm(H, ord=2) * torch.linalg.matrix_norm(J, ord=2) ** 2
    atol = float(64 * len(p) * torch.finfo(torch.float64).eps * scale)
    fi = grad_f @ torch.linalg.pinv(G, hermitian=True, rtol=rtol, atol=atol) @ grad_f
    rank = torch.linalg.matrix_rank(G, hermitian=True, rtol=rtol, atol=atol)
    return fi, rank.to(torch.int64)


def input_fi(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    windows: tuple[int, ...] = (1, 3, 5, 7),
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
) -> dict[str, Any]:
    """Influence of additive input perturbations ``x + ω``, ``ω0 = 0`` (Setups 1, 3, 4).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape).
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``.
        windows: odd window sizes ``2s + 1`` for the per-channel maps (4-D inputs only).
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``; default ``model(x)``.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.

    Returns:
        A dict with (all on the device of ``inputs``):

        - ``'fi'`` (B,) float64, ``'rank'`` (B,) int64: the whole input as one block
        (``J_x`` of shape (K, prod(shape))).
        - ``'relative_fi'`` (B,): ``fi / ((1 − p_y) / p_y)`` in [0, 1]; 0 where ``p_y = 1``.
        - ``'p_target'`` (B,) float64: ``p_y``; ``'target'`` (B,) int64: the labels used.
        - For 4-D inputs (B, C, H, W) and non-empty ``windows``: ``'maps'`` ``{w: (B, C, H, W)}``
        and ``'map_ranks'`` ``{w: (B, C, H, W) int64}``, the block at (b, c, h, v) being channel
        c, rows h−s..h+s and columns v−s..v+s clipped to the image; ``'pixel_map'`` (B, H, W)
        and ``'pixel_map_rank'`` (B, H, W): the block of all C channels of pixel (h, v).
    """
    for w in windows:
        if w < 1 or w % 2 != 1:
            raise ValueError(f"window sizes must be odd and positive, got {w}")
    forward_fn = forward_fn or _default_forward
    with _exact_mode(model):
        x_all = inputs.clone()

        def logits_of(x: Tensor) -> Tensor:
            return _logits_one(lambda xb: forward_fn(model, xb), x)

        logits = torch.stack([logits_of(x).detach() for x in x_all]).to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = _targets(target, logits)
        with_maps = x_all.dim() == 4 and len(windows) > 0
        per_sample: dict[str, list[Tensor]] = {}
        for b, x in enumerate(x_all):
            p, c = probs[b], _grad_log_py(probs[b], labels[b])
            J = jacrev(logits_of)(x).detach().to(torch.float64)  # (K, *shape)
            found = {"": fi_from_jacobian(J.reshape(J.shape[0], -1), p, c, rtol)}
            if with_maps:
                for w in windows:
                    found[f"map{w}"] = _window_map(J, p, c, w // 2, True, rtol)
                found["pixel"] = _window_map(J, p, c, 0, False, rtol)
            for key, (fi, rank) in found.items():
                per_sample.setdefault(f"fi{key}", []).append(fi)
                per_sample.setdefault(f"rank{key}", []).append(rank)
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}

    p_target = probs.gather(1, labels[:, None])[:, 0]
    max_fi = (1.0 - p_target) / p_target  # the full-rank closed form, METHOD.md §5.1
    positive = max_fi > 0
    relative = torch.where(positive, stacked["fi"] / torch.where(positive, max_fi, 1.0), 0.0)
    result: dict[str, Any] = {
        "fi": stacked["fi"],
        "rank": stacked["rank"],
        "relative_fi": relative,
        "p_target": p_target,
        "target": labels,
    }
    if with_maps:
        result["maps"] = {w: stacked[f"fimap{w}"] for w in windows}
        result["map_ranks"] = {w: stacked[f"rankmap{w}"] for w in windows}
        result["pixel_map"] = stacked["fipixel"]
        result["pixel_map_rank"] = stacked["rankpixel"]
    return result


def _grad_log_py(p: Tensor, y: Tensor) -> Tensor:
    """``c = e_y − p``, the gradient of ``log p_y`` with respect to the logits, shape (K,)."""
    return torch.nn.functional.one_hot(y, p.shape[0]).to(p.dtype) - p


def _window_map(
    J: Tensor, p: Tensor, c: Tensor, s: int, per_channel: bool, rtol: float
) -> tuple[Tensor, Tensor]:
    """FI and rank of every window of half-width ``s`` of an input Jacobian ``J`` (K, C, H, W).

    The block at (c, h, v) (``per_channel``; result (C, H, W)) or at (h, v) (all channels; result
    (H, W)) is rows h−s..h+s and columns v−s..v+s, clipped to the image.
    """
    K, C, Hh, W = J.shape
    shape = (C, Hh, W) if per_channel else (Hh, W)
    fi = torch.zeros(shape, dtype=torch.float64, device=J.device)
    rank = torch.zeros(shape, dtype=torch.int64, device=J.device)
    for idx in itertools.product(*(range(n) for n in shape)):
        h, v = idx[-2:]
        chans = slice(idx[0], idx[0] + 1) if per_channel else slice(None)
        # slicing clips the end at the border; the start is clipped by max(·, 0)
        block = J[:, chans, max(h - s, 0) : h + s + 1, max(v - s, 0) : v + s + 1]
        fi[idx], rank[idx] = fi_from_jacobian(block.reshape(K, -1), p, c, rtol)
    return fi, rank


def _block_names(model: nn.Module, layer: str) -> list[str]:
    """Full names of the direct, trainable parameters of module ``layer`` (its block)."""
    module = model.get_submodule(layer)
    prefix = f"{layer}." if layer else ""
    return [prefix + n for n, t in module.named_parameters(recurse=False) if t.requires_grad]


def parameter_fi(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    layers: list[str] | None = None,
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
) -> dict[str, dict[str, Tensor | None]]:
    """Influence of parameter perturbations, per layer and jointly (Setup 2 and scalings).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape).
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``.
        layers: module names as in ``model.named_modules()``; ``None`` selects every module that
            directly owns (``recurse=False``) a parameter with ``requires_grad=True``.
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``; default ``model(x)``.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.

    Returns:
        ``{layer: entries, ..., '__all__': {'fi', 'rank'}}`` with, per layer (all (B,)):

        - ``'fi'``, ``'rank'``: additive ``θ_l + ω`` on the layer's block (its direct trainable
        parameters, weight and bias together), ``ω0 = 0``.
        - ``'scale_fi'``: layer scaling ``θ_l → ω θ_l`` with one scalar, ``ω0 = 1`` (m = 1).
        - ``'channel_scale_fi'``, ``'channel_scale_rank'``: output channel c multiplied by
        ``ω_c``, ``ω0 = 1``, all channels as one block (dim 1 for conv/batch/group/instance
        norms, last dim for Linear/LayerNorm/Embedding; ``None`` for other module types).

        ``'__all__'`` is the block of all listed layers' parameters together.
    """
    forward_fn = forward_fn or _default_forward
    if layers is None:
        layers = [
            n
            for n, m in model.named_modules()
            if any(t.requires_grad for t in m.parameters(recurse=False))
        ]
    wrapper = _Forward(model, forward_fn)
    params = {n: t.detach() for n, t in model.named_parameters(remove_duplicate=False)}
    blocks = {layer: _block_names(model, layer) for layer in layers}
    blocks["__all__"] = list(dict.fromkeys(n for layer in layers for n in blocks[layer]))

    def call(substitute: dict[str, Tensor], x: Tensor) -> Tensor:
        named = {f"model.{n}": t for n, t in substitute.items()}
        return _logits_one(lambda xb: functional_call(wrapper, named, (xb,)), x)

    def call_scaled(omega: Tensor, names: list[str], x: Tensor) -> Tensor:
        return call({n: omega * params[n] for n in names}, x)

    found: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    with _exact_mode(model):
        x_all = inputs.clone()
        logits = torch.stack([call({}, x).detach() for x in x_all]).to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = _targets(target, logits)
        for b, x in enumerate(x_all):
            p, c = probs[b], _grad_log_py(probs[b], labels[b])
            for layer, names in blocks.items():
                # additive θ_l + ω: Jacobian w.r.t. the block's parameters, flattened, concatenated
                if names:
                    jac = jacrev(call)({n: params[n] for n in names}, x)
                    J = torch.cat([jac[n].reshape(len(p), -1) for n in names], 1)
                else:
                    J = p.new_zeros(len(p), 0)
                fi, rank = fi_from_jacobian(J, p, c, rtol)
                found[layer, "fi"].append(fi)
                found[layer, "rank"].append(rank)
                if layer == "__all__":
                    continue
                # layer scaling θ_l → ω θ_l at ω0 = 1: u = ∂z/∂ω, shape (K, 1)
                one = torch.ones((), dtype=probs.dtype if not names else params[names[0]].dtype)
                u = jacrev(call_scaled)(one.to(p.device), names, x).reshape(-1, 1)
                found[layer, "scale_fi"].append(fi_from_jacobian(u, p, c, rtol)[0])
                J_ch = _channel_scale_jacobian(wrapper, call, layer, x)  # (K, C) or None
                if J_ch is not None:
                    fi, rank = fi_from_jacobian(J_ch, p, c, rtol)
                    found[layer, "channel_scale_fi"].append(fi)
                    found[layer, "channel_scale_rank"].append(rank)

    result: dict[str, dict[str, Tensor | None]] = {}
    keys = ("fi", "rank", "scale_fi", "channel_scale_fi", "channel_scale_rank")
    for layer in layers:
        result[layer] = {k: torch.stack(found[layer, k]) if found[layer, k] else None for k in keys}
    result["__all__"] = {k: torch.stack(found["__all__", k]) for k in ("fi", "rank")}
    return result


def _channel_scale_jacobian(
    wrapper: _Forward,
    call: Callable[[dict[str, Tensor], Tensor], Tensor],
    layer: str,
    x: Tensor,
) -> Tensor | None:
    """``∂z/∂ω`` (K, C) of ``output[channel c] *= ω_c`` on module ``layer`` at ``ω0 = 1``.

    Returns ``None`` for module types without a known channel dimension.
    """
    module = wrapper.model.get_submodule(layer)
    if not isinstance(module, _CHANNEL_DIM_1 + _CHANNEL_DIM_LAST):
        return None
    dim = 1 if isinstance(module, _CHANNEL_DIM_1) else -1
    omega_now: list[Tensor] = []  # the ω being traced; empty during the probe pass
    seen: list[Tensor] = []  # the probe pass records the unperturbed output

    def hook(_m: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if not omega_now:
            seen.append(output.detach())
            return None
        shape = [1] * output.dim()
        shape[dim] = output.shape[dim]
        return output * omega_now[0].reshape(shape)

    handle = module.register_forward_hook(hook)
    try:
        call({}, x)
        if not seen:
            raise ValueError(f"module {layer!r} is not called by the forward")

        def scaled(omega: Tensor) -> Tensor:
            omega_now[:] = [omega]
            return call({}, x)

        omega0 = seen[0].new_ones(seen[0].shape[dim])
        return jacrev(scaled)(omega0).detach().to(torch.float64)
    finally:
        handle.remove()


def authors_recipe_fi(
    prob_jacobian: Tensor, probs: Tensor, target: int | Tensor, eps: float = 1e-3
) -> Tensor:
    """The ε-regularised FI of the authors' public code (METHOD.md §7), for reproduction only.

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
