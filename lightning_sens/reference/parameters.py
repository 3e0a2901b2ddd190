"""Reference parameter FI: per layer, layer scaling, channel scaling, all parameters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.fi import BlockFI
from lightning_sens.core.inputs import ForwardModule, default_forward
from lightning_sens.core.results import LayerFI, ParameterFI
from lightning_sens.core.routes import channel_axes
from lightning_sens.reference.measure import (
    ForwardFn,
    Inputs,
    Target,
    batch_of,
    block,
    contrasts,
    exact_mode,
    fi_from_jacobian,
    fi_max,
    grad_log_py,
    jacobian,
    logits_one,
    metric_diagonal,
    sample,
    targets,
)

__all__ = ["parameter_fi"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _stored_in_out(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): x @ W + b with W of shape (in, out)."""
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
        for c in type(module).__mro__
    )


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
) -> ParameterFI:
    """Influence of parameter perturbations, per layer and jointly (Setup 2 and scalings).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape), or a dict of tensors passed as keyword arguments.
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``; a binary
            classifier's 0/1 labels may be float or bool, (B,) or (B, 1) (see ``targets``).
        layers: module names as in ``model.named_modules()``; ``None`` selects every module that
            directly owns (``recurse=False``) a parameter with ``requires_grad=True``.
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``, or one binary logit z, (N,) or
            (N, 1), read as the two-class logits (0, z); default as in :func:`input_fi`.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.

    Returns:
        The engine's own result type, :class:`~lightning_sens.core.results.ParameterFI`:
        ``layers`` maps each listed layer to a :class:`~lightning_sens.core.results.LayerFI`
        (every :class:`~lightning_sens.core.fi.BlockFI` with FI, relative FI
        ``fi / ((1 − p_y) / p_y)`` and effective rank, all (B,)):

        - ``parameters``: additive ``θ_l + ω`` on the layer's block (its direct trainable
        parameters, weight and bias together, each used wherever the forward uses it),
        ``ω0 = 0``.
        - ``scale``: layer scaling ``θ_l → ω θ_l`` with one scalar, ``ω0 = 1`` (m = 1).
        - ``channel_scale``: slice c of every trainable parameter along its output-channel axis
        (:func:`lightning_sens.core.routes.channel_axes`) multiplied by ``ω_c``, ``ω0 = 1``,
        all channels as one block (None for layers without channels).
        - ``metric``: tr(G) = Σ_i J_iᵀ H J_i over the block's coordinates; ``scale_metric``:
        uᵀ H u of the layer-scaling direction; ``weight_channel_metric`` (B, C): tr(G) over
        each output channel's slice of the weight alone, for Linear and Conv layers (None for
        others).
        - ``shared_with``: the other listed layers that own one of the layer's trainable
        parameters (tied weights), sorted.
        - ``method``: always ``"jacobian"``. The field is required and says which route the
        engine took; the reference has no routes, and computes every family from the full
        Jacobian by autograd, which is what the engine's ``"jacobian"`` route computes.

        ``whole`` is the block of all listed layers' parameters together, each parameter
        counted once; ``skipped`` is empty (the reference measures every layer or raises).
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
    blocks: dict[str | None, list[str]] = {layer: _block_names(model, layer) for layer in layers}
    # None: the block of all listed layers' parameters (a layer may be named "", the root)
    blocks[None] = _distinct(model, [n for layer in layers for n in blocks[layer]])

    def call(substitute: dict[str, Tensor], x: Inputs) -> Tensor:
        named = {f"model.{n}": t for n, t in substitute.items()}
        return logits_one(lambda xb: functional_call(wrapper, named, (xb,)), x)

    def call_scaled(omega: Tensor, names: list[str], x: Inputs) -> Tensor:
        return call({n: omega * params[n] for n in names}, x)

    found: dict[tuple[str | None, str], list[Tensor]] = defaultdict(list)
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
                if layer is None:
                    continue
                found[layer, "metric"].append(metric_diagonal(J.to(torch.float64), p).sum())
                weight = f"{layer}.weight" if layer else "weight"
                module = model.get_submodule(layer)
                if (isinstance(module, _WEIGHTED) or _stored_in_out(module)) and weight in jac:
                    J_w = jac[weight].to(torch.float64)
                    diagonal = metric_diagonal(J_w.reshape(len(p), -1), p)
                    diagonal = diagonal.reshape(J_w.shape[1:])
                    if _stored_in_out(module):  # (in, out): output channels are columns
                        diagonal = diagonal.t()
                    per_channel = diagonal.reshape(diagonal.shape[0], -1).sum(-1)
                    found[layer, "weight_channel_metric"].append(per_channel)
                # Scaling directions are numerically null below the tolerance times the most any
                # direction of the same norm can do: trace(QᵀJJᵀQ)·‖θ_l‖² (docs/derivations.md,
                # "Numerically null scaling directions").
                theta2 = sum(float(params[n].double().square().sum()) for n in names)
                floor = float((contrasts(len(p), J.device).T @ J.detach()).square().sum()) * theta2
                # layer scaling θ_l → ω θ_l at ω0 = 1: u = ∂z/∂ω, shape (K, 1)
                one = torch.ones((), dtype=probs.dtype if not names else params[names[0]].dtype)
                scaled = partial(call_scaled, names=names, x=x)
                u = jacobian(scaled, one.to(p.device)).reshape(-1, 1)
                fi, rank = fi_from_jacobian(u, p, c, rtol, floor)
                found[layer, "scale_fi"].append(fi)
                found[layer, "scale_rank"].append(rank)
                found[layer, "scale_metric"].append(metric_diagonal(u.to(torch.float64), p)[0])
                J_ch = _channel_scale_jacobian(model, call, params, layer, names, x)
                if J_ch is not None:
                    fi, rank = fi_from_jacobian(J_ch, p, c, rtol, floor)
                    found[layer, "channel_scale_fi"].append(fi)
                    found[layer, "channel_scale_rank"].append(rank)

    _, most = fi_max(probs, labels)

    def values(layer: str | None, key: str) -> Tensor | None:
        return torch.stack(found[layer, key]) if found[layer, key] else None

    def family(layer: str | None, key: str) -> BlockFI | None:
        fi, rank = values(layer, f"{key}fi"), values(layer, f"{key}rank")
        return None if fi is None or rank is None else block(fi, rank, most)

    def computed(value: BlockFI | Tensor | None) -> Any:
        assert value is not None  # computed for every layer above
        return value

    tensors = dict(model.named_parameters(remove_duplicate=False))
    owned = {
        layer: {id(t) for t in model.get_submodule(layer).parameters(recurse=False)}
        for layer in layers
    }

    def shared_with(layer: str) -> tuple[str, ...]:
        mine = {id(tensors[n]) for n in blocks[layer]}
        return tuple(sorted(o for o in layers if o != layer and mine & owned[o]))

    result = {
        layer: LayerFI(
            parameters=computed(family(layer, "")),
            scale=computed(family(layer, "scale_")),
            channel_scale=family(layer, "channel_scale_"),
            method="jacobian",
            metric=computed(values(layer, "metric")),
            scale_metric=computed(values(layer, "scale_metric")),
            weight_channel_metric=values(layer, "weight_channel_metric"),
            shared_with=shared_with(layer),
        )
        for layer in layers
    }
    return ParameterFI(layers=result, whole=computed(family(None, "")), skipped={})


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
