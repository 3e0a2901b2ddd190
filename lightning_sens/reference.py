"""Slow, float64, brute-force reference for the influence measure of Shu & Zhu (AAAI 2019).

This module is a test oracle: it materialises full Jacobians with plain autograd, one sample and
one logit at a time (parameters substituted with ``torch.func.functional_call``), and computes FI
from them directly, in float64, with an SVD. It favours obviously correct code over speed;
docs/method.md states the math.

Notation (per sample, docs/method.md, "The measure"):

- ``z ∈ R^K``: logits of one sample, ``forward_fn(model, inputs of that sample)``;
  ``p = softmax(z)`` (float64).
- ``y``: target class, the true label or ``"pred"`` (the argmax of ``z``).
- ``c = e_y − p``: gradient of ``f = log p_y`` with respect to ``z``.
- ``H = diag(p) − p pᵀ``: Hessian of the cross-entropy with respect to ``z``.
- ``J = ∂z/∂ω`` (K × m) for a perturbation ``ω ∈ R^m`` at its unperturbed value ``ω0``.
- ``G = Jᵀ H J``, ``∇f = Jᵀ c``, ``FI = ∇fᵀ G⁺ ∇f`` (dimensionless), effective rank ``rank(G)``.

Inputs are a tensor or a dict of tensors (passed as keyword arguments); outputs may carry the
logits in a ``logits`` attribute or key. A parameter shared by several modules (tied weights) is
one parameter: perturbing it perturbs every use. Besides :mod:`torch`, it imports from the core
only definitions (channel axes, how inputs reach the model), never its computations.
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.inputs import ForwardModule, default_forward
from lightning_sens.core.routes import channel_axes

Target = Tensor | Literal["pred"]
Inputs = Tensor | Mapping[str, Any]
ForwardFn = Callable[[nn.Module, Any], Any]


@contextmanager
def _exact_mode(model: nn.Module) -> Iterator[None]:
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


def _batch(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0)


def _sample(inputs: Inputs, b: int) -> Inputs:
    """A copy of sample ``b`` of a batch, keeping a batch dimension of 1 (a copy, so that tensors
    made under inference mode can enter autograd)."""
    if isinstance(inputs, Tensor):
        return inputs[b : b + 1].clone()
    B = _batch(inputs)
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


def _copy(x: Inputs) -> Inputs:
    if isinstance(x, Tensor):
        return x.clone()
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in x.items()}


def _logits_one(forward: Callable[[Inputs], Tensor], x: Inputs) -> Tensor:
    """Logits ``z`` (K,) of one sample ``x`` (a batch of one); validates the (1, K) shape.

    The forward gets a copy of ``x``, so that a model that modifies its input in place sees the
    same input every time."""
    logits = forward(_copy(x))
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
    jacobian: Tensor, probs: Tensor, c: Tensor, rtol: float = 1e-10, floor: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Exact influence of one perturbation block from its logit Jacobian (docs/method.md).

    Args:
        jacobian: ``J = ∂z/∂ω`` at ``ω0``, shape (K, m).
        probs: ``p = softmax(z)``, shape (K,).
        c: ``∂f/∂z``, shape (K,); ``e_y − p`` for ``f = log p_y``. Only its part orthogonal to
            the all-ones vector matters (every function of p has ``c ⟂ 1``).
        rtol: the rank rule of docs/method.md: with ``S = Qᵀ J Jᵀ Q`` the p-independent Gram in
            the contrast basis Q (a basis of the complement of the all-ones vector), the
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
    Q = _contrasts(K, J.device)
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


def _contrasts(K: int, device: torch.device) -> Tensor:
    """An orthonormal basis (K, K − 1) of the complement of the all-ones vector."""
    ones = torch.ones(K, 1, dtype=torch.float64, device=device) / K**0.5
    eye = torch.eye(K, dtype=torch.float64, device=device)
    full, _ = torch.linalg.qr(torch.cat([ones, eye], 1))
    return full[:, 1:K]


def _perturbed(
    inputs: Inputs, input_key: str | None, input_module: str | None
) -> tuple[Callable[[Inputs, Tensor], Inputs], Callable[[Inputs], Tensor]]:
    """How ``ω`` enters one sample's forward, and the shape of ``ω`` for a sample.

    Returns ``(apply, like)``: ``apply(x, ω)`` gives the inputs to run (for a module output,
    ``ω`` is added by the forward hook of :func:`_perturbing` instead); ``like(x)`` is a tensor
    shaped as ``ω`` for input perturbations.
    """
    if input_module is not None:
        return (lambda x, omega: x), (lambda x: torch.zeros(0))
    if isinstance(inputs, Tensor):
        return (lambda x, omega: x + omega), (lambda x: torch.zeros_like(x))
    if input_key is None:
        raise ValueError("dict inputs need input_key (a floating tensor) or input_module")
    key = input_key
    return (
        lambda x, omega: {**x, key: x[key] + omega},
        lambda x: torch.zeros_like(x[key]),
    )


@contextmanager
def _perturbing(module: nn.Module | None, omega_now: list[Tensor]) -> Iterator[list[Tensor]]:
    """While open, ``module``'s output gets ``omega_now[0]`` added; records unperturbed outputs."""
    seen: list[Tensor] = []
    if module is None:
        yield seen
        return

    def hook(_m: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if not omega_now:
            seen.append(output.detach())
            return None
        return output + omega_now[0]

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def input_fi(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    windows: tuple[int, ...] = (1, 3, 5, 7),
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
    input_key: str | None = None,
    input_module: str | None = None,
) -> dict[str, Any]:
    """Influence of additive input perturbations ``x + ω``, ``ω0 = 0`` (Setups 1, 3, 4).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape), or a dict of tensors passed as keyword arguments.
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``.
        windows: odd window sizes ``2s + 1`` for the per-channel maps (images, and token
            sequences perturbed at ``input_module``).
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``; default ``model(x)`` (or
            ``model(**x)`` for a dict); an output's ``logits`` attribute or key is used.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.
        input_key: for dict inputs, the floating tensor to perturb.
        input_module: perturb this module's output instead (``ω`` is added to it; token models
            are perturbed at their input embedding's output ``(1, T, d)`` per sample).

    Returns:
        A dict with (all on the device of the inputs):

        - ``'fi'`` (B,) float64, ``'rank'`` (B,) int64: the whole input as one block.
        - ``'relative_fi'`` (B,): ``fi / ((1 − p_y) / p_y)`` in [0, 1]; 0 where ``p_y = 1``.
        - ``'p_target'`` (B,) float64: ``p_y``; ``'target'`` (B,) int64: the labels used.
        - For images (B, C, H, W) and non-empty ``windows``: ``'maps'`` ``{w: (B, C, H, W)}``
        and ``'map_ranks'``, the block at (b, c, h, v) being channel c, rows h−s..h+s and
        columns v−s..v+s clipped to the image; ``'position_map'`` (B, H, W) and
        ``'position_map_rank'``: the block of all C channels of pixel (h, v).
        - For a module output (1, T, d) per sample and non-empty ``windows``: ``'maps'``
        ``{w: (B, T, d)}`` (coordinate j of tokens t−s..t+s) and ``'position_map'`` (B, T)
        (every coordinate of token t).
    """
    for w in windows:
        if w < 1 or w % 2 != 1:
            raise ValueError(f"window sizes must be odd and positive, got {w}")
    forward_fn = forward_fn or default_forward
    wrapper = ForwardModule(model, forward_fn)
    apply, start = _perturbed(inputs, input_key, input_module)
    hooked = model.get_submodule(input_module) if input_module is not None else None
    omega_now: list[Tensor] = []
    with _exact_mode(model), _perturbing(hooked, omega_now) as seen:
        B = _batch(inputs)
        samples = [_sample(inputs, b) for b in range(B)]

        def logits_of_omega(x: Inputs, omega: Tensor) -> Tensor:
            if hooked is not None:
                omega_now[:] = [omega]
            try:
                return _logits_one(wrapper, apply(x, omega))
            finally:
                omega_now.clear()

        logits = torch.stack([_logits_one(wrapper, x).detach() for x in samples])
        logits = logits.to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = _targets(target, logits)
        per_sample: dict[str, list[Tensor]] = {}
        for b, x in enumerate(samples):
            p, c = probs[b], _grad_log_py(probs[b], labels[b])
            omega0 = start(x) if hooked is None else seen[b]
            omega0 = torch.zeros_like(omega0)
            J = jacobian(partial(logits_of_omega, x), omega0).to(torch.float64)
            J = J.reshape(J.shape[0], *omega0.shape[1:])  # (K, *shape of one sample)
            found = {"": fi_from_jacobian(J.reshape(J.shape[0], -1), p, c, rtol)}
            maps_shape = _maps_layout(J, hooked is not None)
            if maps_shape is not None and windows:
                for w in windows:
                    found[f"map{w}"] = _window_map(maps_shape, p, c, w // 2, True, rtol)
                found["position"] = _window_map(maps_shape, p, c, 0, False, rtol)
            for key, (fi, rank) in found.items():
                per_sample.setdefault(f"fi{key}", []).append(fi)
                per_sample.setdefault(f"rank{key}", []).append(rank)
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}

    p_target = probs.gather(1, labels[:, None])[:, 0]
    max_fi = (1.0 - p_target) / p_target  # the full-rank closed form, docs/method.md
    positive = max_fi > 0
    relative = torch.where(positive, stacked["fi"] / torch.where(positive, max_fi, 1.0), 0.0)
    result: dict[str, Any] = {
        "fi": stacked["fi"],
        "rank": stacked["rank"],
        "relative_fi": relative,
        "p_target": p_target,
        "target": labels,
    }
    if "fiposition" in stacked:
        tokens = hooked is not None

        def back(t: Tensor) -> Tensor:  # (B, d, 1, T) -> (B, T, d); (B, 1, T) -> (B, T)
            return (t[:, :, 0].transpose(1, 2) if t.dim() == 4 else t[:, 0]) if tokens else t

        result["maps"] = {w: back(stacked[f"fimap{w}"]) for w in windows}
        result["map_ranks"] = {w: back(stacked[f"rankmap{w}"]) for w in windows}
        result["position_map"] = back(stacked["fiposition"])
        result["position_map_rank"] = back(stacked["rankposition"])
    return result


def _maps_layout(J: Tensor, from_module: bool) -> Tensor | None:
    """``J`` as (K, C, H, W) for window maps: images as they are, a token sequence (K, T, d) as
    (K, d, 1, T); None for other shapes."""
    if not from_module and J.dim() == 4:
        return J
    if from_module and J.dim() == 3:
        return J.transpose(1, 2).unsqueeze(2)
    return None


def _grad_log_py(p: Tensor, y: Tensor) -> Tensor:
    """``c = e_y − p``, the gradient of ``log p_y`` with respect to the logits, shape (K,)."""
    return torch.nn.functional.one_hot(y, p.shape[0]).to(p.dtype) - p


def _window_map(
    J: Tensor, p: Tensor, c: Tensor, s: int, per_channel: bool, rtol: float
) -> tuple[Tensor, Tensor]:
    """FI and rank of every window of half-width ``s`` of an input Jacobian ``J`` (K, C, H, W).

    The block at (c, h, v) (``per_channel``; result (C, H, W)) or at (h, v) (all channels; result
    (H, W)) is rows h−s..h+s and columns v−s..v+s, clipped to the input. A sequence has H = 1,
    so its windows span tokens only.
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


def _distinct(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with every parameter counted once (tied weights have several names)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    out = []
    for name in names:
        if id(tensors[name]) not in seen:
            seen.add(id(tensors[name]))
            out.append(name)
    return out


def _block_names(model: nn.Module, layer: str) -> list[str]:
    """Full names of the direct, trainable parameters of module ``layer`` (its block)."""
    module = model.get_submodule(layer)
    prefix = f"{layer}." if layer else ""
    own = [prefix + n for n, t in module.named_parameters(recurse=False) if t.requires_grad]
    return _distinct(model, own)


def parameter_fi(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    layers: list[str] | None = None,
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
) -> dict[str, dict[str, Tensor | None]]:
    """Influence of parameter perturbations, per layer and jointly (Setup 2 and scalings).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape), or a dict of tensors passed as keyword arguments.
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``.
        layers: module names as in ``model.named_modules()``; ``None`` selects every module that
            directly owns (``recurse=False``) a parameter with ``requires_grad=True``.
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``; default as in :func:`input_fi`.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.

    Returns:
        ``{layer: entries, ..., '__all__': {'fi', 'rank'}}`` with, per layer (all (B,)):

        - ``'fi'``, ``'rank'``: additive ``θ_l + ω`` on the layer's block (its direct trainable
        parameters, weight and bias together, each used wherever the forward uses it),
        ``ω0 = 0``.
        - ``'scale_fi'``: layer scaling ``θ_l → ω θ_l`` with one scalar, ``ω0 = 1`` (m = 1).
        - ``'channel_scale_fi'``, ``'channel_scale_rank'``: slice c of every trainable parameter
        along its output-channel axis (:func:`lightning_sens.core.routes.channel_axes`)
        multiplied by ``ω_c``, ``ω0 = 1``, all channels as one block (``None`` for layers
        without channels).

        ``'__all__'`` is the block of all listed layers' parameters together, each parameter
        counted once.
    """
    forward_fn = forward_fn or default_forward
    if layers is None:
        layers = [
            n
            for n, m in model.named_modules()
            if any(t.requires_grad for t in m.parameters(recurse=False))
        ]
    wrapper = ForwardModule(model, forward_fn)
    params = {n: t.detach() for n, t in model.named_parameters(remove_duplicate=False)}
    blocks = {layer: _block_names(model, layer) for layer in layers}
    blocks["__all__"] = _distinct(model, [n for layer in layers for n in blocks[layer]])

    def call(substitute: dict[str, Tensor], x: Inputs) -> Tensor:
        named = {f"model.{n}": t for n, t in substitute.items()}
        return _logits_one(lambda xb: functional_call(wrapper, named, (xb,)), x)

    def call_scaled(omega: Tensor, names: list[str], x: Inputs) -> Tensor:
        return call({n: omega * params[n] for n in names}, x)

    found: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    with _exact_mode(model):
        samples = [_sample(inputs, b) for b in range(_batch(inputs))]
        logits = torch.stack([call({}, x).detach() for x in samples]).to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = _targets(target, logits)
        for b, x in enumerate(samples):
            p, c = probs[b], _grad_log_py(probs[b], labels[b])
            for layer, names in blocks.items():
                # additive θ_l + ω: Jacobian w.r.t. the block's parameters, flattened, concatenated
                if names:
                    jac = jacobian(partial(call, x=x), {n: params[n] for n in names})
                    J = torch.cat([jac[n].reshape(len(p), -1) for n in names], 1)
                else:
                    J = p.new_zeros(len(p), 0)
                fi, rank = fi_from_jacobian(J, p, c, rtol)
                found[layer, "fi"].append(fi)
                found[layer, "rank"].append(rank)
                if layer == "__all__":
                    continue
                # Scaling directions are numerically null below the tolerance times the most any
                # direction of the same norm can do: trace(QᵀJJᵀQ)·‖θ_l‖² (docs/method.md).
                theta2 = sum(float(params[n].double().square().sum()) for n in names)
                floor = float((_contrasts(len(p), J.device).T @ J.detach()).square().sum()) * theta2
                # layer scaling θ_l → ω θ_l at ω0 = 1: u = ∂z/∂ω, shape (K, 1)
                one = torch.ones((), dtype=probs.dtype if not names else params[names[0]].dtype)
                scaled = partial(call_scaled, names=names, x=x)
                u = jacobian(scaled, one.to(p.device)).reshape(-1, 1)
                found[layer, "scale_fi"].append(fi_from_jacobian(u, p, c, rtol, floor)[0])
                J_ch = _channel_scale_jacobian(model, call, params, layer, names, x)
                if J_ch is not None:
                    fi, rank = fi_from_jacobian(J_ch, p, c, rtol, floor)
                    found[layer, "channel_scale_fi"].append(fi)
                    found[layer, "channel_scale_rank"].append(rank)

    result: dict[str, dict[str, Tensor | None]] = {}
    keys = ("fi", "rank", "scale_fi", "channel_scale_fi", "channel_scale_rank")
    for layer in layers:
        result[layer] = {k: torch.stack(found[layer, k]) if found[layer, k] else None for k in keys}
    result["__all__"] = {k: torch.stack(found["__all__", k]) for k in ("fi", "rank")}
    return result


def _channel_scale_jacobian(
    model: nn.Module,
    call: Callable[[dict[str, Tensor], Inputs], Tensor],
    params: dict[str, Tensor],
    layer: str,
    names: list[str],
    x: Inputs,
) -> Tensor | None:
    """``∂z/∂ω`` (K, C) of ``θ[c] → ω_c θ[c]`` on the layer's parameters at ``ω0 = 1``.

    Slice c is taken along each parameter's output-channel axis; None for layers without one.
    """
    axes = channel_axes(model.get_submodule(layer))
    if not axes or not names:
        return None
    prefix = f"{layer}." if layer else ""
    own = {name: name[len(prefix) :] for name in names}

    def scaled(omega: Tensor) -> Tensor:
        substitute = {}
        for name, local in own.items():
            shape = [1] * params[name].dim()
            shape[axes[local]] = -1
            substitute[name] = params[name] * omega.reshape(shape)
        return call(substitute, x)

    first = next(iter(own))
    size = params[first].shape[axes[own[first]]]
    omega0 = params[first].new_ones(size)
    return jacobian(scaled, omega0).to(torch.float64)


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
