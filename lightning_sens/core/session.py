"""One engine call: plan the routes on the first chunk, then compute every chunk
(docs/engine.md, "Planning and the certificate").

A chunk is one forward pass with the routed layers' calls recorded, the K − 1 backward products
to the perturbed input and to those calls' outputs, the Jacobian routes
(:mod:`lightning_sens.core.hosts`), and the K-space algebra.
On the first chunk a *certificate* checks every route against autograd before any number is
returned: for a random combination r of the cotangents, the gradient that a route's recorded
calls account for must equal the full gradient of the parameters. A route that misses a use of
its parameters (a weight also used functionally elsewhere, a call that bypasses ``__call__``, an
output changed by a hook) fails it and is recomputed through the whole model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.assemble import parameter_result, zero_gram
from lightning_sens.core.capture import (
    Backward,
    Captured,
    backprops,
    capture_calls,
)
from lightning_sens.core.certificate import FastShare, certify
from lightning_sens.core.closed_forms import (
    Target,
    closed_form_fi,
    log_prob_gradient,
    resolve_target,
)
from lightning_sens.core.fi import default_rtol
from lightning_sens.core.frame import contrast_basis, metric_frame
from lightning_sens.core.hosts import JacobianRoutes, OnUnsupported
from lightning_sens.core.input_maps import input_result, layout_of
from lightning_sens.core.inputs import (
    FORWARD_HINT,
    Inputs,
    Perturbed,
    batch_size,
    get,
    replace,
)
from lightning_sens.core.plan import Ownership, Plan, make_plan
from lightning_sens.core.probe import probe, token_reader
from lightning_sens.core.results import SensitivityResult
from lightning_sens.core.routes import FastCall
from lightning_sens.core.routes.base import Route
from lightning_sens.core.runner import Runner
from lightning_sens.core.validation import UnsupportedLayerError, check_logits, check_target

__all__ = ["Session", "fast_routes"]


def fast_routes(
    model: nn.Module,
    plan: Plan,
    records: dict[str, list[Captured]],
    num_cotangents: int,
    dtype: torch.dtype,
) -> dict[str, Route]:
    """The route of every layer on a fast route, fed with its recorded calls (batch first)."""
    return {
        name: spec.route(
            name,
            model.get_submodule(name),
            [
                FastCall(
                    call.args[0].movedim(spec.x_dim, 0),
                    call.held[0].detach().movedim(spec.out_dim, 0),
                    call.tensors,
                    call.extra,
                )
                for call in records[name]
            ],
            num_cotangents,
            dtype,
        )
        for name, spec in plan.fast.items()
    }


class _DemoteError(Exception):
    """Routes that failed a check: recompute their layers through the whole model."""

    def __init__(self, layers: set[str]) -> None:
        super().__init__(sorted(layers))
        self.layers = layers


@dataclass
class _Slot:
    """Where one backward target's backprops go."""

    kind: Literal["input", "fast", "host"]
    name: str = ""
    call: int = 0
    leaf: int = 0


class Session:
    """The state of one :func:`~lightning_sens.core.engine.sensitivity` call across its chunks."""

    def __init__(
        self,
        model: nn.Module,
        runner: Runner,
        layers: dict[str, nn.Module],
        perturbed: Perturbed,
        input_module: str | None,
        want_input: bool,
        windows: tuple[int, ...],
        rtol: float | None,
        backward: Backward,
        on_unsupported: OnUnsupported,
        channel_metric: bool = False,
    ) -> None:
        self.model = model
        self.runner = runner
        self.layers = layers
        self.perturbed = perturbed
        self.requested_input_module = input_module
        self.want_input = want_input and perturbed.kind != "none"
        self.windows = windows
        self.rtol = rtol
        self.backward = backward
        self.channel_metric = channel_metric
        self.ownership = Ownership.of(model, layers)
        self.plan: Plan | None = None
        self.skipped: dict[str, str] = {}
        self.jacobian = JacobianRoutes(
            model, runner, layers, self.ownership, on_unsupported, self.skipped
        )

    # -- planning ----------------------------------------------------------------------------

    def _probe(self, inputs: Inputs) -> None:
        """Two tiny forward passes with every module's calls recorded, then the route plan."""
        probes = probe(self.model, self.runner, self.ownership, inputs)
        input_module = None
        if self.want_input and self.perturbed.kind == "tokens":
            requested = self.requested_input_module
            input_module = token_reader(self.model, probes, self.perturbed.key, requested)
            if input_module is None:
                warnings.warn(
                    "Input FI of token inputs perturbs the output of the embedding that reads "
                    "them, and none was found: no module's forward takes the token ids as its "
                    "first argument exactly once. Pass input_module='<name of the embedding>' "
                    "to sensitivity() (input FI is left out).",
                    stacklevel=4,
                )
                self.want_input = False
        self.plan = make_plan(self.ownership, probes.shapes, probes.unused, input_module)

    # -- one chunk ---------------------------------------------------------------------------

    def run(
        self, inputs: Inputs, target: Target, first: bool, input_target: Target | None = None
    ) -> SensitivityResult:
        if self.plan is None:
            if self.layers or (self.want_input and self.perturbed.kind == "tokens"):
                self._probe(inputs)
            else:  # input FI of a floating input: nothing to plan
                self.plan = Plan()
        assert self.plan is not None
        check = first
        for _ in range(len(self.layers)):  # each round sends at least one layer to the model
            try:
                return self._chunk(inputs, target, check, input_target)
            except _DemoteError as failed:
                self.plan.demote(failed.layers, self.ownership)
                check = False
        try:
            return self._chunk(inputs, target, False, input_target)
        except _DemoteError as failed:  # pragma: no cover (the whole-model route always fits)
            raise UnsupportedLayerError(
                f"The calls of layers {sorted(failed.layers)} change between batches in a way "
                "the engine cannot follow; leave them out with exclude_layers=."
            ) from failed

    def _hooked(self) -> dict[str, nn.Module]:
        assert self.plan is not None
        names = set(self.plan.fast) | set(self.plan.hosts)
        if self.want_input and self.plan.input_module:
            names.add(self.plan.input_module)
        return {name: self.model.get_submodule(name) for name in sorted(names)}

    def _chunk(
        self, raw: Inputs, target: Target, check: bool, input_target: Target | None
    ) -> SensitivityResult:
        plan = self.plan
        assert plan is not None
        inputs = self.runner.inputs(raw)
        B = batch_size(inputs)
        leaf = None
        if self.want_input and self.perturbed.kind == "direct":
            leaf = get(inputs, self.perturbed.key).detach().clone().requires_grad_(True)
            inputs = replace(inputs, self.perturbed.key, leaf.clone())  # in-place ops hit a copy
        unroll = {
            name: spec.route.unroll_call
            for name, spec in plan.fast.items()
            if hasattr(spec.route, "unroll_call")
        }
        with capture_calls(self._hooked(), plan.copy_inputs, unroll) as records:
            logits = self.runner(inputs)
        check_logits(logits, FORWARD_HINT)
        self._check_calls(records, B)
        y = resolve_target(logits, target)
        check_target(y, logits)
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
        c = log_prob_gradient(probs, y)
        closed = closed_form_fi(logits, y)
        frame = metric_frame(probs, c)

        slots, targets = [], []
        if leaf is not None:
            slots.append(_Slot("input"))
            targets.append(leaf)
        elif self.want_input and plan.input_module is not None:
            token = get(inputs, self.perturbed.key).data_ptr()
            calls = [r for r in records[plan.input_module] if r.first_arg == token]
            if len(calls) != 1 or 0 not in calls[0].held:
                raise UnsupportedLayerError(
                    f"{plan.input_module!r} read the token ids once in the probe passes but "
                    f"{len(calls)} times in this batch; pass input_module= to name the embedding "
                    "whose output is the perturbed input."
                )
            slots.append(_Slot("input"))
            targets.append(calls[0].held[0])
        for name in plan.fast:
            for i, call in enumerate(records[name]):
                for leaf_index in sorted(call.held):
                    slots.append(_Slot("fast", name, i, leaf_index))
                    targets.append(call.held[leaf_index])
        for host in plan.hosts:
            for i, call in enumerate(records[host]):
                for leaf_index, held in call.held.items():
                    slots.append(_Slot("host", host, i, leaf_index))
                    targets.append(held)
        if (targets or plan.root) and not logits.requires_grad:
            raise ValueError(
                "Nothing to differentiate: the logits depend on no floating-point input and on "
                "no monitored layer." + FORWARD_HINT
            )

        K = logits.shape[1]
        Q = contrast_basis(K, logits.dtype, logits.device)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        fast = fast_routes(self.model, plan, records, K - 1, dtype)
        input_grads: list[Tensor] = []
        host_grads: dict[tuple[str, int, int], list[Tensor]] = {}

        def consume(found: list[Tensor]) -> None:
            per_fast: dict[str, list[Tensor]] = {name: [] for name in fast}
            for slot, g in zip(slots, found, strict=True):
                if slot.kind == "input":
                    input_grads.append(g)
                elif slot.kind == "fast":
                    per_fast[slot.name].append(g.movedim(plan.fast[slot.name].out_dim, 0))
                else:
                    host_grads.setdefault((slot.name, slot.call, slot.leaf), []).append(g)
            for name, route in fast.items():
                route.add(per_fast[name])

        if targets:
            backprops(logits, targets, Q.T, consume, self.backward, retain_graph=check)
        route_results, shares = self.jacobian.run(plan, records, host_grads, inputs, Q, dtype)
        if check and (fast or shares):
            fast_shares = {
                name: FastShare(self.layers[name], records[name], self.ownership.layer_params[name])
                for name in fast
            }
            params = {p for share in fast_shares.values() for p in share.params}
            params |= {p for share in shares for p in share.sums}
            tensors = {p: self.runner.tensor(p) for p in params}
            failed = certify(logits, Q, fast_shares, shares, tensors)
            if failed:
                raise _DemoteError(failed)
        results = [route.result() for route in fast.values()] + route_results
        weight_metrics = None
        if self.channel_metric:
            weight_metrics = {name: route.weight_metric(frame) for name, route in fast.items()}

        input_part = None
        if input_grads:
            stacked = torch.stack(input_grads)
            from_tokens = self.perturbed.kind == "tokens"
            key = self.perturbed.key
            source = (
                f"output of {plan.input_module!r}"
                if from_tokens
                else (f"inputs[{key!r}]" if key else "inputs")
            )
            layout = layout_of(tuple(stacked.shape[1:]), from_tokens)
            c_input, frame_input = c, frame
            if input_target is not None:  # the same backprops, another label (docs/engine.md,
                # "One forward pass, K − 1 backward products")
                y_input = resolve_target(logits, input_target, "input_target")
                check_target(y_input, logits)
                c_input = log_prob_gradient(probs, y_input)
                frame_input = metric_frame(probs, c_input)
            input_part = input_result(
                stacked,
                probs,
                c_input,
                self.windows,
                self._tol(logits),
                layout,
                source,
                frame_input,
            )
        parameter_part = None
        if self.layers:
            unused = {
                name: zero_gram(self.layers[name], B, K - 1, logits.device) for name in plan.unused
            }
            parameter_part = parameter_result(
                results,
                unused,
                self.layers,
                self.ownership,
                self.skipped,
                probs,
                c,
                self._tol(logits),
                frame,
                weight_metrics,
            )
        return SensitivityResult(y, closed.p_target, closed.log_fi_max, input_part, parameter_part)

    def _tol(self, logits: Tensor) -> float:
        """Every Gram is formed in float64, whatever the model's precision (default_rtol)."""
        return default_rtol(torch.float64) if self.rtol is None else self.rtol

    def _check_calls(self, records: dict[str, list[Captured]], batch: int) -> None:
        """Every routed call carries the batch where the probes said it would."""
        assert self.plan is not None
        bad = set()
        for name, spec in self.plan.fast.items():
            calls = records[name]
            if not calls or any(
                call.mismatch
                or call.args[0].shape[spec.x_dim] != batch
                or call.held[0].shape[spec.out_dim] != batch
                for call in calls
            ):
                bad.add(name)
        for host, hp in self.plan.hosts.items():
            if len(records[host]) != len(hp.out_dims):
                bad |= {
                    layer
                    for layer in self.layers
                    if set(self.ownership.layer_params[layer]) & set(hp.params)
                }
        if bad:
            raise _DemoteError(bad)
