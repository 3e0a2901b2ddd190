"""Result types of the engine: per-sample FI of input and parameter families."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_sens.core.fi import BlockFI
from lightning_sens.core.routes import Method

__all__ = ["InputFI", "LayerFI", "ParameterFI", "SensitivityResult", "concat_results"]


@dataclass(frozen=True)
class InputFI:
    """Input perturbations (Setups 1, 3 and 4 of docs/method.md, "The paper's four setups"),
    f = log p_y.

    Images ``(B, C, H, W)`` are perturbed pixel by pixel. Token ids are perturbed where they
    become continuous: at the output ``(B, T, d)`` of the embedding that reads them (the paper's
    input perturbation applied to the embedded sequence); ``source`` says which.

    Attributes:
        whole: FI of perturbing every input coordinate, ``(B,)``, with its effective rank; it
            equals (1 − p_y)/p_y exactly when the rank is K − 1 (docs/method.md, "Two facts
            you must know").
        maps: window size w = 2s + 1 → FI of perturbing one channel in the window of w positions
            (w × w pixels, or w consecutive tokens) centred on each position, clipped at the
            borders; shaped like the perturbed input, ``(B, C, H, W)`` or ``(B, T, d)``. Empty for
            other inputs, and without maps (``sensitivity(..., input_maps=False)`` or
            ``windows=()``).
        position_map: FI of perturbing all channels of one position together: ``(B, H, W)``
            for images (every channel of a pixel), ``(B, T)`` for tokens (a token's embedding);
            None for other inputs and without maps.
        source: what was perturbed: ``"inputs"``, ``"inputs['pixel_values']"``, or
            ``"output of 'embed'"`` for token inputs.
        metric_map: the diagonal of the input metric, J_iᵀ H J_i, per input coordinate, shaped
            like the perturbed input (float64): the magnitude FI normalises away. A small edit
            ε_i of coordinate i changes the prediction by KL ≈ ½ ε_i² · metric_map
            (docs/damage.md, "What the metric predicts").
        gradient: ∂ log p_y / ∂x_i per input coordinate (float64), the plain saliency; from the
            same backward products.
    """

    whole: BlockFI
    maps: dict[int, BlockFI]
    position_map: BlockFI | None
    source: str = "inputs"
    metric_map: Tensor | None = None
    gradient: Tensor | None = None


@dataclass(frozen=True)
class LayerFI:
    """Parameter perturbations of one layer (Setup 2 and the scaling families), ``(B,)`` each.

    A layer's family is every trainable parameter it owns directly, wherever the forward pass
    uses it: a layer called twice, or a weight shared with another layer (tied embeddings),
    perturbs every use at once.

    Attributes:
        parameters: FI of perturbing the layer's trainable parameters (weight and bias together).
        scale: FI of scaling them all by one factor, θ_l → ω θ_l, ω0 = 1 (m = 1).
        channel_scale: FI of scaling each output channel by its own factor, all channels jointly
            (rank ≤ min(C, K − 1)); None for layers without a channel notion (see
            :func:`~lightning_sens.core.routes.channel_axes`).
        method: how the Gram was computed (:data:`~lightning_sens.core.routes.Method`).
        metric: tr(G_l), the trace of the perturbation manifold's metric over the layer's
            trainable parameters (float64): Σ_k p_k ‖∂ log p_k / ∂θ_l‖². Weight noise
            ε ~ N(0, σ² I) on the layer changes the prediction by E[KL] ≈ ½ σ² tr(G_l)
            (docs/damage.md, "What the metric predicts").
        scale_metric: uᵀ H u for the scaling direction u = ∂z/∂ω (θ_l → ω θ_l): scaling the
            layer by 1 + δ changes the prediction by KL ≈ ½ δ² · scale_metric.
        weight_channel_metric: ``(B, C)`` tr(G) of each output channel's slice of the weight
            alone (bias excluded), what weight quantisation with per-channel steps needs;
            None where the layer is not a Linear/Conv layer on its own Gram route.
        shared_with: other monitored layers that own one of this layer's parameters.
    """

    parameters: BlockFI
    scale: BlockFI
    channel_scale: BlockFI | None
    method: Method
    metric: Tensor
    scale_metric: Tensor
    weight_channel_metric: Tensor | None = None
    shared_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParameterFI:
    """Per-layer FI (keys as in ``model.named_modules()``) and all layers' parameters jointly.

    Attributes:
        layers: layer name → its FI.
        whole: the block of every monitored parameter together, each counted once (as
            :attr:`InputFI.whole` is the block of every input coordinate).
        skipped: layer name → why it could not be measured (only with
            ``on_unsupported="skip"``; such layers are also left out of ``whole``).
    """

    layers: dict[str, LayerFI]
    whole: BlockFI
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SensitivityResult:
    """Everything one call of :func:`~lightning_sens.core.engine.sensitivity` measured.

    Attributes:
        target: the class y used per sample (the label, or the argmax for "pred"), ``(B,)``.
        p_target: p_y, float64, ``(B,)``.
        log_fi_max: log((1 − p_y)/p_y), the largest FI of any family (log space, exact).
        input: input FI, or None when not requested (``inputs=False``) or when nothing
            continuous can be perturbed (no floating input, no embedding reading token ids).
        parameters: parameter FI, or None when not requested.
    """

    target: Tensor
    p_target: Tensor
    log_fi_max: Tensor
    input: InputFI | None
    parameters: ParameterFI | None


def concat_results(parts: list[SensitivityResult]) -> SensitivityResult:
    """Join per-chunk results along the sample dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    input_result = None
    if first.input is not None:
        ins = [p.input for p in parts if p.input is not None]
        input_result = InputFI(
            whole=BlockFI.cat([i.whole for i in ins]),
            maps={w: BlockFI.cat([i.maps[w] for i in ins]) for w in first.input.maps},
            position_map=None
            if first.input.position_map is None
            else BlockFI.cat([i.position_map for i in ins if i.position_map is not None]),
            source=first.input.source,
            metric_map=_cat_optional([i.metric_map for i in ins]),
            gradient=_cat_optional([i.gradient for i in ins]),
        )
    parameter_result = None
    if first.parameters is not None:
        ps = [p.parameters for p in parts if p.parameters is not None]
        skipped = {k: v for p in ps for k, v in p.skipped.items()}
        layers = {}
        for name, layer in first.parameters.layers.items():
            if name in skipped:  # a layer that failed in one chunk is left out everywhere
                continue
            chunks = [p.layers[name] for p in ps]
            layers[name] = LayerFI(
                parameters=BlockFI.cat([c.parameters for c in chunks]),
                scale=BlockFI.cat([c.scale for c in chunks]),
                channel_scale=None
                if layer.channel_scale is None
                else BlockFI.cat([c.channel_scale for c in chunks if c.channel_scale is not None]),
                method=layer.method,
                metric=torch.cat([c.metric for c in chunks]),
                scale_metric=torch.cat([c.scale_metric for c in chunks]),
                weight_channel_metric=_cat_optional([c.weight_channel_metric for c in chunks]),
                shared_with=layer.shared_with,
            )
        parameter_result = ParameterFI(layers, BlockFI.cat([p.whole for p in ps]), skipped)
    return SensitivityResult(
        torch.cat([p.target for p in parts]),
        torch.cat([p.p_target for p in parts]),
        torch.cat([p.log_fi_max for p in parts]),
        input_result,
        parameter_result,
    )


def _cat_optional(parts: list[Tensor | None]) -> Tensor | None:
    """Concatenate per-chunk tensors, or None where a chunk has none."""
    if any(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None])
