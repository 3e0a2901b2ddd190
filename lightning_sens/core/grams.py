"""Per-layer Gram matrices of the logits' Jacobian, without per-sample gradients (ENGINE.md).

For a layer with parameters θ and the K' = K − 1 contrast cotangents e_k (rows of Qᵀ), the
per-sample Gram is A[k, l] = ⟨∂(e_kᵀz)/∂θ, ∂(e_lᵀz)/∂θ⟩. Each function below receives what the
forward pass captured (the layer's input and output) and the K' backprops of the layer's output,
``grads`` of shape ``(K', B, *output_shape)``, and returns A of shape ``(B, K', K')``.

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

__all__ = ["LayerGram", "channel_dim", "layer_gram"]

_CHANNEL_FIRST = (
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding)


@dataclass(frozen=True)
class LayerGram:
    """What one backward pass yields for one layer, per sample, in the contrast basis.

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


def _pair_gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Sum over all trailing dims of a_k ⊙ b_l: ``(K', B, ...) -> (B, K', K')``."""
    a = a.flatten(2)
    b = a if b is None else b.flatten(2)
    return torch.einsum("kbn,lbn->bkl", a, b)


def _weight_gram(inputs: Tensor, grads: Tensor) -> tuple[Tensor, str]:
    """Gram of a weight shared over T positions: out_t = W in_t (+ b), per group.

    Args:
        inputs: ``(B, G, T, d)`` unfolded layer inputs.
        grads: ``(K', B, G, T, p)`` backprops of the outputs.

    Direct: Γ_k = Σ_t g_ktᵀ in_t, A = ⟨Γ_k, Γ_l⟩ (memory K'·B·G·p·d). Ghost: A = Σ_{t,s}
    (in_t·in_s)(g_kt·g_ls) (memory B·G·T²). Ghost is chosen when 2T² ≤ p·d.
    """
    T, d, p = inputs.shape[2], inputs.shape[3], grads.shape[-1]
    if T == 1:
        norms = inputs.square().sum((-1, -2))  # (B, G)
        return torch.einsum(
            "bg,kbgp,lbgp->bkl", norms, grads[:, :, :, 0], grads[:, :, :, 0]
        ), "linear"
    if p * d >= 2 * T * T:
        overlap = inputs @ inputs.transpose(-1, -2)  # (B, G, T, T)
        mixed = torch.einsum("bgts,lbgsp->lbgtp", overlap, grads)
        return _pair_gram(grads, mixed), "ghost"
    per_sample = torch.einsum("kbgtp,bgtd->kbgpd", grads, inputs)
    return _pair_gram(per_sample), "direct"


def _linear_gram(module: nn.Linear, x: Tensor, grads: Tensor) -> tuple[Tensor, str]:
    K1, B = grads.shape[:2]
    inputs = x.reshape(B, 1, -1, module.in_features)
    g = grads.reshape(K1, B, 1, -1, module.out_features)
    gram = torch.zeros(B, K1, K1, dtype=grads.dtype, device=grads.device)
    method = "linear"
    if module.weight.requires_grad:
        gram, method = _weight_gram(inputs, g)
    if module.bias is not None and module.bias.requires_grad:
        gram = gram + _pair_gram(g.sum(3))
    return gram, method


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


def _conv_gram(module: nn.Conv1d | nn.Conv2d, x: Tensor, grads: Tensor) -> tuple[Tensor, str]:
    K1, B, C_out = grads.shape[:3]
    G = module.groups
    g = grads.reshape(K1, B, G, C_out // G, -1).transpose(-1, -2)  # (K', B, G, T, p)
    gram = torch.zeros(B, K1, K1, dtype=grads.dtype, device=grads.device)
    method = "direct"
    if module.weight.requires_grad:
        gram, method = _weight_gram(_unfold_conv(module, x), g)
    if module.bias is not None and module.bias.requires_grad:
        gram = gram + _pair_gram(g.sum(3))
    return gram, method


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


def _norm_gram(module: nn.Module, x: Tensor, grads: Tensor) -> tuple[Tensor, Tensor, str]:
    """Affine norms: y = γ ⊙ x̂ + β; dγ_k = Σ g_k ⊙ x̂, dβ_k = Σ g_k over the shared positions.

    Returns the Gram of the trainable ones among (γ, β), and the channel-scaling derivatives
    ``(B, K', C)``: scaling output channel c scales γ_c x̂ + β_c, so u_kc = γ_c dγ_kc + β_c dβ_kc.
    """
    if isinstance(module, nn.LayerNorm):
        shared = tuple(range(2, grads.dim() - len(module.normalized_shape)))
    else:
        shared = tuple(range(3, grads.dim()))
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    x_hat = _normalized(module, x.to(grads.dtype))
    d_weight = (grads * x_hat).sum(shared) if shared else grads * x_hat
    d_bias = grads.sum(shared) if shared else grads
    gram = torch.zeros(
        grads.shape[1], grads.shape[0], grads.shape[0], dtype=grads.dtype, device=grads.device
    )
    channel = torch.zeros_like(d_bias)
    if weight is not None:
        channel = channel + d_weight * weight.detach().to(grads.dtype)
        if weight.requires_grad:
            gram = gram + _pair_gram(d_weight)
    else:
        channel = channel + d_weight
    if bias is not None:
        channel = channel + d_bias * bias.detach().to(grads.dtype)
        if bias.requires_grad:
            gram = gram + _pair_gram(d_bias)
    return gram, channel.flatten(2).permute(1, 0, 2), "norm"


def _embedding_gram(module: nn.Embedding, idx: Tensor, grads: Tensor) -> tuple[Tensor, str]:
    """Rows of the table receive the sum of the backprops of the positions that look them up:
    A = Σ_{t,s} [idx_t = idx_s] ⟨g_kt, g_ls⟩ (positions with ``padding_idx`` get no gradient)."""
    K1, B = grads.shape[:2]
    idx = idx.reshape(B, -1)
    g = grads.reshape(K1, B, idx.shape[1], -1)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(grads.dtype)
    if module.padding_idx is not None:
        valid = (idx != module.padding_idx).to(grads.dtype)
        same = same * valid.unsqueeze(2) * valid.unsqueeze(1)
    mixed = torch.einsum("bts,lbsd->lbtd", same, g)
    return _pair_gram(g, mixed), "embedding"


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


def _per_sample_gradients(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: dict[str, Tensor],
    grads: Tensor,
) -> Tensor:
    """Generic exact fallback: per-sample gradients of ⟨g_k, output⟩ via torch.func.

    Returns ``(K', B, P)`` with P the number of the layer's trainable parameters.
    """
    B = grads.shape[1]
    batched, rebuild = _split_batched(args, B)

    def sample_gradient(g: Tensor, *values: Tensor) -> dict[str, Tensor]:
        sample_args = rebuild(*(v.unsqueeze(0) for v in values))
        return grad(
            lambda p: (functional_call(module, p, sample_args, kwargs) * g.unsqueeze(0)).sum()
        )(params)

    none = (None,) * len(batched)
    per_sample = vmap(vmap(sample_gradient), in_dims=(0, *none))(grads, *(args[i] for i in batched))
    return torch.cat([per_sample[name].flatten(2) for name in params], dim=2)


def _is_homogeneous(module: nn.Module) -> bool:
    """True when the output is linear in all of the layer's parameters jointly (all trainable)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    return isinstance(module, (*kinds, nn.modules.batchnorm._BatchNorm)) and all(
        p.requires_grad for p in module.parameters(recurse=False)
    )


def layer_gram(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor, grads: Tensor
) -> LayerGram:
    """Gram, scaling derivatives and method for one layer; see :class:`LayerGram`.

    Args:
        module: the layer (its direct trainable parameters form the block).
        args, kwargs: what the layer was called with in the captured forward pass.
        output: the layer's output in that pass, ``(B, *out)``.
        grads: ``(K', B, *out)`` backprops of the K' contrast cotangents.
    """
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    x = args[0] if args else None
    gram: Tensor | None
    channel_scale: Tensor | None = None
    if isinstance(module, nn.Linear) and x is not None and not kwargs:
        gram, method = _linear_gram(module, x.to(grads.dtype), grads)
    elif isinstance(module, nn.Conv1d | nn.Conv2d) and x is not None and not kwargs:
        gram, method = _conv_gram(module, x.to(grads.dtype), grads)
    elif (
        isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm)
        and x is not None
        and not kwargs
    ):
        gram, channel_scale, method = _norm_gram(module, x, grads)
    elif isinstance(module, nn.Embedding) and x is not None and not kwargs:
        gram, method = _embedding_gram(module, x, grads)
    else:
        gram, method = None, "torch.func"
    cdim = channel_dim(module)
    if (
        cdim is not None and channel_scale is None
    ):  # ∂out/∂ω_c of out[channel c] → ω_c out[channel c] is out[channel c]
        moved = (grads * output.to(grads.dtype)).movedim(cdim if cdim < 0 else cdim + 1, 2)
        channel_scale = moved.reshape(*moved.shape[:3], -1).sum(-1).permute(1, 0, 2)  # (B, K', C)
    if gram is None or channel_scale is None or not _is_homogeneous(module):
        flat = _per_sample_gradients(module, args, kwargs, params, grads)  # (K', B, P)
        gram = _pair_gram(flat) if gram is None else gram
        # ∂⟨g_k, out⟩/∂ω of θ → ωθ is ⟨∂⟨g_k, out⟩/∂θ, θ⟩
        theta = torch.cat([p.reshape(-1) for p in params.values()]).to(flat.dtype)
        scale = (flat @ theta).T
    else:  # θ → ωθ scales every output channel alike: the sum of the channel derivatives
        scale = channel_scale.sum(-1)
    return LayerGram(gram=gram, scale=scale, channel_scale=channel_scale, method=method)
