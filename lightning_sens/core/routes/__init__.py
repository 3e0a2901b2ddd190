"""Layer routes: from what a layer does to how its per-sample Gram is computed.

:data:`ROUTES` maps layer types to their fast route. A layer takes its type's route only when it
*behaves* like that type: it does not override ``forward`` (ConvNeXt's ``LayerNorm2d`` subclasses
``nn.LayerNorm`` but permutes channels), carries no hooks or parametrisations, and owns no
parameters beyond the type's own. Everything else, and every layer whose calls do not fit a fast
route, takes the generic Jacobian route (docs/engine.md, "Layer routes").
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from lightning_sens.core.routes.base import (
    WEIGHT_LAYERS,
    FastCall,
    LayerGram,
    Method,
    Route,
    RouteResult,
    conv1d_class,
    is_weight_layer,
    norm2,
    weight_rows,
)
from lightning_sens.core.routes.embedding import EmbeddingRoute
from lightning_sens.core.routes.jacobian import JacobianCall, ParamUse, jacobian_route
from lightning_sens.core.routes.norm import NormRoute
from lightning_sens.core.routes.recurrent import RecurrentRoute
from lightning_sens.core.routes.weighted import WeightedRoute

__all__ = [
    "ROUTES",
    "WEIGHT_LAYERS",
    "FastCall",
    "JacobianCall",
    "LayerGram",
    "Method",
    "ParamUse",
    "Route",
    "RouteResult",
    "channel_axes",
    "conv1d_class",
    "fast_route",
    "is_weight_layer",
    "jacobian_route",
    "norm2",
    "weight_rows",
]

ROUTES: dict[type[nn.Module], type[Route]] = {
    nn.Linear: WeightedRoute,
    nn.Conv1d: WeightedRoute,
    nn.Conv2d: WeightedRoute,
    nn.BatchNorm1d: NormRoute,
    nn.BatchNorm2d: NormRoute,
    nn.BatchNorm3d: NormRoute,
    nn.LayerNorm: NormRoute,
    nn.GroupNorm: NormRoute,
    nn.Embedding: EmbeddingRoute,
    nn.LSTM: RecurrentRoute,
    nn.GRU: RecurrentRoute,
    nn.RNN: RecurrentRoute,
}

# Methods a subclass must not override to keep its parent's route.
_BEHAVIOUR = ("forward", "_conv_forward", "_check_input_dim", "flatten_parameters")


def _behaves_like(module: nn.Module, base: type[nn.Module]) -> bool:
    kind = type(module)
    for method in _BEHAVIOUR:
        if getattr(kind, method, None) is not getattr(base, method, None):
            return False
    hooked = module._forward_hooks or module._forward_pre_hooks
    if hooked or parametrize.is_parametrized(module):
        return False
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return False  # renormalises the weight in place during the forward
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return False  # batch statistics even in eval mode (the engine refuses such models)
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if isinstance(module, nn.RNNBase):
        return all(n.split("_")[0] in ("weight", "bias") for n in own)
    return own <= {"weight", "bias"}


def fast_route(module: nn.Module) -> type[Route] | None:
    """The fast route of a layer that behaves like a type in :data:`ROUTES` or like Hugging
    Face's ``Conv1D`` (a Linear stored transposed), else None."""
    hf = conv1d_class(module)
    if hf is not None:
        return WeightedRoute if _behaves_like(module, hf) else None
    for base in type(module).__mro__:
        if base in ROUTES:
            return ROUTES[base] if _behaves_like(module, base) else None
    return None


_CHANNELS: tuple[tuple[tuple[type[nn.Module], ...], dict[str, int]], ...] = (
    (
        (
            nn.Linear,
            nn.modules.conv._ConvNd,
            nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm,
            nn.LayerNorm,
            nn.GroupNorm,
        ),
        {"weight": 0, "bias": 0},
    ),
    ((nn.Embedding,), {"weight": 1}),
)


def channel_axes(module: nn.Module) -> dict[str, int] | None:
    """The output-channel axis of each trainable parameter of a layer, or None.

    Channel scaling multiplies the slice c of every trainable parameter along this axis by ω_c
    (docs/method.md, "Families computed"). For Linear, convolutions and affine norms this is
    the same as scaling output channel c; it is defined in parameter space so that a layer that
    lays out its output differently (channels last, permuted) gets the same family. Transposed
    convolutions, whose weight puts output channels on axis 1 per group, have none.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    trainable = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    if conv1d_class(module) is not None:  # weight (in, out): the output channel is axis 1
        axes = {"weight": 1, "bias": 0}
        return {n: axes[n] for n in trainable} if trainable <= set(axes) else None
    for kinds, axes in _CHANNELS:
        if isinstance(module, kinds):
            return {n: axes[n] for n in trainable} if trainable <= set(axes) else None
    return None
