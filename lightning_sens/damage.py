"""Per-layer damage: what the metric of the perturbation manifold predicts, and what happens.

FI normalises the metric G away; G itself says how much a perturbation of a given size changes
the prediction. For a perturbation ε of the parameters of layer l, to second order,

    KL(p(θ) ‖ p(θ + ε)) ≈ ½ εᵀ G_l ε,        so   E[KL] ≈ ½ Σ_i σ_i² (G_l)_ii

for independent zero-mean errors of variances σ_i². The engine gives tr(G_l) per sample and, for
Linear and convolution layers, the trace over each output channel's weights, from the backward
products it already runs for FI: every prediction here is free once
:func:`~lightning_sens.sensitivity` has run (docs/damage.md, "What the metric predicts").

Perturbations (the same definitions in :func:`predict_damage` and :func:`measure_damage`):

- ``noise`` ρ: ε ~ N(0, σ² I) on all the layer's trainable parameters, σ = ρ · rms(θ_l);
- ``quant`` (b, per_channel): the weight of a Linear/Conv layer rounded to b-bit symmetric levels
  (:func:`quantize`; bias untouched); the prediction uses the actual rounding error's mean
  square in each output channel as σ_c² (≈ Δ_c²/12 for fine steps);
- ``scale`` δ: θ_l → (1 + δ) θ_l, KL ≈ ½ δ² uᵀ H u along the scaling direction u = J θ_l.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_sens.core.inputs import (
    ForwardFn,
    ForwardModule,
    Inputs,
    default_forward,
)
from lightning_sens.core.layout import OutputLayout, canonical_logits, kept_positions
from lightning_sens.core.results import LayerFI, ParameterFI
from lightning_sens.core.routes import conv1d_class, is_weight_layer, weight_rows
from lightning_sens.core.trace import TraceResult

__all__ = [
    "LayerDamage",
    "Perturbation",
    "damage_table",
    "measure_damage",
    "output_divergence",
    "predict_damage",
    "quantization_error",
    "quantize",
]


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of a layer's parameters (see the module docstring).

    Attributes:
        kind: ``"noise"``, ``"quant"`` or ``"scale"``.
        size: ρ for noise, the number of bits for quant, δ for scale.
        per_channel: quant only: one step per output channel instead of one per tensor.
    """

    kind: Literal["noise", "quant", "scale"]
    size: float
    per_channel: bool = False

    @property
    def label(self) -> str:
        """What the perturbation is, in words, e.g. "4-bit weights (per channel)"."""
        if self.kind == "noise":
            return f"noise {self.size:g} x rms"
        if self.kind == "scale":
            return f"scale by 1 + {self.size:g}"
        return (
            f"{int(self.size)}-bit weights ({'per channel' if self.per_channel else 'per tensor'})"
        )


@dataclass(frozen=True)
class LayerDamage:
    """Predicted damage of perturbing one layer: expected KL(p(θ) ‖ p(θ + ε)), mean over samples.

    Attributes:
        layer: the layer's name in ``model.named_modules()``.
        parameters: the number of trainable parameters of the layer.
        metric: mean over samples of tr(G_l).
        predicted: perturbation → expected KL (nats per sample). Quantisation entries exist for
            Linear and convolution layers whose per-channel weight metric the engine computed.
    """

    layer: str
    parameters: int
    metric: float
    predicted: dict[Perturbation, float] = field(default_factory=dict)

    @property
    def noise(self) -> dict[float, float]:
        """ρ → expected KL under relative Gaussian noise."""
        return {p.size: kl for p, kl in self.predicted.items() if p.kind == "noise"}

    @property
    def quant(self) -> dict[tuple[int, bool], float]:
        """(bits, per_channel) → expected KL under weight quantisation."""
        return {
            (int(p.size), p.per_channel): kl
            for p, kl in self.predicted.items()
            if p.kind == "quant"
        }

    @property
    def scale(self) -> dict[float, float]:
        """δ → expected KL under scaling by 1 + δ."""
        return {p.size: kl for p, kl in self.predicted.items() if p.kind == "scale"}


def _step(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    levels = 2 ** (bits - 1) - 1
    if levels < 1:
        raise ValueError(f"bits must be at least 2 for symmetric quantisation, got {bits}.")
    w = weight.detach()
    top = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax().expand(w.shape[0])
    step = top / levels
    return step.where(step > 0, 1.0).reshape(-1, *([1] * (w.dim() - 1)))


def quantize(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Symmetric uniform quantisation: W → Δ · round(W / Δ), Δ = max|W| / (2^(b−1) − 1).

    The levels are −(2^(b−1) − 1) … 2^(b−1) − 1 (zero exact, symmetric), the usual scheme for
    weights; ``per_channel`` takes max|W| over each output channel (dim 0) instead of the tensor.
    """
    step = _step(weight, bits, per_channel)
    return (weight.detach() / step).round() * step


def quantization_error(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Mean square of the rounding error in each output channel, ``(C,)`` float64."""
    error = quantize(weight, bits, per_channel) - weight.detach()
    return error.to(torch.float64).square().flatten(1).mean(1)


def _trainable(layer: nn.Module) -> list[Tensor]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def predict_damage(
    model: nn.Module,
    parameters: ParameterFI | TraceResult,
    noise: Iterable[float] = (0.1,),
    bits: Iterable[int] = (4, 8),
    scale: Iterable[float] = (0.1,),
) -> dict[str, LayerDamage]:
    """Expected KL of perturbing each layer, from the engine's metric traces (no extra pass).

    Args:
        model: the model the scores were computed on (its current weights give σ and Δ).
        parameters: ``sensitivity(...).parameters`` on the samples to average over, or the
            estimated traces of :func:`~lightning_sens.core.trace.sampled_metric_trace` (large
            outputs; no scaling metric, so no ``scale`` entries).
        noise: relative noise levels ρ (σ = ρ · rms of the layer's trainable parameters).
        bits: quantisation widths; each gives a per-tensor and a per-channel entry.
        scale: relative scalings δ.

    Returns:
        layer name → :class:`LayerDamage`, in the engine's layer order.

    Raises:
        ValueError: ``bits`` asks for quantisation but no Linear/Conv layer carries the
            per-channel weight metric (``sensitivity(..., channel_metric=True)`` computes it).
            Single layers without it (a weight shared across routes) get no quantisation entry,
            with a warning.
    """
    bits = tuple(bits)
    quantisable = [
        name
        for name in parameters.layers
        if is_weight_layer(model.get_submodule(name))
        and model.get_submodule(name).weight.requires_grad
    ]
    missing = [n for n in quantisable if parameters.layers[n].weight_channel_metric is None]
    if bits and quantisable and len(missing) == len(quantisable):
        raise ValueError(
            f"bits={bits} asks for quantisation damage, but no layer carries the per-channel "
            "weight metric: compute the scores with sensitivity(..., channel_metric=True), or "
            "pass bits=()."
        )
    if bits and missing:
        warnings.warn(
            f"No quantisation damage for layers {missing}: their weight is shared with another "
            "layer's route, so its per-channel metric is not known (their noise and scaling "
            "predictions are unaffected).",
            stacklevel=2,
        )
    found = {}
    for name, layer in parameters.layers.items():
        module = model.get_submodule(name)
        tensors = _trainable(module)
        count = sum(t.numel() for t in tensors)
        metric = float(layer.metric.mean())
        predicted: dict[Perturbation, float] = {}
        if count:
            mean_square = sum(float(t.detach().double().square().sum()) for t in tensors) / count
            for rho in noise:
                predicted[Perturbation("noise", rho)] = 0.5 * rho**2 * mean_square * metric
        if isinstance(layer, LayerFI):
            for delta in scale:
                predicted[Perturbation("scale", delta)] = (
                    0.5 * delta**2 * float(layer.scale_metric.mean())
                )
        channel = layer.weight_channel_metric
        if channel is not None and is_weight_layer(module):
            per_channel_metric = channel.mean(0)
            for b in bits:
                for per in (False, True):
                    error = quantization_error(weight_rows(module), b, per)
                    variance = error.to(channel.device)
                    kl = 0.5 * float((variance * per_channel_metric).sum())
                    predicted[Perturbation("quant", b, per)] = kl
        found[name] = LayerDamage(name, count, metric, predicted)
    return found


def _perturbed(
    module: nn.Module, perturbation: Perturbation, generator: torch.Generator
) -> dict[str, Tensor]:
    """The layer's parameters after one draw of the perturbation (names local to the layer)."""
    own = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if perturbation.kind == "scale":
        return {n: p * (1 + perturbation.size) for n, p in own.items()}
    if perturbation.kind == "quant":
        if not is_weight_layer(module) or "weight" not in own:
            raise ValueError(
                f"perturbation {perturbation.label!r} quantises the weight of a Linear or "
                f"convolution layer; got a {type(module).__name__}."
            )
        bits = int(perturbation.size)
        if conv1d_class(module) is not None:  # weight (in, out): channels are its columns
            return {"weight": quantize(own["weight"].t(), bits, perturbation.per_channel).t()}
        return {"weight": quantize(own["weight"], bits, perturbation.per_channel)}
    count = sum(p.numel() for p in own.values())
    rms = (sum(float(p.double().square().sum()) for p in own.values()) / max(count, 1)) ** 0.5
    sigma = perturbation.size * rms
    return {
        n: p + sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        for n, p in own.items()
    }


@torch.no_grad()
def measure_damage(
    model: nn.Module,
    inputs: Inputs,
    layer: str,
    perturbation: Perturbation,
    forward_fn: ForwardFn | None = None,
    draws: int = 8,
    seed: int = 0,
    layout: OutputLayout | None = None,
    mask: Tensor | None = None,
) -> float:
    """Measured mean KL(p(θ) ‖ p(θ + ε)) over ``inputs`` when layer ``layer`` is perturbed.

    The model is left untouched (the perturbed parameters are substituted with
    ``torch.func.functional_call``) and evaluated in eval mode; noise is averaged over ``draws``
    draws. KL is computed in float64 from the logits. With a ``layout`` of many positions
    (:func:`~lightning_sens.core.layout.read_layout`), a sample's KL is the sum over its
    positions that count (``mask``; a causal language model's last position left out), as the
    metric's trace adds them up (:func:`~lightning_sens.core.trace.sampled_metric_trace`).
    """
    module = model.get_submodule(layer)
    wrapper = ForwardModule(model, forward_fn or default_forward)
    was_training = model.training
    model.eval()
    try:
        clean = wrapper(inputs)
        generator = torch.Generator().manual_seed(seed)
        runs = draws if perturbation.kind == "noise" else 1
        total = 0.0
        prefix = f"model.{layer}." if layer else "model."
        for _ in range(runs):
            changed = {
                prefix + n: t for n, t in _perturbed(module, perturbation, generator).items()
            }
            moved = functional_call(wrapper, changed, (inputs,))
            total += output_divergence(clean, moved, layout, mask)
        return total / runs
    finally:
        model.train(was_training)


def output_divergence(
    clean: Tensor, moved: Tensor, layout: OutputLayout | None = None, mask: Tensor | None = None
) -> float:
    """Mean over samples of KL(p ‖ p') between two outputs of the same inputs, in float64:
    over the classes of one prediction per sample, or summed over the positions that count
    (a softmax per position, or a Bernoulli per sigmoid)."""
    before = canonical_logits(clean.to(torch.float64), layout)
    after = canonical_logits(moved.to(torch.float64), layout)
    if before.dim() == 3:  # (B, P, K): a softmax per position
        log_p, log_q = torch.log_softmax(before, -1), torch.log_softmax(after, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:  # (B, P): one Bernoulli per entry
        p, log_p1, log_p0 = torch.sigmoid(before), -F.softplus(-before), -F.softplus(before)
        log_q1, log_q0 = -F.softplus(-after), -F.softplus(after)
        kl = p * (log_p1 - log_q1) + (1 - p) * (log_p0 - log_q0)
    keep = kept_positions((kl.shape[0], kl.shape[1]), layout, mask, kl.device)
    return float((kl * keep).sum(-1).mean())


def damage_table(
    predicted: dict[str, LayerDamage],
    measured: Callable[[str, Perturbation], float] | None = None,
) -> list[dict[str, object]]:
    """Rows for a report: one per layer and perturbation, with the measured KL when asked."""
    rows: list[dict[str, object]] = []
    for name, layer in predicted.items():
        for perturbation, kl in layer.predicted.items():
            row: dict[str, object] = {
                "layer": name,
                "parameters": layer.parameters,
                "perturbation": perturbation.label,
                "predicted_kl": kl,
            }
            if measured is not None:
                row["measured_kl"] = measured(name, perturbation)
            rows.append(row)
    return rows
