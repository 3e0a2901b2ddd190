"""The probe passes: how every module call carries the batch, before any real work.

The first sample alone, then three copies of it, go through the model with every module's calls
recorded (shapes only). A tensor whose size changes from 1 to 3 along one dimension carries the
batch there; one that does not change is shared by all samples. One backward pass of the second
probe also tells which parameters do not reach the logits at all (docs/engine.md, "Planning and
the certificate").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_sens.core.capture import CallShape, record_shapes
from lightning_sens.core.inputs import (
    FORWARD_HINT,
    Inputs,
    batch_size,
    get,
    input_embedding_name,
    repeat_first,
    select,
)
from lightning_sens.core.plan import PROBE_SIZES, Ownership, batch_dims
from lightning_sens.core.runner import Runner
from lightning_sens.core.validation import UnsupportedLayerError, check_logits

__all__ = ["Probes", "probe", "token_reader"]


@dataclass(frozen=True)
class Probes:
    """What the probe passes recorded.

    Attributes:
        shapes: the calls of every module, for one sample and for three copies of it.
        unused: canonical names of monitored parameters with no path to the logits.
        first_inputs: the inputs of the first probe pass (one sample).
    """

    shapes: tuple[dict[str, list[CallShape]], dict[str, list[CallShape]]]
    unused: set[str]
    first_inputs: Inputs


def probe(
    model: nn.Module,
    runner: Runner,
    ownership: Ownership,
    inputs: Inputs,
    check: Callable[[Any, str], None] = check_logits,
) -> Probes:
    """Run the probe passes; a model that cannot run on them is refused, with the reason.
    ``check`` refuses outputs that are not logits (default: ``(B, K)`` ones)."""
    B = batch_size(inputs)
    one = runner.inputs(select(inputs, slice(0, 1), B))
    three = runner.inputs(repeat_first(inputs, PROBE_SIZES[1], B))
    try:
        with record_shapes(model) as shapes_one:
            runner(one)
        with record_shapes(model) as shapes_three:
            logits = runner(three)
        check(logits, FORWARD_HINT)
    except Exception as error:
        # Say what is wrong with the user's own batch where that is the problem.
        check(runner(runner.inputs(inputs)), FORWARD_HINT)
        raise UnsupportedLayerError(
            f"The model runs on this batch of {B} but not on {PROBE_SIZES[0]} or "
            f"{PROBE_SIZES[1]} copies of its first sample ({type(error).__name__}: {error}). "
            "Per-sample FI needs a model that treats the samples of a batch independently; "
            "a forward that depends on the batch size cannot be split into samples."
        ) from error
    params = sorted({p for ps in ownership.layer_params.values() for p in ps})
    unused = set()
    if params:
        tensors = [runner.tensor(p) for p in params]
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        found = torch.autograd.grad((logits * weights.to(logits)).sum(), tensors, allow_unused=True)
        unused = {p for p, g in zip(params, found, strict=True) if g is None}
    return Probes((shapes_one, shapes_three), unused, one)


def token_reader(model: nn.Module, probes: Probes, key: str, requested: str | None) -> str | None:
    """The module whose output is the perturbed input for token ids, or None.

    ``requested`` if given; else the model's ``get_input_embeddings()``; else the one
    ``nn.Embedding`` called with the ids. Its call must read the ids once and give ``(B, ...)``.
    """
    shapes_one, shapes_three = probes.shapes
    token = get(probes.first_inputs, key).data_ptr()
    found = requested or input_embedding_name(model)
    if found is None:
        readers = [
            name
            for name, calls in shapes_one.items()
            if any(call.first_arg == token for call in calls)
            and isinstance(model.get_submodule(name), nn.Embedding)
        ]
        found = readers[0] if len(readers) == 1 else None
    if found is None:
        return None
    pairs = zip(shapes_one.get(found, []), shapes_three.get(found, []), strict=False)
    chosen = [(a, b) for a, b in pairs if a.first_arg == token]
    dims = batch_dims(*chosen[0]) if len(chosen) == 1 else None
    return found if dims is not None and dims[1][:1] == [0] else None
