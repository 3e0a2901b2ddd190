"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) as linear maps applied at every time step.

Every weight of a recurrent layer enters through a linear map: the input projection
a^ih_t = W_ih x_t + b_ih of each step, the recurrent projection a^hh_t = W_hh h_{t−1} + b_hh, and
for an LSTM with ``proj_size`` the output projection W_hr h_t. The layer's fused kernel hides those
pre-activations, so the engine's forward hook recomputes the layer step by step from the same
parameters, checks that the result equals the layer's own output, and hands the rest of the
network this unrolled output. The backward products then reach each pre-activation, and each
weight's per-sample Gram follows as for a Linear layer applied at T positions (PatchGram), without
per-sample gradients (docs/engine.md, "Layer routes").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sens.core.routes.base import LayerGram, Route, RouteResult
from lightning_sens.core.routes.weighted import PatchGram

__all__ = ["LinearUse", "RecurrentRoute", "Unrolled", "unroll"]


@dataclass
class LinearUse:
    """One weight of the layer applied at T positions: pre = inputs · weightᵀ + bias.

    Attributes:
        weight, bias: the parameters' names in the layer (bias None when the layer has none).
        inputs: ``(B, T, d)``.
        held: the pre-activations ``(B, T, p)``, or T tensors ``(B, p)`` (one per step).
    """

    weight: str
    bias: str | None
    inputs: Tensor
    held: list[Tensor]


@dataclass
class Unrolled:
    """The recomputed layer: its output (as the layer returns it) and every linear use."""

    output: Any
    uses: list[LinearUse]

    @property
    def held(self) -> list[Tensor]:
        return [t for use in self.uses for t in use.held]

    def replay(self, tensors: dict[str, Tensor]) -> list[Tensor]:
        """Every held pre-activation recomputed from ``tensors`` (the certificate's pull-back)."""
        out = []
        for use in self.uses:
            bias = tensors[use.bias] if use.bias is not None else None
            pre = F.linear(use.inputs, tensors[use.weight], bias)
            out += [pre] if len(use.held) == 1 else list(pre.unbind(1))
        return out


def _cell(kind: type[nn.Module], nonlinearity: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """One step of the recurrence from the two pre-activations (PyTorch's equations)."""

    def lstm(a_ih: Tensor, a_hh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        i, f, g, o = (a_ih + a_hh).chunk(4, -1)
        assert c is not None
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def gru(a_ih: Tensor, a_hh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, None]:
        ir, iz, i_n = a_ih.chunk(3, -1)
        hr, hz, h_n = a_hh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None

    def rnn(a_ih: Tensor, a_hh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, None]:
        pre = a_ih + a_hh
        return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)), None

    return lstm if kind is nn.LSTM else gru if kind is nn.GRU else rnn


def unroll(module: nn.RNNBase, x: Tensor, tensors: dict[str, Tensor]) -> Unrolled:
    """Recompute ``module(x)`` (no initial state, eval mode) step by step from ``tensors``."""
    lstm = isinstance(module, nn.LSTM)
    cell = _cell(type(module), getattr(module, "nonlinearity", "tanh"))
    seq = x if module.batch_first else x.transpose(0, 1)  # (B, T, d)
    B, T = seq.shape[:2]
    hidden = module.hidden_size
    projected = getattr(module, "proj_size", 0) or 0
    size = projected or hidden
    directions = 2 if module.bidirectional else 1
    uses: list[LinearUse] = []
    finals_h, finals_c = [], []
    layer_input = seq
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            bias = module.bias
            inputs = layer_input.flip(1) if direction else layer_input
            a_ih = F.linear(inputs, tensors[f"weight_ih{suffix}"], tensors.get(f"bias_ih{suffix}"))
            bias_ih = f"bias_ih{suffix}" if bias else None
            uses.append(LinearUse(f"weight_ih{suffix}", bias_ih, inputs, [a_ih]))
            h = seq.new_zeros(B, size)
            c = seq.new_zeros(B, hidden) if lstm else None
            previous, held_hh, raw, held_hr, steps = [], [], [], [], []
            for t in range(T):
                previous.append(h)
                a_hh = F.linear(h, tensors[f"weight_hh{suffix}"], tensors.get(f"bias_hh{suffix}"))
                held_hh.append(a_hh)
                h, c = cell(a_ih[:, t], a_hh, h, c)
                if projected:
                    raw.append(h)
                    h = F.linear(h, tensors[f"weight_hr{suffix}"])
                    held_hr.append(h)
                steps.append(h)
            uses.append(
                LinearUse(
                    f"weight_hh{suffix}",
                    f"bias_hh{suffix}" if bias else None,
                    torch.stack(previous, 1),
                    held_hh,
                )
            )
            if projected:
                uses.append(LinearUse(f"weight_hr{suffix}", None, torch.stack(raw, 1), held_hr))
            out = torch.stack(steps, 1)
            outputs.append(out.flip(1) if direction else out)
            finals_h.append(h)
            if c is not None:
                finals_c.append(c)
        layer_input = torch.cat(outputs, -1) if directions == 2 else outputs[0]
    output = layer_input if module.batch_first else layer_input.transpose(0, 1)
    h_n = torch.stack(finals_h)
    state: Any = (h_n, torch.stack(finals_c)) if lstm else h_n
    return Unrolled((output, state), uses)


class RecurrentRoute(Route):
    """``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` called without an initial state on padded (not
    packed) batches; their calls carry an :class:`Unrolled` record in ``FastCall.extra``."""

    method = "recurrent"

    @staticmethod
    def unroll_call(
        module: nn.Module, args: tuple[Any, ...], tensors: dict[str, Tensor]
    ) -> Unrolled:
        """What the engine's forward hook runs in place of the layer's fused kernel."""
        assert isinstance(module, nn.RNNBase)
        return unroll(module, args[0], tensors)

    def prepare(self) -> None:
        named = self.module.named_parameters(recurse=False)
        self.trainable = {n for n, p in named if p.requires_grad}
        self.parts: list[tuple[LinearUse, PatchGram, Tensor | None]] = []
        for call in self.calls:
            for use in call.extra.uses:
                # detached: the unrolled forward's graph must not reach the results
                inputs = use.inputs.detach().to(self.dtype).unsqueeze(1)  # (B, 1, T, d)
                p = int(call.tensors[use.weight].shape[0])
                train_weight = use.weight in self.trainable
                train_bias = use.bias is not None and use.bias in self.trainable
                grams = PatchGram(inputs, p, train_weight, train_bias, self.num_cotangents)
                bias = call.tensors[use.bias].detach() if use.bias is not None else None
                self.parts.append((use, grams, bias))
        self.scales: list[Tensor] = []

    def add(self, backprops: list[Tensor]) -> None:
        position = 0
        scale = None
        for use, grams, bias in self.parts:
            found = backprops[position : position + len(use.held)]
            position += len(use.held)
            g = (found[0] if len(found) == 1 else torch.stack(found, 1)).to(self.dtype)
            grams.add(g.unsqueeze(1))
            # ∂⟨g, pre⟩/∂ω of θ → ωθ on the trainable parts of pre = W·in + b
            pre = torch.stack(use.held, 1) if len(use.held) > 1 else use.held[0]
            pre = pre.detach()
            total = (g * pre.to(self.dtype)).flatten(1).sum(-1)
            from_bias = (g.sum(1) * bias.to(self.dtype)).sum(-1) if bias is not None else 0.0
            part = (total - from_bias) * float(use.weight in self.trainable)
            if use.bias is not None and use.bias in self.trainable:
                part = part + from_bias
            scale = part if scale is None else scale + part
        assert scale is not None  # a recurrent layer has at least one linear use
        self.scales.append(scale)

    def result(self) -> RouteResult:
        K1 = len(self.scales)
        gram = sum(grams.gram(K1) for _, grams, _ in self.parts)
        assert isinstance(gram, Tensor)
        scale = torch.stack(self.scales, dim=1).to(torch.float64)
        layer = LayerGram(gram, scale, None, "recurrent", self.theta_norm2())
        return RouteResult({self.name: layer}, gram)
