"""Which route computes each layer's Gram, planned once per engine call (docs/engine.md,
"Planning and the certificate").

Two tiny probe passes (the first sample alone, then three copies of it) reveal every module
call's structure and which dimension of each tensor carries the batch. A layer takes its fast
route when it behaves like a known type and each of its calls maps one batched tensor to one
batched tensor. The parameters of every other layer go to the Jacobian route of a *host*: the
nearest module enclosing all their owners whose calls carry the batch cleanly, or, failing that,
the whole model. A certificate on the first chunk (:func:`lightning_sens.core.engine`) checks that
each route saw every use of its parameters and demotes any that did not to the whole model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.utils._pytree as pytree
from torch import nn

from lightning_sens.core.capture import CallShape
from lightning_sens.core.routes import Route, fast_route

__all__ = ["FastPlan", "HostPlan", "Ownership", "Plan", "batch_dims", "make_plan"]

PROBE_SIZES = (1, 3)
_SINGLE_ARG = pytree.tree_flatten(((0,), {}))[1]
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass(frozen=True)
class FastPlan:
    """A layer on a fast route; ``x_dim``/``out_dim``: the batch dimension of its input/output."""

    route: type[Route]
    x_dim: int
    out_dim: int


@dataclass
class HostPlan:
    """Parameters whose Jacobians are taken through a host module's calls.

    ``in_dims``/``out_dims``: per call, the batch dimension of each input/output leaf (None for
    leaves that do not carry the batch).
    """

    params: list[str]
    in_dims: list[list[int | None]]
    out_dims: list[list[int | None]]


@dataclass
class Ownership:
    """Which modules own which parameters (a parameter shared by two modules has two owners)."""

    layers: dict[str, nn.Module]  # the monitored layers
    canonical: dict[int, str]  # id(parameter) → its first name in the model
    names: dict[int, list[str]]  # id(parameter) → every name it has
    layer_params: dict[str, list[str]]  # layer → canonical names of its trainable parameters
    owners: dict[str, list[str]]  # canonical name → every module owning it directly

    @staticmethod
    def of(model: nn.Module, layers: dict[str, nn.Module]) -> Ownership:
        names: dict[int, list[str]] = defaultdict(list)
        for name, p in model.named_parameters(remove_duplicate=False):
            names[id(p)].append(name)
        canonical = {key: found[0] for key, found in names.items()}
        owners: dict[str, list[str]] = defaultdict(list)
        for module_name, module in model.named_modules():
            for p in dict.fromkeys(module.parameters(recurse=False)):
                owners[canonical[id(p)]].append(module_name)
        layer_params = {
            name: list(
                dict.fromkeys(
                    canonical[id(p)] for p in module.parameters(recurse=False) if p.requires_grad
                )
            )
            for name, module in layers.items()
        }
        return Ownership(layers, canonical, dict(names), layer_params, dict(owners))

    def shared_with(self, layer: str) -> tuple[str, ...]:
        """The other monitored layers that own one of this layer's parameters."""
        others = {
            owner
            for p in self.layer_params[layer]
            for owner in self.owners[p]
            if owner != layer and owner in self.layers
        }
        return tuple(sorted(others))

    def key_under(self, canonical: str, host: str, param_ids: dict[str, int]) -> str:
        """The parameter's name relative to ``host`` (for the host's functional_call)."""
        prefix = f"{host}." if host else ""
        for name in self.names[param_ids[canonical]]:
            if name.startswith(prefix):
                return name[len(prefix) :]
        raise KeyError(f"{canonical!r} is not reachable from {host!r}")


@dataclass
class Plan:
    """Routes of every monitored layer for one engine call."""

    fast: dict[str, FastPlan] = field(default_factory=dict)
    hosts: dict[str, HostPlan] = field(default_factory=dict)
    root: list[str] = field(default_factory=list)
    unused: set[str] = field(default_factory=set)
    input_module: str | None = None
    copy_inputs: set[str] = field(default_factory=set)

    def demote(self, layers: set[str], ownership: Ownership) -> None:
        """Send every parameter of ``layers`` to the whole-model route (certificate failures)."""
        moved: list[str] = []
        for layer in layers:
            if layer in self.fast:
                del self.fast[layer]
                moved += ownership.layer_params[layer]
        for host, hp in list(self.hosts.items()):
            if any(p in hp.params for layer in layers for p in ownership.layer_params[layer]):
                moved += hp.params
                del self.hosts[host]
        self.root = list(dict.fromkeys(self.root + moved))
        _absorb(self)


def _leaf_dim(one: tuple[int, ...] | None, three: tuple[int, ...] | None) -> int | bool | None:
    """The batch dim of one leaf (None: not batched); False when the shapes cannot be explained."""
    if one is None or three is None:
        return None if one is None and three is None else False
    if one == three:
        return None
    if len(one) != len(three):
        return False
    changed = [d for d in range(len(one)) if one[d] != three[d]]
    if (
        len(changed) == 1
        and one[changed[0]] == PROBE_SIZES[0]
        and three[changed[0]] == PROBE_SIZES[1]
    ):
        return changed[0]
    return False


def batch_dims(
    one: CallShape, three: CallShape
) -> tuple[list[int | None], list[int | None]] | None:
    """Batch dims of a call's input and output leaves, or None when they do not track the batch."""
    if one.in_spec != three.in_spec or one.out_spec != three.out_spec:
        return None
    found = []
    for shapes in ((one.in_shapes, three.in_shapes), (one.out_shapes, three.out_shapes)):
        dims = [_leaf_dim(a, b) for a, b in zip(*shapes, strict=True)]
        if any(d is False for d in dims):
            return None
        found.append([d if isinstance(d, int) and not isinstance(d, bool) else None for d in dims])
    return found[0], found[1]


def _calls(
    probes: tuple[dict[str, list[CallShape]], dict[str, list[CallShape]]], name: str
) -> list[tuple[CallShape, CallShape]] | None:
    ones, threes = probes[0].get(name, []), probes[1].get(name, [])
    if not ones or len(ones) != len(threes):
        return None
    return list(zip(ones, threes, strict=True))


def _host_dims(
    probes: tuple[dict[str, list[CallShape]], dict[str, list[CallShape]]], name: str
) -> tuple[list[list[int | None]], list[list[int | None]]] | None:
    """Batch dims of a module's calls if it can host Jacobians: every floating output batched."""
    calls = _calls(probes, name)
    if calls is None:
        return None
    ins, outs = [], []
    for one, three in calls:
        dims = batch_dims(one, three)
        if dims is None:
            return None
        floating_outs = [d for d, f in zip(dims[1], one.out_floating, strict=True) if f]
        if not floating_outs or any(d is None for d in floating_outs):
            return None
        ins.append(dims[0])
        outs.append(dims[1])
    return ins, outs


def _recurrent_dims(
    module: nn.RNNBase, calls: list[tuple[CallShape, CallShape]]
) -> tuple[int, int] | None:
    """An RNN called on a padded batch without an initial state; the route's pre-activations
    are batch first."""
    expected = 0 if module.batch_first else 1
    for one, three in calls:
        dims = batch_dims(one, three)
        if dims is None or one.in_spec != _SINGLE_ARG or len(one.in_shapes[0] or ()) != 3:
            return None
        if dims[0] != [expected] or dims[1][0] != expected:
            return None
    return expected, 0


def _fast_dims(
    module: nn.Module, calls: list[tuple[CallShape, CallShape]]
) -> tuple[int, int] | None:
    if isinstance(module, nn.RNNBase):
        return _recurrent_dims(module, calls)
    found = set()
    for one, three in calls:
        dims = batch_dims(one, three)
        if dims is None or one.in_spec != _SINGLE_ARG or len(one.out_shapes) != 1:
            return None
        (x_dim,), (out_dim,) = dims
        shape = one.in_shapes[0]
        if x_dim is None or out_dim is None or shape is None or not one.out_floating[0]:
            return None
        if isinstance(module, _CHANNEL_FIRST):
            if x_dim != 0 or out_dim != 0:
                return None
        else:
            trailing = len(module.normalized_shape) if isinstance(module, nn.LayerNorm) else 1
            if isinstance(module, nn.Embedding):
                trailing = 0
            if x_dim != out_dim or x_dim >= len(shape) - trailing:
                return None
        found.add((x_dim, out_dim))
    return found.pop() if len(found) == 1 else None


def _ancestors(name: str) -> list[str]:
    """``name`` and the names of the modules enclosing it, innermost first ("" = the model)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _common_ancestor(names: list[str]) -> str:
    split = [n.split(".") if n else [] for n in names]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _encloses(outer: str, inner: str) -> bool:
    return outer != inner and (outer == "" or inner.startswith(outer + "."))


def _absorb(plan: Plan) -> None:
    """A host inside another host (or anything, once the whole model hosts) joins the outer one:
    the outer pass already runs through the inner module, so the inner pass would be extra work."""
    if plan.root:
        for hp in plan.hosts.values():
            plan.root = list(dict.fromkeys(plan.root + hp.params))
        plan.hosts.clear()
        return
    for name in sorted(plan.hosts, key=lambda n: n.count(".") + bool(n), reverse=True):
        outer = [h for h in plan.hosts if _encloses(h, name)]
        if outer:
            top = min(outer, key=lambda n: n.count(".") + bool(n))
            plan.hosts[top].params = list(
                dict.fromkeys(plan.hosts[top].params + plan.hosts[name].params)
            )
            del plan.hosts[name]


def make_plan(
    ownership: Ownership,
    probes: tuple[dict[str, list[CallShape]], dict[str, list[CallShape]]],
    unused_params: set[str],
    input_module: str | None,
) -> Plan:
    """Route every monitored layer (see the module docstring)."""
    plan = Plan(input_module=input_module)
    pending: list[str] = []
    for layer, module in ownership.layers.items():
        params = ownership.layer_params[layer]
        if all(p in unused_params for p in params):
            plan.unused.add(layer)
            continue
        route = fast_route(module)
        calls = _calls(probes, layer)
        exclusive = not ownership.shared_with(layer) and all(
            len(ownership.owners[p]) == 1 for p in params
        )
        dims = _fast_dims(module, calls) if route is not None and calls and exclusive else None
        if route is not None and dims is not None:
            plan.fast[layer] = FastPlan(route, *dims)
        else:
            pending += [p for p in params if p not in pending]
    for param in pending:
        start = _common_ancestor(ownership.owners[param])
        for candidate in _ancestors(start):
            host_dims = _host_dims(probes, candidate)
            if host_dims is not None:
                host = plan.hosts.setdefault(candidate, HostPlan([], *host_dims))
                host.params.append(param)
                break
        else:
            plan.root.append(param)
    _absorb(plan)
    hooked = set(plan.fast) | set(plan.hosts) | ({input_module} if input_module else set())
    plan.copy_inputs = {
        name for name in hooked if any(call.modified for call in probes[1].get(name, []))
    }
    return plan
