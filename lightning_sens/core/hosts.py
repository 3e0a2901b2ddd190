"""The Jacobian routes of one engine call: through each host module, and through the whole model.

Layers without a fast route get their Grams from per-sample Jacobians of the smallest module
that holds all uses of their parameters (a *host*), replayed from the calls recorded in the
forward pass, or of the whole model (docs/engine.md, "The Jacobian route"). A route that fails
raises :class:`~lightning_sens.core.validation.UnsupportedLayerError` or, with
``on_unsupported="skip"``, leaves its layers out with the reason.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.capture import Captured
from lightning_sens.core.certificate import HostShare
from lightning_sens.core.inputs import Inputs, batch_size
from lightning_sens.core.plan import Ownership, Plan
from lightning_sens.core.replay import host_calls, model_call
from lightning_sens.core.routes import (
    WEIGHT_LAYERS,
    JacobianCall,
    ParamUse,
    RouteResult,
    channel_axes,
    jacobian_route,
)
from lightning_sens.core.runner import Runner
from lightning_sens.core.validation import UnsupportedLayerError

__all__ = ["JacobianRoutes", "OnUnsupported"]

OnUnsupported = Literal["raise", "skip"]


class JacobianRoutes:
    """The Jacobian routes of one :func:`~lightning_sens.core.engine.sensitivity` call.

    Args:
        model, runner: the model and how it is run.
        layers: the monitored layers.
        ownership: which layer owns which parameter.
        on_unsupported: "raise" or "skip" a layer whose Jacobian route fails.
        skipped: where skipped layers are recorded (layer → reason); shared with the caller.
    """

    def __init__(
        self,
        model: nn.Module,
        runner: Runner,
        layers: dict[str, nn.Module],
        ownership: Ownership,
        on_unsupported: OnUnsupported,
        skipped: dict[str, str],
    ) -> None:
        self.model = model
        self.runner = runner
        self.layers = layers
        self.ownership = ownership
        self.on_unsupported = on_unsupported
        self.skipped = skipped
        self.param_ids = {ownership.canonical[id(p)]: id(p) for p in model.parameters()}

    def uses(self, params: list[str], host: str | None) -> list[ParamUse]:
        """How each parameter enters the route: its key under ``host``, its tensor, its layers
        with their channel axes, and the layers whose weight it is."""
        uses = []
        for p in params:
            layers, weight_of = {}, []
            for layer in self.layers:
                if p in self.ownership.layer_params[layer]:
                    module = self.layers[layer]
                    axes = channel_axes(module)
                    local = next(
                        n
                        for n, t in module.named_parameters(recurse=False)
                        if id(t) == self.param_ids[p]
                    )
                    layers[layer] = None if axes is None else axes[local]
                    if isinstance(module, WEIGHT_LAYERS) and local == "weight":
                        weight_of.append(layer)
            key = p if host is None else self.ownership.key_under(p, host, self.param_ids)
            uses.append(ParamUse(key, self.runner.tensor(p), layers, tuple(weight_of)))
        return uses

    def run(
        self,
        plan: Plan,
        records: dict[str, list[Captured]],
        host_grads: dict[tuple[str, int, int], list[Tensor]],
        inputs: Inputs,
        Q: Tensor,
        dtype: torch.dtype,
    ) -> tuple[list[RouteResult], list[HostShare]]:
        """Every host's route and the whole-model route; their shares for the certificate."""
        batch = batch_size(inputs)
        results, shares = [], []
        for host, hp in plan.hosts.items():
            grads = {(i, j): g for (h, i, j), g in host_grads.items() if h == host}
            calls = host_calls(
                self.model.get_submodule(host),
                records[host],
                hp.in_dims,
                hp.out_dims,
                grads,
                self.runner.host_state(host),
            )
            uses = self.uses(hp.params, host)
            found = self._route(calls, uses, batch, host)
            if found is not None:
                results.append(found[0])
                shares.append(
                    HostShare(
                        {p: found[1][u.key] for p, u in zip(hp.params, uses, strict=True)},
                        {p: list(u.layers) for p, u in zip(hp.params, uses, strict=True)},
                    )
                )
        if plan.root:
            call = model_call(self.runner, inputs, Q, dtype)
            found = self._route([call], self.uses(plan.root, None), batch, None)
            if found is not None:
                results.append(found[0])
        return results, shares

    def _route(
        self, calls: list[JacobianCall], uses: list[ParamUse], batch: int, host: str | None
    ) -> tuple[RouteResult, dict[str, Tensor]] | None:
        """A Jacobian route's result and summed Jacobians; a failure raises or skips its layers."""
        try:
            result, sums, _ = jacobian_route(calls, uses, batch)
        except Exception as error:
            layers = sorted({layer for use in uses for layer in use.layers})
            where = "the whole model" if host is None else f"module {host!r}"
            message = (
                f"Per-sample Jacobians through {where} failed ({type(error).__name__}: {error}). "
                f"Leave the layers out with exclude_layers={layers!r}."
            )
            if self.on_unsupported == "raise":
                raise UnsupportedLayerError(message) from error
            for layer in layers:
                self.skipped[layer] = message
            return None
        return result, sums
