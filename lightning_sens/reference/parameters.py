"""Reference parameter FI: per layer, layer scaling, channel scaling, all parameters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.inputs import ForwardModule, default_forward
from lightning_sens.core.routes import channel_axes
from lightning_sens.reference.measure import (
    ForwardFn,
    Inputs,
    Target,
    batch_of,
    contrasts,
    exact_mode,
    fi_from_jacobian,
    grad_log_py,
    jacobian,
    logits_one,
    metric_diagonal,
    sample,
    targets,
)

__all__ = ["parameter_fi"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


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

        - ``'metric'``: tr(G) = Σ_i J_iᵀ H J_i over the block's coordinates;
        ``'scale_metric'``: uᵀ H u of the layer-scaling direction;
        ``'weight_channel_metric'`` (B, C): tr(G) over each output channel's slice of the weight
        alone, for Linear and Conv layers (``None`` for others).

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
        return logits_one(lambda xb: functional_call(wrapper, named, (xb,)), x)

    def call_scaled(omega: Tensor, names: list[str], x: Inputs) -> Tensor:
        return call({n: omega * params[n] for n in names}, x)

    found: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    with exact_mode(model):
        samples = [sample(inputs, b) for b in range(batch_of(inputs))]
        logits = torch.stack([call({}, x).detach() for x in samples]).to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = targets(target, logits)
        for b, x in enumerate(samples):
            p, c = probs[b], grad_log_py(probs[b], labels[b])
            for layer, names in blocks.items():
                # additive θ_l + ω: Jacobian w.r.t. the block's parameters, flattened, concatenated
                jac = {}
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
                found[layer, "metric"].append(metric_diagonal(J.to(torch.float64), p).sum())
                weight = f"{layer}.weight" if layer else "weight"
                if isinstance(model.get_submodule(layer), _WEIGHTED) and weight in jac:
                    J_w = jac[weight].to(torch.float64)
                    diagonal = metric_diagonal(J_w.reshape(len(p), -1), p)
                    per_channel = diagonal.reshape(J_w.shape[1], -1).sum(-1)
                    found[layer, "weight_channel_metric"].append(per_channel)
                # Scaling directions are numerically null below the tolerance times the most any
                # direction of the same norm can do: trace(QᵀJJᵀQ)·‖θ_l‖² (docs/method.md).
                theta2 = sum(float(params[n].double().square().sum()) for n in names)
                floor = float((contrasts(len(p), J.device).T @ J.detach()).square().sum()) * theta2
                # layer scaling θ_l → ω θ_l at ω0 = 1: u = ∂z/∂ω, shape (K, 1)
                one = torch.ones((), dtype=probs.dtype if not names else params[names[0]].dtype)
                scaled = partial(call_scaled, names=names, x=x)
                u = jacobian(scaled, one.to(p.device)).reshape(-1, 1)
                found[layer, "scale_fi"].append(fi_from_jacobian(u, p, c, rtol, floor)[0])
                found[layer, "scale_metric"].append(metric_diagonal(u.to(torch.float64), p)[0])
                J_ch = _channel_scale_jacobian(model, call, params, layer, names, x)
                if J_ch is not None:
                    fi, rank = fi_from_jacobian(J_ch, p, c, rtol, floor)
                    found[layer, "channel_scale_fi"].append(fi)
                    found[layer, "channel_scale_rank"].append(rank)

    result: dict[str, dict[str, Tensor | None]] = {}
    keys = (
        "fi",
        "rank",
        "scale_fi",
        "channel_scale_fi",
        "channel_scale_rank",
        "metric",
        "scale_metric",
        "weight_channel_metric",
    )
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
