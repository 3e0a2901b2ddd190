"""Per-layer Gram matrices of the logits' Jacobian, without per-sample gradients (ENGINE.md).

For a layer with parameters θ and the K' = K − 1 contrast cotangents e_k (rows of Qᵀ), the
per-sample Gram is A[k, l] = ⟨∂(e_kᵀz)/∂θ, ∂(e_lᵀz)/∂θ⟩. A :class:`LayerAccumulator` receives
what the forward pass captured (the layer's input and output), then the backprop of the layer's
output for one cotangent at a time, which it reduces at once to what the Gram needs (per-sample
weight gradients Γ_k for the direct route, dγ_k and dβ_k for norms, ...), so that the K' full-size
backprops of all layers never have to be held together.

The same backprops give the scaling families for free (ENGINE.md, "Free by-products"): for a layer
whose output is homogeneous of degree one in its parameters, ∂z/∂ω of θ → ωθ is ⟨g_k, output⟩.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["LayerAccumulator", "LayerGram", "channel_dim"]

_CHANNEL_FIRST = (
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class LayerGram:
    """What the backward passes yield for one layer, per sample, in the contrast basis.

    Attributes:
        gram: ``(B, K', K')`` Gram of the layer's trainable parameters.
        scale: ``(B, K')`` derivative of the contrasts along θ_l → ω θ_l at ω = 1.
        channel_scale: ``(B, K', C)`` derivatives along output-channel scalings, or None for
            layer types without a channel notion.
        method: how ``gram`` was computed: "linear", "direct", "ghost", "norm", "embedding"
            or "torch.func" (the generic per-sample fallback).
    """

    gram: Tensor
    scale: Tensor
    channel_scale: Tensor | None
    method: str


def channel_dim(module: nn.Module) -> int | None:
    """Output dimension that indexes channels for channel scaling (None: not defined)."""
    if isinstance(module, _CHANNEL_FIRST):
        return 1
    if isinstance(module, _CHANNEL_LAST):
        return -1
    return None


def _gram(features: list[Tensor]) -> Tensor:
    """A[b, k, l] = ⟨f_k[b], f_l[b]⟩ for per-cotangent features ``(B, ...)``."""
    stacked = torch.stack([f.reshape(f.shape[0], -1) for f in features])
    return torch.einsum("kbn,lbn->bkl", stacked, stacked)


def _unfold_conv(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
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


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    """x̂: the normalised input that the affine parameters multiply (eval-mode statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"BatchNorm layer without running statistics (track_running_stats=False) uses "
                f"batch statistics even in eval mode, so per-sample FI is undefined: {module}."
            )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    raise TypeError(f"not a normalisation layer: {type(module).__name__}")


def _split_batched(
    args: tuple[Any, ...], batch: int
) -> tuple[list[int], Callable[..., tuple[Any, ...]]]:
    """Which positional args carry the batch, and a function that rebuilds args from them."""
    batched = [
        i
        for i, a in enumerate(args)
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch
    ]

    def rebuild(*values: Any) -> tuple[Any, ...]:
        full = list(args)
        for i, v in zip(batched, values, strict=True):
            full[i] = v
        return tuple(full)

    return batched, rebuild


def _is_homogeneous(module: nn.Module) -> bool:
    """True when the output is linear in all of the layer's parameters jointly (all trainable)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    return isinstance(module, (*kinds, nn.modules.batchnorm._BatchNorm)) and all(
        p.requires_grad for p in module.parameters(recurse=False)
    )


def _per_sample_gradients(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: dict[str, Tensor],
    g: Tensor,
) -> Tensor:
    """Generic exact fallback: per-sample gradients of ⟨g, output⟩ via torch.func, ``(B, P)``."""
    batched, rebuild = _split_batched(args, g.shape[0])

    def sample_gradient(g_i: Tensor, *values: Tensor) -> dict[str, Tensor]:
        sample_args = rebuild(*(v.unsqueeze(0) for v in values))
        return grad(
            lambda p: (functional_call(module, p, sample_args, kwargs) * g_i.unsqueeze(0)).sum()
        )(params)

    per_sample = vmap(sample_gradient)(g, *(args[i] for i in batched))
    return torch.cat([per_sample[name].flatten(1) for name in params], dim=1)


class LayerAccumulator:
    """Reduces one layer's backprops, one cotangent at a time, to its Gram and scaling terms.

    Args:
        module: the layer; its direct trainable parameters form the block.
        args, kwargs: what the layer was called with in the captured forward pass.
        output: the layer's output in that pass, ``(B, *out)``.
        num_cotangents: K', to choose between the direct and ghost routes by cost.
        dtype: the dtype to compute in (at least float32).
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor,
        num_cotangents: int,
        dtype: torch.dtype,
    ) -> None:
        self.module, self.args, self.kwargs = module, args, kwargs
        self.output = output.to(dtype)
        self.dtype = dtype
        self.params = {
            n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad
        }
        self.features: list[Tensor] = []
        self.bias_features: list[Tensor] = []
        self.scales: list[Tensor] = []
        self.channels: list[Tensor] = []
        self.cdim = channel_dim(module)
        self.homogeneous = _is_homogeneous(module)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        self.train_weight = isinstance(weight, Tensor) and weight.requires_grad
        self.train_bias = isinstance(bias, Tensor) and bias.requires_grad
        x = args[0] if args and not kwargs else None
        self.method = "torch.func"
        if isinstance(x, Tensor) and isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            self._prepare_weighted(x.to(dtype), num_cotangents)
        elif isinstance(x, Tensor) and isinstance(module, _NORMS):
            self.method = "norm"
            self.x_hat = _normalized(module, x.to(dtype))
        elif isinstance(x, Tensor) and isinstance(module, nn.Embedding):
            self.method = "embedding"
            self.tokens = x.reshape(x.shape[0], -1)

    def _prepare_weighted(self, x: Tensor, K1: int) -> None:
        """Unfold the input into per-position patches and pick the cheaper Gram route."""
        B, module = x.shape[0], self.module
        if isinstance(module, nn.Linear):
            self.inputs = x.reshape(B, 1, -1, module.in_features)
            self.groups = 1
        else:
            assert isinstance(module, nn.Conv1d | nn.Conv2d)  # the caller checked
            self.inputs = _unfold_conv(module, x)
            self.groups = module.groups
        _, G, T, d = self.inputs.shape
        p = (
            self.output.shape[-1]
            if isinstance(self.module, nn.Linear)
            else self.output.shape[1] // G
        )
        direct_cost = K1 * T * p * d + K1 * K1 * p * d
        ghost_cost = T * T * d + K1 * T * T * p + K1 * K1 * T * p
        if T == 1:
            self.method = "linear"
        elif ghost_cost < direct_cost and self.train_weight:
            self.method = "ghost"
        else:
            self.method = "direct"

    def _grouped(self, g: Tensor) -> Tensor:
        """Output backprop as ``(B, G, T, p)``, matching the unfolded inputs."""
        B = g.shape[0]
        if isinstance(self.module, nn.Linear):
            return g.reshape(B, 1, -1, self.module.out_features)
        G = self.groups
        return g.reshape(B, G, g.shape[1] // G, -1).transpose(-1, -2)

    def add(self, g: Tensor) -> None:
        """Take the backprop ``(B, *out)`` of the layer's output for the next cotangent."""
        g = g.to(self.dtype)
        channel = None
        if self.method in ("linear", "direct", "ghost"):
            grouped = self._grouped(g)
            if self.method == "linear":
                self.features.append(grouped[:, :, 0])
            elif self.method == "ghost":
                self.features.append(grouped)
            elif self.train_weight:
                self.features.append(torch.einsum("bgtp,bgtd->bgpd", grouped, self.inputs))
            if self.train_bias and self.method != "linear":  # "linear" folds the bias in
                self.bias_features.append(grouped.sum(2))
        elif self.method == "norm":
            shared = self._norm_positions(g)
            d_weight = (g * self.x_hat).sum(shared) if shared else g * self.x_hat
            d_bias = g.sum(shared) if shared else g
            trainable = [
                d for d, keep in ((d_weight, self.train_weight), (d_bias, self.train_bias)) if keep
            ]
            self.features.append(torch.cat([d.flatten(1) for d in trainable], dim=1))
            weight, bias = getattr(self.module, "weight", None), getattr(self.module, "bias", None)
            channel = d_weight * weight.to(self.dtype) if weight is not None else d_weight
            if bias is not None:
                channel = channel + d_bias * bias.to(self.dtype)
            channel = channel.flatten(1)
        elif self.method == "embedding":
            self.features.append(g.reshape(g.shape[0], self.tokens.shape[1], -1))
        if self.cdim is not None and channel is None:
            # ∂out/∂ω_c of out[channel c] → ω_c out[channel c] is out[channel c]
            moved = (g * self.output).movedim(self.cdim, 1)
            channel = moved.reshape(*moved.shape[:2], -1).sum(-1)
        if channel is not None:
            self.channels.append(channel)
        flat = None
        if self.method == "torch.func" or not self.homogeneous or channel is None:
            flat = _per_sample_gradients(self.module, self.args, self.kwargs, self.params, g)
            if self.method == "torch.func":
                self.features.append(flat)
        if flat is None:  # θ → ωθ scales every output channel alike
            assert channel is not None  # homogeneous layers all have channels
            self.scales.append(channel.sum(-1))
        else:  # ∂⟨g, out⟩/∂ω of θ → ωθ is ⟨∂⟨g, out⟩/∂θ, θ⟩
            theta = torch.cat([p.reshape(-1) for p in self.params.values()]).to(flat.dtype)
            self.scales.append(flat @ theta)

    def _norm_positions(self, g: Tensor) -> tuple[int, ...]:
        if isinstance(self.module, nn.LayerNorm):
            return tuple(range(1, g.dim() - len(self.module.normalized_shape)))
        return tuple(range(2, g.dim()))

    def result(self) -> LayerGram:
        """The layer's Gram and scaling derivatives from all cotangents added so far."""
        B = self.output.shape[0]
        K1 = len(self.scales)
        gram = torch.zeros(B, K1, K1, dtype=self.dtype, device=self.output.device)
        if self.method == "linear" and self.features:
            # one position: A = (‖a‖² [weight] + 1 [bias]) ⟨g_k, g_l⟩
            norms = self.inputs.square().sum((-1, -2)) * float(self.train_weight)
            norms = norms + float(self.train_bias)  # (B, G)
            stacked = torch.stack(self.features)  # (K', B, G, p)
            gram = torch.einsum("bg,kbgp,lbgp->bkl", norms, stacked, stacked)
        elif self.method == "ghost":
            overlap = self.inputs @ self.inputs.transpose(-1, -2)  # (B, G, T, T)
            stacked = torch.stack(self.features)  # (K', B, G, T, p)
            mixed = torch.einsum("bgts,lbgsp->lbgtp", overlap, stacked)
            gram = torch.einsum("kbgtp,lbgtp->bkl", stacked, mixed)
        elif self.method == "embedding":
            same = (self.tokens.unsqueeze(2) == self.tokens.unsqueeze(1)).to(self.dtype)
            padding = getattr(self.module, "padding_idx", None)
            if padding is not None:
                valid = (self.tokens != padding).to(self.dtype)
                same = same * valid.unsqueeze(2) * valid.unsqueeze(1)
            stacked = torch.stack(self.features)  # (K', B, T, d)
            mixed = torch.einsum("bts,lbsd->lbtd", same, stacked)
            gram = torch.einsum("kbtd,lbtd->bkl", stacked, mixed)
        elif self.features:  # direct, norm, torch.func: plain per-sample feature vectors
            gram = _gram(self.features)
        if self.bias_features:
            gram = gram + _gram(self.bias_features)
        channel = torch.stack(self.channels, dim=1) if self.channels else None  # (B, K', C)
        return LayerGram(gram, torch.stack(self.scales, dim=1), channel, self.method)
