"""The metric's trace per layer for outputs of any size, from labels sampled from the model.

The exact engine forms each layer's metric from K − 1 backward products, one per contrast of the
logits: impossible for a 50,000-token vocabulary. The trace alone does not need them. For one
sample with positions t (one for a classifier) and labels drawn from the model's own
predictions, ŷ_t ∼ p_t,

    tr G_l = E_ŷ ‖∇_{θ_l} log p(ŷ | x)‖²,    ∇_{θ_l} log p(ŷ | x) = Σ_t J_tᵀ (e_{ŷ_t} − p_t),

so the mean of S draws of the squared norm is an unbiased estimate whose standard error the draws
themselves give (docs/derivations.md, "The trace from sampled labels"). Each draw is one backward
product with a per-sample cotangent; the squared norms come from the fast routes' per-sample
Grams (the ghost identity where it is cheaper), so no per-sample gradient of a large layer is
formed, and a certificate checks the routes against autograd as in the exact engine. Layers
that need a Jacobian route are left out, by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sens.core.capture import Backward, backprops, capture_calls, exact_context
from lightning_sens.core.certificate import FastShare, certify
from lightning_sens.core.engine import trainable_layers
from lightning_sens.core.frame import MetricFrame
from lightning_sens.core.inputs import ForwardFn, Inputs, batch_size, select
from lightning_sens.core.layout import OutputLayout, canonical_logits, kept_positions
from lightning_sens.core.plan import Ownership, make_plan
from lightning_sens.core.probe import probe
from lightning_sens.core.runner import Runner
from lightning_sens.core.session import fast_routes
from lightning_sens.core.validation import check_inputs

__all__ = [
    "DRAWS",
    "DRAW_BLOCK",
    "LayerTrace",
    "TraceResult",
    "sampled_cotangents",
    "sampled_metric_trace",
]

DRAWS = 16
"""The labels drawn per sample by default: a trace to about 1/√16 = 25 % of its spread per sample,
less over a probe of many samples (the standard error says how much)."""

DRAW_BLOCK = 32
"""Draws whose backprops one route holds at a time where the backward is batched (CUDA) or the
output small: its Gram is DRAW_BLOCK² per sample, of which only the diagonal is used. Where the
backward runs draw by draw (CPU) on a large output, one draw at a time, so that no off-diagonal
product is formed (on a tiny Llama with a 2,048-token vocabulary, 3 × faster)."""

SMALL_OUTPUT = 4096
"""Logit entries per sample up to which blocks of draws are used on the CPU too."""


@dataclass(frozen=True)
class LayerTrace:
    """One layer's estimated metric trace, per sample.

    Attributes:
        layer: the layer's name in ``model.named_modules()``.
        method: the route whose Grams gave the squared norms.
        metric: the estimate of tr(G_l) ``(B,)``, float64: the mean over the draws of
            ‖∇_{θ_l} log p(ŷ | x)‖², summed over the sample's positions.
        standard_error: its standard error ``(B,)`` (the draws' standard deviation / √S).
        weight_channel_metric: the same estimate of tr(G) per output channel of a Linear or
            convolution weight ``(B, C)``, with ``channel_metric``; else None.
    """

    layer: str
    method: str
    metric: Tensor
    standard_error: Tensor
    weight_channel_metric: Tensor | None = None


@dataclass(frozen=True)
class TraceResult:
    """:func:`sampled_metric_trace` of a batch.

    Attributes:
        layers: layer name → its :class:`LayerTrace`.
        draws: S, the labels drawn per sample.
        skipped: layer name → why it has no estimate (a Jacobian route).
    """

    layers: dict[str, LayerTrace]
    draws: int
    skipped: dict[str, str] = field(default_factory=dict)


def sampled_cotangents(
    logits: Tensor,
    layout: OutputLayout | None,
    draws: int,
    generator: torch.Generator,
    mask: Tensor | None = None,
) -> Tensor:
    """``(S, *logits.shape)``: for each draw, ∂ log p(ŷ | x)/∂z at labels ŷ drawn from the
    model's own predictions, e_ŷ − p at a softmax position, ŷ − sigmoid(z) at a sigmoid; zero at
    the positions that are masked or, for a causal language model, have no next token.

    Args:
        logits: the model's output as it returns it.
        layout: how the logits are laid out (:func:`~lightning_sens.core.layout.read_layout`);
            None: ``(B, K)`` logits of one class per sample.
        draws: S.
        generator: a CPU generator for the draws.
        mask: ``(B, *positions)``, nonzero where a position counts, or None.
    """
    z = logits.detach().to(torch.float64)
    canonical = canonical_logits(z, layout)  # (B, P, K), or (B, P) for sigmoids
    shape = (canonical.shape[0], canonical.shape[1])
    keep = kept_positions(shape, layout, mask, z.device).to(torch.float64)
    if layout is None or layout.task == "multiclass":
        probs = torch.softmax(canonical, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        drawn = torch.multinomial(flat, draws, replacement=True, generator=generator)
        eye = torch.nn.functional.one_hot(drawn.T, flat.shape[-1]).to(torch.float64)
        cotangents = (eye - flat).reshape(draws, *canonical.shape).to(z.device)
        return _classes_back(cotangents * keep.unsqueeze(-1), layout, logits.shape)
    sigma = torch.sigmoid(canonical).cpu()
    uniform = torch.rand((draws, *sigma.shape), generator=generator, dtype=torch.float64)
    cotangents = ((uniform < sigma).to(torch.float64) - sigma).to(z.device) * keep
    return cotangents.reshape(draws, *logits.shape)


def _classes_back(c: Tensor, layout: OutputLayout | None, shape: torch.Size) -> Tensor:
    """``(S, B, P, K)`` back to ``(S, *shape)``, the logits' own layout."""
    if layout is not None and layout.dense and not layout.flattened and layout.class_dim == 1:
        B, K = shape[0], shape[1]
        return c.reshape(c.shape[0], B, *shape[2:], K).movedim(-1, 2)
    return c.reshape(c.shape[0], *shape)


def _check_output(logits: Any, hint: str) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"The model returned {type(logits).__name__}, not logits.{hint}")


def sampled_metric_trace(
    model: nn.Module,
    batch: Inputs,
    *,
    layout: OutputLayout | None = None,
    mask: Tensor | None = None,
    draws: int = DRAWS,
    layers: Sequence[str] | None = None,
    exclude_layers: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
    channel_metric: bool = False,
    chunk_size: int | None = None,
    seed: int = 0,
    backward: Backward = "auto",
) -> TraceResult:
    """Estimate tr(G_l) of every layer per sample from S labels drawn from the model's own
    predictions: S backward products, whatever the number of classes.

    The model is evaluated as by :func:`~lightning_sens.sensitivity` (eval mode, float32 at
    least, nothing of it changed). Layers on a fast route (Linear, convolutions, embeddings,
    normalisation, recurrent) are estimated; layers that need the Jacobian route are listed in
    ``TraceResult.skipped``.

    Args:
        model: any module whose forward returns logits (or an output with ``logits``).
        batch: its inputs.
        layout: how its logits meet labels (:func:`~lightning_sens.core.layout.read_layout`):
            a class axis, many positions, sigmoids, a causal shift. None: ``(B, K)`` logits.
        mask: ``(B, *positions)``, nonzero where a position counts (an attention mask).
        draws: S ≥ 2 labels per sample (the standard error needs two).
        layers: module names to estimate (None: every module with trainable parameters).
        exclude_layers: module names or glob patterns left out.
        forward_fn: (module, inputs) → logits, or None for the module's forward.
        channel_metric: also estimate tr(G) per output channel of Linear/Conv weights.
        chunk_size: samples per forward pass (None: the whole batch).
        seed: of the draws.
        backward: "auto", "batched" or "loop", as for :func:`~lightning_sens.sensitivity`.
    """
    check_inputs(batch)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(
            f"draws must be an integer >= 2 (the standard error needs two), got {draws!r}."
        )
    B = batch_size(batch)
    monitored = trainable_layers(model, layers, exclude_layers)
    generator = torch.Generator().manual_seed(seed)
    step = chunk_size or B
    parts: list[dict[str, tuple[str, Tensor, Tensor, Tensor | None]]] = []
    skipped: dict[str, str] = {}
    with exact_context(model):
        runner = Runner(model, forward_fn)
        ownership = Ownership.of(model, monitored)
        found = probe(
            model, runner, ownership, runner.inputs(select(batch, slice(0, 1), B)), _check_output
        )
        plan = make_plan(ownership, found.shapes, found.unused, None)
        for name in monitored:
            if name not in plan.fast and name not in plan.unused:
                skipped[name] = (
                    f"{name!r} needs the Jacobian route, which the sampled trace does not run; "
                    "the exact engine (sensitivity) computes it where the output is small."
                )
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            chunk_mask = None if mask is None else mask[rows]
            inputs = runner.inputs(select(batch, rows, B))
            parts.append(
                _chunk(
                    model,
                    runner,
                    plan,
                    inputs,
                    layout,
                    chunk_mask,
                    draws,
                    generator,
                    channel_metric,
                    backward,
                    ownership,
                )
            )
    traces = {}
    failed = {name for part in parts for name, found in part.items() if found[0] == "failed"}
    for name in sorted(failed):
        skipped[name] = (
            f"{name!r}: its route misses a use of its parameters (a shared weight or a "
            "functional call); the exact engine (sensitivity) computes it on the Jacobian route."
        )
    for name in parts[0] if parts else {}:
        if name in failed:
            continue
        method = parts[0][name][0]
        metric = torch.cat([p[name][1] for p in parts])
        error = torch.cat([p[name][2] for p in parts])
        channels = [c for p in parts if (c := p[name][3]) is not None]
        channel = torch.cat(channels) if len(channels) == len(parts) else None
        traces[name] = LayerTrace(name, method, metric, error, channel)
    for name in sorted(plan.unused):
        layer = next((n for n, ps in ownership.layer_params.items() if name in ps), None)
        if layer is not None and layer not in traces:
            zeros = torch.zeros(B, dtype=torch.float64)
            traces[layer] = LayerTrace(layer, "unused", zeros, zeros.clone(), None)
    return TraceResult(traces, draws, skipped)


def _chunk(
    model: nn.Module,
    runner: Runner,
    plan: Any,
    inputs: Inputs,
    layout: OutputLayout | None,
    mask: Tensor | None,
    draws: int,
    generator: torch.Generator,
    channel_metric: bool,
    backward: Backward,
    ownership: Ownership,
) -> dict[str, tuple[str, Tensor, Tensor, Tensor | None]]:
    """One forward pass, S backward products, and each fast layer's squared norms."""
    hooked = {name: model.get_submodule(name) for name in plan.fast}
    unroll = {  # recurrent layers record their time steps during the call
        name: spec.route.unroll_call
        for name, spec in plan.fast.items()
        if hasattr(spec.route, "unroll_call")
    }
    with capture_calls(hooked, plan.copy_inputs, unroll) as records:
        logits = runner(inputs)
    _check_output(logits, "")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    cotangents = sampled_cotangents(logits, layout, draws, generator, mask)
    slots, targets = [], []
    for name in plan.fast:
        for call in records[name]:
            for leaf in sorted(call.held):
                slots.append(name)
                targets.append(call.held[leaf])
    if not targets:
        return {}
    norms: dict[str, list[Tensor]] = {}
    channels: dict[str, list[Tensor]] = {}
    methods: dict[str, str] = {}
    batched = backward == "batched" or (backward == "auto" and logits.is_cuda)
    small = logits[0].numel() <= SMALL_OUTPUT  # per-block overhead outweighs off-diagonal work
    size = DRAW_BLOCK if batched or small else 1
    for start in range(0, draws, size):  # Grams of `size` draws: only their diagonal is used
        block = cotangents[start : start + size]
        routes = fast_routes(model, plan, records, len(block), dtype)

        def consume(found: list[Tensor], routes: dict[str, Any] = routes) -> None:
            per_route: dict[str, list[Tensor]] = {name: [] for name in routes}
            for name, g in zip(slots, found, strict=True):
                per_route[name].append(g.movedim(plan.fast[name].out_dim, 0))
            for name, route in routes.items():
                route.add(per_route[name])

        backprops(logits, targets, block, consume, backward, retain_graph=True)
        for name, route in routes.items():
            for layer, gram in route.result().layers.items():
                methods[layer] = gram.method
                norms.setdefault(layer, []).append(torch.diagonal(gram.gram, dim1=-2, dim2=-1))
            if channel_metric:
                size = len(block)
                eye = torch.eye(size, dtype=torch.float64, device=logits.device)
                B = norms[name][-1].shape[0]
                frame = MetricFrame(eye.expand(B, size, size), eye.new_zeros(B, size))
                found = route.weight_metric(frame)  # Σ over the block's draws, per channel
                if found is not None:
                    channels.setdefault(name, []).append(found)
    # the routes against autograd, along a random mix of the first draws (frees the graph)
    shares = {
        name: FastShare(hooked[name], records[name], ownership.layer_params[name])
        for name in plan.fast
    }
    tensors = {p: runner.tensor(p) for share in shares.values() for p in share.params}
    failed = certify(logits, cotangents[:DRAW_BLOCK], shares, [], tensors)
    out: dict[str, tuple[str, Tensor, Tensor, Tensor | None]] = {
        name: ("failed", torch.empty(0), torch.empty(0), None) for name in failed
    }
    for layer, parts in norms.items():
        if layer in failed:
            continue
        squared = torch.cat(parts, dim=-1)  # (B, S): ‖∇_θ log p(ŷ_s | x)‖²
        metric = squared.mean(-1)
        error = squared.std(-1, correction=1) / draws**0.5
        summed = channels.get(layer)
        channel = None if summed is None else (torch.stack(summed).sum(0) / draws).cpu()
        out[layer] = (methods[layer], metric.cpu(), error.cpu(), channel)
    return out
