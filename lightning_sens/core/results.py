"""Result types of the engine: per-sample FI of input and parameter families."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sens.core.fi import BlockFI

__all__ = ["InputFI", "LayerFI", "ParameterFI", "SensitivityResult", "concat_results"]


@dataclass(frozen=True)
class InputFI:
    """Input perturbations (Setups 1, 3 and 4 of METHOD.md §9), f = log p_y.

    Attributes:
        whole: FI of perturbing every input coordinate, ``(B,)``, with its effective rank; it
            equals (1 − p_y)/p_y exactly when the rank is K − 1 (METHOD.md §5.1).
        maps: window size w = 2s + 1 → FI of perturbing one channel in the w × w window centred on
            each pixel (clipped at the borders), ``(B, C, H, W)``. Empty for non-image inputs.
        pixel_map: FI of perturbing all channels of one pixel together, ``(B, H, W)``; None for
            non-image inputs.
    """

    whole: BlockFI
    maps: dict[int, BlockFI]
    pixel_map: BlockFI | None


@dataclass(frozen=True)
class LayerFI:
    """Parameter perturbations of one layer (Setup 2 and the scaling families), ``(B,)`` each.

    Attributes:
        parameters: FI of perturbing the layer's trainable parameters (weight and bias together).
        scale: FI of scaling them all by one factor, θ_l → ω θ_l, ω0 = 1 (m = 1).
        channel_scale: FI of scaling each output channel by its own factor, all channels jointly
            (rank ≤ min(C, K − 1)); None for layer types without channels.
        method: how the Gram was computed ("linear", "direct", "ghost", "norm", "embedding",
            or "torch.func" for the generic per-sample fallback).
    """

    parameters: BlockFI
    scale: BlockFI
    channel_scale: BlockFI | None
    method: str


@dataclass(frozen=True)
class ParameterFI:
    """Per-layer FI (keys as in ``model.named_modules()``) and all layers' parameters jointly."""

    layers: dict[str, LayerFI]
    all_parameters: BlockFI


@dataclass(frozen=True)
class SensitivityResult:
    """Everything one call of :func:`sensitivity` measured, for a batch of B samples.

    Attributes:
        target: the class y used per sample (the label, or the argmax for ``"pred"``), ``(B,)``.
        p_target: p_y, float64, ``(B,)``.
        log_fi_max: log((1 − p_y)/p_y), the largest FI of any family (log space, exact).
        input: input FI, or None when not requested or the inputs are not floating point.
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
            pixel_map=None
            if first.input.pixel_map is None
            else BlockFI.cat([i.pixel_map for i in ins if i.pixel_map is not None]),
        )
    parameter_result = None
    if first.parameters is not None:
        ps = [p.parameters for p in parts if p.parameters is not None]
        layers = {}
        for name, layer in first.parameters.layers.items():
            chunks = [p.layers[name] for p in ps]
            layers[name] = LayerFI(
                parameters=BlockFI.cat([c.parameters for c in chunks]),
                scale=BlockFI.cat([c.scale for c in chunks]),
                channel_scale=None
                if layer.channel_scale is None
                else BlockFI.cat([c.channel_scale for c in chunks if c.channel_scale is not None]),
                method=layer.method,
            )
        parameter_result = ParameterFI(layers, BlockFI.cat([p.all_parameters for p in ps]))
    return SensitivityResult(
        torch.cat([p.target for p in parts]),
        torch.cat([p.p_target for p in parts]),
        torch.cat([p.log_fi_max for p in parts]),
        input_result,
        parameter_result,
    )
