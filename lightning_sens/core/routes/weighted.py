"""Linear and convolution layers: out = W · patch + b at every position (docs/derivations.md,
"A weight applied at several positions").

For a layer with unfolded input U (T positions × d) and the backprop G_k (T × p) of its output
for cotangent k, the per-sample weight gradient is Γ_k = G_kᵀ U and the bias gradient Σ_t G_k.
A layer called several times in one forward pass (shared weights) contributes the positions of
every call: they are concatenated along T, which gives the cross terms between calls for free.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sens.core.frame import MetricFrame
from lightning_sens.core.routes.base import (
    FastCall,
    Features,
    LayerGram,
    Route,
    RouteResult,
    conv1d_class,
)

__all__ = ["PatchGram", "WeightedRoute", "unfold_conv"]


def unfold_conv(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of a 1-d/2-d convolution's input: ``(B, G, T, C_in/G · kernel)``."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding: tuple[int, ...] = (0,) * len(module.kernel_size)
    else:
        padding = tuple(module.padding)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        padding = (0, *padding)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    B, G = x.shape[0], module.groups
    return patches.reshape(B, G, -1, patches.shape[-1]).transpose(-1, -2)


class PatchGram:
    """The per-sample Gram of one weight (and bias) applied to patches: out = W · patch + b.

    Args:
        inputs: the unfolded inputs ``(B, G, T, d)`` (groups, positions, patch size).
        out_per_group: p, the output channels per group.
        train_weight, train_bias: which of the two are in the family.
        num_cotangents: K'.

    Picks, by counted multiply-adds, between the "linear" form (one position per sample), the
    "direct" form (per-sample weight gradients) and the "ghost" form (⟨G_k, UUᵀ G_l⟩, cheaper
    when there are few positions and many weights).
    """

    def __init__(
        self,
        inputs: Tensor,
        out_per_group: int,
        train_weight: bool,
        train_bias: bool,
        num_cotangents: int,
    ) -> None:
        self.inputs = inputs
        self.train_weight, self.train_bias = train_weight, train_bias
        _, G, T, d = inputs.shape
        p, K1 = out_per_group, num_cotangents
        # Multiply-adds, with float64 work (every Gram contraction, the whole ghost route)
        # counted twice: it runs at about half the float32 rate.
        self.costs = {
            "linear": G * (2 * K1 * K1 * p + d),
            "direct": G * (K1 * T * p * d + 2 * K1 * K1 * p * d),
            "ghost": 2 * G * (T * T * d + K1 * T * T * p + K1 * K1 * T * p),
        }
        self.method: Literal["linear", "direct", "ghost"] = "direct"
        if T == 1:
            self.method = "linear"
        elif self.costs["ghost"] < self.costs["direct"] and train_weight:
            self.method = "ghost"
        # ghost keeps G_k as (B, G, T, K', p); the others their per-sample gradients
        self.features = Features(num_cotangents, axis=2 if self.method == "ghost" else 0)
        self.bias_features = Features(num_cotangents)

    def add(self, grouped: Tensor) -> None:
        """The next cotangent's backprop of the output, ``(B, G, T, p)``."""
        if self.method == "linear":
            self.features.put(grouped[:, :, 0])
        elif self.method == "ghost":
            self.features.put(grouped)
        elif self.train_weight:
            self.features.put(torch.einsum("bgtp,bgtd->bgpd", grouped, self.inputs))
        if self.train_bias and self.method != "linear":  # "linear" folds the bias in
            self.bias_features.put(grouped.sum(2))

    def weight_metric(self, frame: MetricFrame) -> Tensor | None:
        """tr(G) per output channel of the weight alone, ``(B, G·p)``, or None if it is frozen.

        Every cotangent's features are rotated by the metric factor W (Qᵀ H Q = Wᵀ W), so the
        per-channel trace is a sum of squares of per-sample gradients (or, on the ghost route,
        ⟨G̃_j, UUᵀ G̃_j⟩ per channel), at the cost of the Gram itself.
        """
        found = self.features.buffer
        if found is None or not self.train_weight:
            return None
        W = frame.factor.to(found.device)
        B = self.inputs.shape[0]
        if self.method == "linear":  # (B, K', G, p): ‖a‖² Σ_j (Σ_k W_jk g_k)²
            norms = self.inputs.to(torch.float64).square().sum((-1, -2))  # (B, G)
            rotated = torch.einsum("bjk,bkgp->bjgp", W, found)
            per_channel = norms.unsqueeze(-1) * rotated.square().sum(1)
        elif self.method == "ghost":  # (B, G, T, K', p)
            rotated = torch.einsum("bjk,bgtkp->bgtjp", W, found)
            inputs = self.inputs.to(torch.float64)
            overlap = inputs @ inputs.transpose(-1, -2)  # (B, G, T, T)
            mixed = (overlap @ rotated.flatten(3)).view(rotated.shape)
            per_channel = (rotated * mixed).sum((2, 3))
        else:  # direct: (B, K', G, p, d)
            rotated = torch.einsum("bjk,bkgpd->bjgpd", W, found)
            per_channel = rotated.square().sum((1, -1))
        return per_channel.reshape(B, -1)

    def gram(self, num_added: int) -> Tensor:
        """``(B, K', K')`` float64 Gram of the weight and bias in the family."""
        B = self.inputs.shape[0]
        gram = torch.zeros(B, num_added, num_added, dtype=torch.float64, device=self.inputs.device)
        found = self.features.buffer
        if self.method == "linear" and found is not None:
            # one position: A = (‖a‖² [weight] + 1 [bias]) ⟨g_k, g_l⟩
            inputs = self.inputs.to(torch.float64)
            norms = inputs.square().sum((-1, -2)) * float(self.train_weight)
            norms = norms + float(self.train_bias)  # (B, G)
            gram = torch.einsum("bg,bkgp,blgp->bkl", norms, found, found)
        elif self.method == "ghost" and found is not None:
            inputs = self.inputs.to(torch.float64)
            overlap = inputs @ inputs.transpose(-1, -2)  # (B, G, T, T)
            mixed = overlap @ found.flatten(3)  # (B, G, T, K'·p)
            gram = torch.einsum("bgtkp,bgtlp->bkl", found, mixed.view(found.shape))
        elif found is not None:
            gram = self.features.gram()
        if self.bias_features.buffer is not None:
            gram = gram + self.bias_features.gram()
        return gram


class WeightedRoute(Route):
    """``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (grouped and depthwise included), and
    Hugging Face's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``: the Gram of its
    weight is the same, its output channels are the weight's columns)."""

    def prepare(self) -> None:
        module = self.module
        transposed = conv1d_class(module) is not None
        self.linear = isinstance(module, nn.Linear) or transposed
        self.channel_dim = -1 if self.linear else 1
        self.groups = 1 if self.linear else int(module.groups)  # type: ignore[arg-type]
        self.train_weight = bool(module.weight.requires_grad)
        bias = getattr(module, "bias", None)
        self.train_bias = isinstance(bias, Tensor) and bias.requires_grad
        patches = [self._patches(call.x.to(self.dtype)) for call in self.calls]
        inputs = patches[0] if len(patches) == 1 else torch.cat(patches, dim=2)
        p = int(self.calls[0].tensors["weight"].shape[1 if transposed else 0]) // self.groups
        K1 = self.num_cotangents
        self.grams = PatchGram(inputs, p, self.train_weight, self.train_bias, K1)
        self.method = self.grams.method
        self.channels: list[Tensor] = []

    def _patches(self, x: Tensor) -> Tensor:
        if self.linear:
            return x.reshape(x.shape[0], 1, -1, x.shape[-1])
        return unfold_conv(self.module, x)  # type: ignore[arg-type]

    def _grouped(self, g: Tensor) -> Tensor:
        """Output backprop as ``(B, G, T, p)``, matching the unfolded inputs."""
        B = g.shape[0]
        if self.linear:
            return g.reshape(B, 1, -1, g.shape[-1])
        return g.reshape(B, self.groups, g.shape[1] // self.groups, -1).transpose(-1, -2)

    def _channel(self, g: Tensor, call: FastCall) -> Tensor:
        """∂⟨g, out⟩/∂ω_c for θ[c] → ω_c θ[c] on the trainable parameters: ``(B, C)``."""
        B, C = g.shape[0], g.shape[self.channel_dim]

        def per_channel(t: Tensor) -> Tensor:
            return t.movedim(self.channel_dim, 1).reshape(B, C, -1).sum(-1)

        total = per_channel(g * call.output.to(self.dtype))  # out = W·patch + b
        bias = call.tensors.get("bias")
        if bias is None:
            return total if self.train_weight else torch.zeros_like(total)
        from_bias = per_channel(g) * bias.to(self.dtype)
        channel = total - from_bias if self.train_weight else torch.zeros_like(total)
        return channel + from_bias if self.train_bias else channel

    def add(self, backprops: list[Tensor]) -> None:
        gs = [g if g.dtype == self.dtype else g.to(self.dtype) for g in backprops]
        parts = [self._grouped(g) for g in gs]
        self.grams.add(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        per_call = [self._channel(g, c) for g, c in zip(gs, self.calls, strict=True)]
        self.channels.append(torch.stack(per_call).sum(0) if len(per_call) > 1 else per_call[0])

    def weight_metric(self, frame: MetricFrame) -> Tensor | None:
        return self.grams.weight_metric(frame)

    def result(self) -> RouteResult:
        gram = self.grams.gram(len(self.channels))
        channel = torch.stack(self.channels, dim=1).to(torch.float64)  # (B, K', C)
        layer = LayerGram(gram, channel.sum(-1), channel, self.method, self.theta_norm2())
        return RouteResult({self.name: layer}, gram)
