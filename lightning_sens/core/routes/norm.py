"""Affine normalisation layers: out = x̂ ⊙ γ + β with x̂ the normalised input
(docs/derivations.md, "Normalisation layers").

The per-sample gradients are dγ_k = Σ_positions G_k ⊙ x̂ and dβ_k = Σ_positions G_k; a layer
called several times adds the contributions of every call. BatchNorm is always evaluated with its
running statistics (eval mode): batch statistics would couple the samples of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sens.core.routes.base import FastCall, Features, LayerGram, Route, RouteResult

__all__ = ["NormRoute"]


def _normalized(module: nn.Module, call: FastCall, dtype: torch.dtype) -> Tensor:
    """x̂: the normalised input that the affine parameters act on."""
    x = call.x.to(dtype)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        mean, var = call.tensors["running_mean"], call.tensors["running_var"]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.to(dtype).reshape(shape)) / torch.sqrt(
            var.to(dtype).reshape(shape) + module.eps
        )
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    assert isinstance(module, nn.GroupNorm)  # the route table admits nothing else
    return F.group_norm(x, module.num_groups, eps=module.eps)


class NormRoute(Route):
    """``nn.BatchNorm1d/2d/3d`` (running statistics), ``nn.LayerNorm`` and ``nn.GroupNorm``."""

    method = "norm"

    def prepare(self) -> None:
        module = self.module
        self.x_hat = [_normalized(module, call, self.dtype) for call in self.calls]
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        self.train_weight = isinstance(weight, Tensor) and weight.requires_grad
        self.train_bias = isinstance(bias, Tensor) and bias.requires_grad
        self.features = Features(self.num_cotangents)
        self.channels: list[Tensor] = []

    def _positions(self, g: Tensor) -> tuple[int, ...]:
        if isinstance(self.module, nn.LayerNorm):
            return tuple(range(1, g.dim() - len(self.module.normalized_shape)))
        return tuple(range(2, g.dim()))

    def add(self, backprops: list[Tensor]) -> None:
        d_weight = d_bias = None
        for g, x_hat in zip(backprops, self.x_hat, strict=True):
            g = g.to(self.dtype)
            shared = self._positions(g)
            dw = (g * x_hat).sum(shared) if shared else g * x_hat
            db = g.sum(shared) if shared else g
            d_weight = dw if d_weight is None else d_weight + dw
            d_bias = db if d_bias is None else d_bias + db
        assert d_weight is not None  # a routed layer ran at least once
        assert d_bias is not None
        tensors = self.calls[0].tensors
        parts, channel = [], torch.zeros_like(d_weight)
        if self.train_weight:
            parts.append(d_weight.flatten(1))
            channel = channel + d_weight * tensors["weight"].to(self.dtype)
        if self.train_bias:
            parts.append(d_bias.flatten(1))
            channel = channel + d_bias * tensors["bias"].to(self.dtype)
        self.features.put(torch.cat(parts, dim=1))
        # the output-channel slice of a norm's parameters is their first axis
        self.channels.append(channel.reshape(channel.shape[0], channel.shape[1], -1).sum(-1))

    def result(self) -> RouteResult:
        gram = self.features.gram()
        channel = torch.stack(self.channels, dim=1).to(torch.float64)
        layer = LayerGram(gram, channel.sum(-1), channel, "norm", self.theta_norm2())
        return RouteResult({self.name: layer}, gram)
