"""How the engine runs a model: exactly, in at least float32, with parameters it can differentiate.

A bfloat16 or float16 model is evaluated with float32 copies of its parameters and buffers
(substituted with ``torch.func.functional_call``; the model itself is untouched), because Jacobians
and rank decisions in bfloat16 are wrong by orders of magnitude (docs/engine.md, "Numerics").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_sens.core.inputs import ForwardFn, ForwardModule, Inputs, default_forward, to_dtype

__all__ = ["Runner"]


def _compute_dtype(model: nn.Module) -> torch.dtype:
    dtype = torch.float32
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and torch.finfo(t.dtype).bits > torch.finfo(dtype).bits:
            dtype = t.dtype
    return dtype


class Runner:
    """Runs ``forward_fn(model, inputs)`` in the compute dtype and returns what gives the logits.

    Attributes:
        dtype: float32, or float64 when the model has float64 parameters.
        state: full-name → tensor substitutes (parameters and buffers in ``dtype``) when some of
            the model's tensors have a lower precision; None when the model runs as it is.
    """

    def __init__(self, model: nn.Module, forward_fn: ForwardFn | None) -> None:
        self.model = model
        self.forward_fn = forward_fn or default_forward
        self.wrapper = ForwardModule(model, self.forward_fn)
        self.dtype = _compute_dtype(model)
        self.parameters = dict(model.named_parameters())
        floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self.state: dict[str, Tensor] | None = None
        if any(t.dtype != self.dtype for t in floating):
            self.state = {
                n: p.detach().to(self.dtype).requires_grad_(p.requires_grad)
                for n, p in model.named_parameters()
            }
            self.state.update(
                {
                    n: b.to(self.dtype) if b.is_floating_point() else b
                    for n, b in model.named_buffers()
                }
            )

    def inputs(self, inputs: Inputs) -> Inputs:
        """Floating inputs of lower precision than the compute dtype, cast up."""
        return to_dtype(inputs, self.dtype)

    def tensor(self, name: str) -> Tensor:
        """The tensor the forward pass uses for parameter ``name`` (its full name)."""
        return self.state[name] if self.state is not None else self.parameters[name]

    def __call__(self, inputs: Inputs, params: dict[str, Tensor] | None = None) -> Any:
        """The model's logits (or its raw output, when no logits can be found in it).

        ``params`` (full names) replaces those parameters, for per-sample Jacobians.
        """
        if self.state is None and params is None:
            return self.wrapper(inputs)
        state = self.state or {}
        if params is not None:  # a replay for Jacobians: nothing else is differentiated
            state = {k: v.detach() for k, v in state.items()}
        substitutes = {f"model.{k}": v for k, v in state.items()}
        substitutes.update({f"model.{k}": v for k, v in (params or {}).items()})
        return functional_call(self.wrapper, substitutes, (inputs,))

    def host_state(self, host: str) -> dict[str, Tensor]:
        """Substitutes for the tensors of module ``host``, named relative to it (empty when the
        model runs as it is)."""
        if self.state is None:
            return {}
        prefix = f"{host}." if host else ""
        return {k[len(prefix) :]: v.detach() for k, v in self.state.items() if k.startswith(prefix)}
