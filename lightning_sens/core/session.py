"""One engine call: plan the routes on the first chunk, then compute every chunk (docs/engine.md).

A chunk is one forward pass with the routed layers' calls recorded, the K − 1 backward products
to the perturbed input and to those calls' outputs, the Jacobian routes, and the K-space algebra.
On the first chunk a *certificate* checks every route against autograd before any number is
returned: for a random combination r of the cotangents, the gradient that a route's recorded
calls account for must equal the full gradient of the parameters. A route that misses a use of
its parameters (a weight also used functionally elsewhere, a call that bypasses ``__call__``, an
output changed by a hook) fails it and is recomputed through the whole model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.capture import (
    Backward,
    Captured,
    backprops,
    capture_calls,
    record_shapes,
)
from lightning_sens.core.certificate import FastShare, HostShare, certify
from lightning_sens.core.fi import (
    Target,
    closed_form_fi,
    contrast_basis,
    default_rtol,
    fi_from_contrast_columns,
    fi_from_contrast_gram,
    log_prob_gradient,
    resolve_target,
)
from lightning_sens.core.input_maps import input_result, layout_of
from lightning_sens.core.inputs import (
    FORWARD_HINT,
    Inputs,
    Perturbed,
    batch_size,
    get,
    input_embedding_name,
    repeat_first,
    replace,
    select,
)
from lightning_sens.core.plan import PROBE_SIZES, Ownership, Plan, batch_dims, make_plan
from lightning_sens.core.replay import host_calls, model_call
from lightning_sens.core.results import LayerFI, ParameterFI, SensitivityResult
from lightning_sens.core.routes import (
    FastCall,
    JacobianCall,
    LayerGram,
    ParamUse,
    RouteResult,
    channel_axes,
    jacobian_route,
    norm2,
)
from lightning_sens.core.runner import Runner
from lightning_sens.core.validation import check_logits, check_target

__all__ = ["OnUnsupported", "Session", "UnsupportedLayerError"]

OnUnsupported = Literal["raise", "skip"]


class UnsupportedLayerError(RuntimeError):
    """A layer whose FI cannot be computed. The message names the layer and what to do."""


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


def _zero_gram(layer: nn.Module, batch: int, K1: int, device: torch.device) -> LayerGram:
    zeros = torch.zeros(batch, K1, K1, dtype=torch.float64, device=device)
    axes = channel_axes(layer)
    channel = None
    if axes:
        name, axis = next(iter(axes.items()))
        size = getattr(layer, name).shape[axis]
        channel = torch.zeros(batch, K1, size, dtype=torch.float64, device=device)
    scale = torch.zeros(batch, K1, dtype=torch.float64, device=device)
    theta = norm2([p for p in layer.parameters(recurse=False) if p.requires_grad])
    return LayerGram(zeros, scale, channel, "unused", theta)


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
        self.on_unsupported = on_unsupported
        self.ownership = Ownership.of(model, layers)
        self.param_ids = {self.ownership.canonical[id(p)]: id(p) for p in model.parameters()}
        self.plan: Plan | None = None
        self.skipped: dict[str, str] = {}

    # -- planning ----------------------------------------------------------------------------

    def _probe(self, inputs: Inputs) -> None:
        """Two tiny forward passes with every module's calls recorded, then the route plan."""
        B = batch_size(inputs)
        one = self.runner.inputs(select(inputs, slice(0, 1), B))
        three = self.runner.inputs(repeat_first(inputs, PROBE_SIZES[1], B))
        try:
            with record_shapes(self.model) as shapes_one:
                self.runner(one)
            with record_shapes(self.model) as shapes_three:
                logits = self.runner(three)
            check_logits(logits, FORWARD_HINT)
        except Exception as error:
            # Say what is wrong with the user's own batch where that is the problem.
            check_logits(self.runner(self.runner.inputs(inputs)), FORWARD_HINT)
            raise UnsupportedLayerError(
                f"The model runs on this batch of {B} but not on {PROBE_SIZES[0]} or "
                f"{PROBE_SIZES[1]} copies of its first sample ({type(error).__name__}: {error}). "
                "Per-sample FI needs a model that treats the samples of a batch independently; "
                "a forward that depends on the batch size cannot be split into samples."
            ) from error
        params = sorted({p for ps in self.ownership.layer_params.values() for p in ps})
        unused = set()
        if params:
            tensors = [self.runner.tensor(p) for p in params]
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
            found = torch.autograd.grad(
                (logits * weights.to(logits)).sum(), tensors, allow_unused=True
            )
            unused = {p for p, g in zip(params, found, strict=True) if g is None}
        input_module = None
        if self.want_input and self.perturbed.kind == "tokens":
            token = get(one, self.perturbed.key).data_ptr()
            input_module = self._input_module(shapes_one, token)
            if input_module is not None:
                # the call that reads the ids must give (B, ...) embeddings
                pairs = zip(shapes_one[input_module], shapes_three[input_module], strict=False)
                chosen = [(a, b) for a, b in pairs if a.first_arg == token]
                dims = batch_dims(*chosen[0]) if len(chosen) == 1 else None
                if dims is None or dims[1][:1] != [0]:
                    input_module = None
            if input_module is None:
                warnings.warn(
                    "Input FI of token inputs perturbs the output of the embedding that reads "
                    "them, and none was found: no module's forward takes the token ids as its "
                    "first argument exactly once. Pass input_module='<name of the embedding>' "
                    "to sensitivity() (input FI is left out).",
                    stacklevel=4,
                )
                self.want_input = False
        self.plan = make_plan(self.ownership, (shapes_one, shapes_three), unused, input_module)

    def _input_module(self, shapes: dict[str, Any], token_ptr: int) -> str | None:
        if self.requested_input_module is not None:
            return self.requested_input_module
        found = input_embedding_name(self.model)
        if found is not None:
            return found
        readers = [
            name
            for name, calls in shapes.items()
            if any(call.first_arg == token_ptr for call in calls)
            and isinstance(self.model.get_submodule(name), nn.Embedding)
        ]
        return readers[0] if len(readers) == 1 else None

    # -- one chunk ---------------------------------------------------------------------------

    def run(self, inputs: Inputs, target: Target, first: bool) -> SensitivityResult:
        if self.plan is None:
            if self.layers or (self.want_input and self.perturbed.kind == "tokens"):
                self._probe(inputs)
            else:  # input FI of a floating input: nothing to plan
                self.plan = Plan()
        assert self.plan is not None
        check = first
        for _ in range(len(self.layers)):  # each round sends at least one layer to the model
            try:
                return self._chunk(inputs, target, check=check)
            except _DemoteError as failed:
                self.plan.demote(failed.layers, self.ownership)
                check = False
        try:
            return self._chunk(inputs, target, check=False)
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

    def _chunk(self, raw: Inputs, target: Target, check: bool) -> SensitivityResult:
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
        fast = {
            name: spec.route(
                name,
                self.model.get_submodule(name),
                [
                    FastCall(
                        call.args[0].movedim(spec.x_dim, 0),
                        call.held[0].detach().movedim(spec.out_dim, 0),
                        call.tensors,
                        call.extra,
                    )
                    for call in records[name]
                ],
                K - 1,
                dtype,
            )
            for name, spec in plan.fast.items()
        }
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
        route_results, shares = self._jacobian_routes(records, host_grads, inputs, Q, dtype)
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
            input_part = input_result(
                stacked, probs, c, self.windows, self._tol(logits), layout, source
            )
        parameter_part = self._parameters(results, probs, c, B, K, logits) if self.layers else None
        return SensitivityResult(y, closed.p_target, closed.log_fi, input_part, parameter_part)

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

    # -- Jacobian routes ---------------------------------------------------------------------

    def _uses(self, params: list[str], host: str | None) -> list[ParamUse]:
        uses = []
        for p in params:
            layers = {}
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
            key = p if host is None else self.ownership.key_under(p, host, self.param_ids)
            uses.append(ParamUse(key, self.runner.tensor(p), layers))
        return uses

    def _jacobian_routes(
        self,
        records: dict[str, list[Captured]],
        host_grads: dict[tuple[str, int, int], list[Tensor]],
        inputs: Inputs,
        Q: Tensor,
        dtype: torch.dtype,
    ) -> tuple[list[RouteResult], list[HostShare]]:
        """Every host's route and the whole-model route; their shares for the certificate."""
        assert self.plan is not None
        batch = batch_size(inputs)
        results, shares = [], []
        for host, hp in self.plan.hosts.items():
            grads = {(i, j): g for (h, i, j), g in host_grads.items() if h == host}
            calls = host_calls(
                self.model.get_submodule(host),
                records[host],
                hp.in_dims,
                hp.out_dims,
                grads,
                self.runner.host_state(host),
            )
            uses = self._uses(hp.params, host)
            found = self._run_jacobian(calls, uses, batch, host)
            if found is not None:
                results.append(found[0])
                shares.append(
                    HostShare(
                        {p: found[1][u.key] for p, u in zip(hp.params, uses, strict=True)},
                        {p: list(u.layers) for p, u in zip(hp.params, uses, strict=True)},
                    )
                )
        if self.plan.root:
            call = model_call(self.runner, inputs, Q, dtype)
            found = self._run_jacobian([call], self._uses(self.plan.root, None), batch, None)
            if found is not None:
                results.append(found[0])
        return results, shares

    def _run_jacobian(
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

    # -- assembling ----------------------------------------------------------------------------

    def _parameters(
        self,
        results: list[RouteResult],
        probs: Tensor,
        c: Tensor,
        batch: int,
        K: int,
        logits: Tensor,
    ) -> ParameterFI:
        assert self.plan is not None
        per_layer: dict[str, LayerGram] = {}
        for result in results:
            for name, gram in result.layers.items():
                per_layer[name] = gram if name not in per_layer else per_layer[name] + gram
        for name in self.plan.unused:
            per_layer[name] = _zero_gram(self.layers[name], batch, K - 1, logits.device)
        names = [n for n in self.layers if n in per_layer and n not in self.skipped]
        grams = [per_layer[n].gram for n in names]
        # a scaling direction is null when its effect is below what any direction of the same
        # norm can do, at the rank tolerance (LayerGram.theta_norm2)
        noise = {
            n: per_layer[n].gram.diagonal(dim1=-2, dim2=-1).sum(-1) * per_layer[n].theta_norm2
            for n in names
        }
        channel_names = [n for n in names if per_layer[n].channel_scale is not None]
        for name in channel_names:
            u = per_layer[name].channel_scale
            assert u is not None
            grams.append(u @ u.transpose(-1, -2))
        total = sum(
            (r.total for r in results),
            torch.zeros(batch, K - 1, K - 1, dtype=torch.float64, device=logits.device),
        )
        grams.append(total)
        tol = self._tol(logits)
        zero = torch.zeros(batch, dtype=torch.float64, device=logits.device)
        floors = [zero] * len(names) + [noise[n] for n in channel_names] + [zero]
        blocks = fi_from_contrast_gram(torch.stack(grams), probs, c, tol, torch.stack(floors))
        scale_fi = None
        if names:
            scales = torch.stack([per_layer[n].scale for n in names]).unsqueeze(-1)
            floor = torch.stack([noise[n] for n in names])
            scale_fi = fi_from_contrast_columns(scales, probs, c, tol, floor)
        channel_fi = {n: blocks[len(names) + i] for i, n in enumerate(channel_names)}
        layers = {
            name: LayerFI(
                parameters=blocks[i],
                scale=scale_fi[i],  # type: ignore[index]
                channel_scale=channel_fi.get(name),
                method=per_layer[name].method,
                shared_with=self.ownership.shared_with(name),
            )
            for i, name in enumerate(names)
        }
        return ParameterFI(layers, blocks[-1], dict(self.skipped))
