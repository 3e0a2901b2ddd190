"""What every layer route shares: the captured call, the per-layer Gram, and the route interface.

A *route* turns what one forward pass and the K' = K − 1 backward products recorded for a module
into per-sample Gram matrices of that module's parameters (docs/engine.md, "Layer routes"). Fast
routes use a formula for a known layer type; the Jacobian route works for any module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.frame import MetricFrame

__all__ = [
    "WEIGHT_LAYERS",
    "FastCall",
    "Features",
    "LayerGram",
    "Method",
    "Route",
    "RouteResult",
    "conv1d_class",
    "is_weight_layer",
    "norm2",
    "weight_rows",
]

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` is what quantisation rounds (output channel on axis 0); Hugging
Face's ``Conv1D`` too (:func:`is_weight_layer`), whose weight is stored transposed."""


def conv1d_class(module: nn.Module) -> type | None:
    """Hugging Face's ``Conv1D`` among the module's classes, or None: GPT-2's linear layer,
    ``x @ W + b`` with W stored ``(in, out)``. Found by name, so that transformers is not
    imported for models that do not use it."""
    for base in type(module).__mro__:
        if base.__name__ == "Conv1D" and base.__module__.startswith("transformers"):
            return base
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """Whether quantisation rounds the layer's ``weight``: :data:`WEIGHT_LAYERS` and
    Hugging Face's ``Conv1D``."""
    return isinstance(module, WEIGHT_LAYERS) or conv1d_class(module) is not None


def weight_rows(module: nn.Module) -> Tensor:
    """The layer's weight with its output channels on axis 0 (a view: ``Conv1D``'s
    transposed)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.t() if conv1d_class(module) is not None else weight


Method = Literal[
    "linear", "direct", "ghost", "norm", "embedding", "recurrent", "jacobian", "unused"
]
"""How a layer's Gram was computed (docs/engine.md, "Layer routes"):

- ``"linear"``: a Linear layer applied once per sample, A = (‖a‖² + 1)⟨g_k, g_l⟩;
- ``"direct"``: per-sample weight gradients Γ_k = G_kᵀU of a Linear/Conv layer, then ⟨Γ_k, Γ_l⟩;
- ``"ghost"``: the same Gram as ⟨G_k, (UUᵀ) G_l⟩ without forming Γ_k (cheaper for few positions);
- ``"norm"``: the affine parameters of BatchNorm (eval), LayerNorm and GroupNorm;
- ``"embedding"``: an Embedding's rows, from per-token backprops;
- ``"recurrent"``: LSTM, GRU and RNN weights as linear maps applied at every time step;
- ``"jacobian"``: per-sample parameter Jacobians with torch.func, for any other module;
- ``"unused"``: the parameters do not reach the logits, so every FI of the layer is exactly 0.
"""


@dataclass
class FastCall:
    """One call of a layer on a fast route, batch dimension first.

    Attributes:
        x: the layer's input ``(B, ...)``.
        output: the layer's output ``(B, ...)``.
        tensors: the layer's parameters and buffers as the call saw them (``weight``, ``bias``,
            ``running_mean``, ...), so that an upcast copy of a low-precision model is used.
        extra: what a route recorded during the call itself (the unrolled steps of an RNN).
    """

    x: Tensor
    output: Tensor
    tensors: dict[str, Any] = field(default_factory=dict)
    extra: Any = None


@dataclass(frozen=True)
class LayerGram:
    """What the backward products yield for one layer's parameters, per sample, in contrast basis.

    Attributes:
        gram: ``(B, K', K')`` Gram of the Jacobian of the contrasts w.r.t. the layer's trainable
            parameters (weight and bias together), float64.
        scale: ``(B, K')`` derivative of the contrasts along θ_l → ω θ_l at ω = 1.
        channel_scale: ``(B, K', C)`` derivatives along the scalings of output channel c
            (θ_l[c] → ω_c θ_l[c] on the output-channel slice of every parameter), or None for
            layers without a channel notion.
        method: the route that computed ``gram``.
        theta_norm2: ‖θ_l‖², the squared norm of the layer's trainable parameters (0-dim,
            float64). A scaling direction whose effect ‖J θ_l‖² is below the tolerance times
            trace(gram)·‖θ_l‖² (the most any direction of the same norm can do) is numerically
            null: its FI is reported as 0 with rank 0 (docs/engine.md, "Numerics").
        weight_rows: ``(B, K', C, r)`` float64 Jacobian of the contrasts w.r.t. the weight of a
            Linear/Conv layer, output channel first, where a route has it whole (the Jacobian
            route); gives the per-channel weight metric. None elsewhere.
    """

    gram: Tensor
    scale: Tensor
    channel_scale: Tensor | None
    method: Method
    theta_norm2: Tensor
    weight_rows: Tensor | None = None

    def __add__(self, other: LayerGram) -> LayerGram:
        """Join the contributions of disjoint parameter sets of one layer (Grams add up)."""
        if (self.channel_scale is None) != (other.channel_scale is None):
            raise ValueError("cannot add a Gram with channel scaling to one without")
        channel = None
        if self.channel_scale is not None and other.channel_scale is not None:
            channel = self.channel_scale + other.channel_scale
        method = self.method if self.method == other.method else "jacobian"
        rows = [r for r in (self.weight_rows, other.weight_rows) if r is not None]
        return LayerGram(
            self.gram + other.gram,
            self.scale + other.scale,
            channel,
            method,
            self.theta_norm2 + other.theta_norm2,
            rows[0] if len(rows) == 1 else None,
        )


@dataclass(frozen=True)
class RouteResult:
    """A route's per-layer Grams and the Gram of all distinct parameters it covered.

    ``total`` is what ``ParameterFI.whole`` adds up: a parameter shared by two layers appears in
    both layers' Grams but once in ``total``.
    """

    layers: dict[str, LayerGram]
    total: Tensor


def norm2(tensors: list[Tensor]) -> Tensor:
    """Σ ‖t‖² in float64 (0-dim)."""
    return sum(
        (t.detach().to(torch.float64).square().sum() for t in tensors),
        torch.zeros((), dtype=torch.float64),
    ).to(tensors[0].device if tensors else "cpu")


class Features:
    """Per-sample features of the K' cotangents, copied into float64 as they arrive.

    Gram matrices are always formed in float64, so that a block whose Jacobian is exactly rank
    deficient keeps eigenvalues at float64 rounding level even when the features are float32
    (docs/engine.md, "Numerics"). Writing each cotangent's features into one float64 buffer
    ``(B, *leading, K', *trailing)`` converts them once, without a later stack.

    Args:
        num_cotangents: K'.
        axis: where the cotangent axis goes among the feature's dimensions (after the batch).
    """

    def __init__(self, num_cotangents: int, axis: int = 0) -> None:
        self.num_cotangents = num_cotangents
        self.axis = axis
        self.buffer: Tensor | None = None
        self.count = 0

    def put(self, feature: Tensor) -> None:
        """The next cotangent's features ``(B, ...)``."""
        if self.buffer is None:
            shape = list(feature.shape)
            shape.insert(self.axis + 1, self.num_cotangents)
            self.buffer = feature.new_empty(shape, dtype=torch.float64)
        self.buffer.select(self.axis + 1, self.count).copy_(feature)
        self.count += 1

    def gram(self) -> Tensor:
        """A[b, k, l] = ⟨f_k[b], f_l[b]⟩, ``(B, K', K')`` float64."""
        assert self.buffer is not None  # at least one cotangent was added
        flat = self.buffer.movedim(self.axis + 1, 1)
        flat = flat.reshape(flat.shape[0], flat.shape[1], -1)
        return flat @ flat.transpose(1, 2)


class Route(ABC):
    """Reduces one layer's backprops, one cotangent at a time, to its per-sample Gram.

    Subclasses set :attr:`method` and implement :meth:`prepare` (what the route keeps of the
    recorded calls), :meth:`add` and :meth:`result`. A route owns its state (what it keeps of each
    cotangent); where it has a choice of formulas (direct or ghost), it owns the cost model that
    makes it (:class:`~lightning_sens.core.routes.weighted.PatchGram`).
    """

    method: Method

    def __init__(
        self,
        name: str,
        module: nn.Module,
        calls: list[FastCall],
        num_cotangents: int,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.module = module
        self.calls = calls
        self.num_cotangents = num_cotangents
        self.dtype = dtype
        self.prepare()

    @abstractmethod
    def prepare(self) -> None:
        """Read what the route needs from the recorded calls (``self.calls``)."""

    @abstractmethod
    def add(self, backprops: list[Tensor]) -> None:
        """Take the backprop of every call's output (batch first) for the next cotangent."""

    @abstractmethod
    def result(self) -> RouteResult:
        """The Gram and scaling derivatives from every cotangent added so far."""

    def weight_metric(self, frame: MetricFrame) -> Tensor | None:
        """tr(G) of each output channel's slice of the weight alone, ``(B, C)``, or None.

        The per-channel metric that weight quantisation with per-channel steps needs
        (docs/damage.md, "What the metric predicts"). Routes that cannot split their Gram by
        weight rows return None.
        """
        return None

    def theta_norm2(self) -> Tensor:
        """‖θ_l‖² of the trainable parameters, as the recorded calls saw them."""
        trainable = [n for n, p in self.module.named_parameters(recurse=False) if p.requires_grad]
        return norm2([self.calls[0].tensors[n] for n in trainable])
