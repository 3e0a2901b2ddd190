"""From the routes' per-layer Grams to parameter FI: every family of every layer, in one call.

A layer's Gram is the sum of what each route contributed for its parameters;
``ParameterFI.whole`` adds the routes' totals (a shared parameter once). Layer- and
channel-scaling directions whose effect is below the rank tolerance times the most a parameter
direction of the same norm can do are numerically null (docs/engine.md, "Numerics").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_sens.core.fi import fi_from_contrast_columns, fi_from_contrast_gram
from lightning_sens.core.frame import MetricFrame, metric_frame
from lightning_sens.core.plan import Ownership
from lightning_sens.core.results import LayerFI, ParameterFI
from lightning_sens.core.routes import LayerGram, RouteResult, channel_axes, norm2, weight_rows

__all__ = ["parameter_result", "zero_gram"]


def zero_gram(layer: nn.Module, batch: int, K1: int, device: torch.device) -> LayerGram:
    """The Gram of a layer whose parameters do not reach the logits: zero."""
    zeros = torch.zeros(batch, K1, K1, dtype=torch.float64, device=device)
    axes = channel_axes(layer)
    channel = None
    if axes:
        name, axis = next(iter(axes.items()))
        size = getattr(layer, name).shape[axis]
        channel = torch.zeros(batch, K1, size, dtype=torch.float64, device=device)
    scale = torch.zeros(batch, K1, dtype=torch.float64, device=device)
    theta = norm2([p for p in layer.parameters(recurse=False) if p.requires_grad])
    return LayerGram(zeros, scale, channel, "unused", theta)


def parameter_result(
    results: list[RouteResult],
    unused: dict[str, LayerGram],
    layers: dict[str, nn.Module],
    ownership: Ownership,
    skipped: dict[str, str],
    probs: Tensor,
    c: Tensor,
    tol: float,
    frame: MetricFrame | None = None,
    weight_metrics: dict[str, Tensor | None] | None = None,
) -> ParameterFI:
    """Parameter, layer-scaling and channel-scaling FI of every layer, and all parameters.

    Also the metric of each layer's families (tr(G_l), uᵀHu of its scaling) and, from
    ``weight_metrics`` (layer → what its Gram route split by weight rows), the per-channel weight
    metric of layers whose whole Gram came from that one route (None: not requested, and none
    is computed).
    """
    batch, K = probs.shape
    device = probs.device
    frame = metric_frame(probs, c) if frame is None else frame
    per_layer: dict[str, LayerGram] = dict(unused)
    sources: dict[str, int] = {}
    for result in results:
        for name, gram in result.layers.items():
            sources[name] = sources.get(name, 0) + 1
            per_layer[name] = gram if name not in per_layer else per_layer[name] + gram
    names = [n for n in layers if n in per_layer and n not in skipped]
    grams = [per_layer[n].gram for n in names]
    # the most any parameter direction of the same norm as θ_l can do, bounded by the trace
    noise = {
        n: per_layer[n].gram.diagonal(dim1=-2, dim2=-1).sum(-1) * per_layer[n].theta_norm2
        for n in names
    }
    channel_names = [n for n in names if per_layer[n].channel_scale is not None]
    for name in channel_names:
        u = per_layer[name].channel_scale
        assert u is not None
        grams.append(u @ u.transpose(-1, -2))
    zero = torch.zeros(batch, K - 1, K - 1, dtype=torch.float64, device=device)
    grams.append(sum((r.total for r in results), zero))
    no_floor = torch.zeros(batch, dtype=torch.float64, device=device)
    floors = [no_floor] * len(names) + [noise[n] for n in channel_names] + [no_floor]
    blocks = fi_from_contrast_gram(torch.stack(grams), probs, c, tol, torch.stack(floors))
    channel_fi = {n: blocks[len(names) + i] for i, n in enumerate(channel_names)}
    found = {}
    if names:
        scales = torch.stack([per_layer[n].scale for n in names]).unsqueeze(-1)
        floor = torch.stack([noise[n] for n in names])
        scale_fi = fi_from_contrast_columns(scales, probs, c, tol, floor)
        metrics = frame.trace(torch.stack([per_layer[n].gram for n in names], 1))  # (B, L)
        scale_metrics = frame.columns(scales.squeeze(-1).permute(1, 2, 0))  # (B, L)
        found = {
            name: LayerFI(
                parameters=blocks[i],
                scale=scale_fi[i],
                channel_scale=channel_fi.get(name),
                method=per_layer[name].method,
                metric=metrics[:, i],
                scale_metric=scale_metrics[:, i],
                weight_channel_metric=None
                if weight_metrics is None
                else _weight_metric(
                    per_layer[name],
                    weight_metrics.get(name),
                    sources.get(name),
                    frame,
                    layers[name],
                ),
                shared_with=ownership.shared_with(name),
            )
            for i, name in enumerate(names)
        }
    return ParameterFI(found, blocks[-1], dict(skipped))


def _weight_metric(
    gram: LayerGram,
    from_route: Tensor | None,
    sources: int | None,
    frame: MetricFrame,
    layer: nn.Module,
) -> Tensor | None:
    """The per-channel weight metric of a layer whose whole Gram came from one route (zero for
    a layer whose parameters do not reach the logits); None where it is not known."""
    weight = getattr(layer, "weight", None)
    if gram.method == "unused" and isinstance(weight, Tensor):
        return gram.gram.new_zeros(gram.gram.shape[0], weight_rows(layer).shape[0])
    if sources != 1:
        return None
    if from_route is not None:
        return from_route
    if gram.weight_rows is not None:
        return frame.columns(gram.weight_rows).sum(-1)
    return None
