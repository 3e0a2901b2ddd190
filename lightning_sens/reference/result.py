"""The reference's counterpart of one engine call: the class used, p_y, and both families."""

from __future__ import annotations

import torch
from torch import nn

from lightning_sens.core.inputs import ForwardModule, default_forward
from lightning_sens.core.results import SensitivityResult
from lightning_sens.reference.inputs import input_fi
from lightning_sens.reference.measure import (
    ForwardFn,
    Inputs,
    Target,
    batch_of,
    exact_mode,
    fi_max,
    logits_one,
    sample,
    targets,
)
from lightning_sens.reference.parameters import parameter_fi

__all__ = ["sensitivity"]


def sensitivity(
    model: nn.Module,
    batch: Inputs,
    target: Target,
    *,
    inputs: bool = True,
    parameters: bool = True,
    windows: tuple[int, ...] = (1, 3, 5, 7),
    layers: list[str] | None = None,
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
    input_key: str | None = None,
    input_module: str | None = None,
) -> SensitivityResult:
    """Everything :func:`lightning_sens.core.engine.sensitivity` measures, by brute force.

    ``model``, ``target``, ``windows``, ``forward_fn``, ``rtol``, ``input_key`` and
    ``input_module`` are as in :func:`~lightning_sens.reference.input_fi`.

    Args:
        model: the model.
        batch: the inputs (``inputs`` of :func:`~lightning_sens.reference.input_fi`).
        target: the labels, or ``"pred"``; a binary classifier's 0/1 labels may be float or
            bool, (B,) or (B, 1).
        inputs: compute the input families (:func:`~lightning_sens.reference.input_fi`).
        parameters: compute the parameter families (:func:`~lightning_sens.reference.parameter_fi`,
            with ``layers``).
        windows: window sizes of the input maps.
        layers: the layers of the parameter families (None: every trainable layer).
        forward_fn: (module, inputs) → logits; one binary logit z, (B,) or (B, 1), is the
            two-class model with logits (0, z) (docs/method.md, "Binary classifiers with one
            logit").
        rtol: the rank tolerance.
        input_key: the perturbed entry of a dict input.
        input_module: the module whose output is perturbed (token inputs).

    Returns:
        The engine's :class:`~lightning_sens.core.results.SensitivityResult`: ``target`` (B,)
        int64, the class used (the label, or the argmax for ``"pred"``); ``p_target`` (B,)
        float64, p_y; ``log_fi_max`` (B,), log((1 − p_y) / p_y) with 1 − p_y summed from the
        other classes' probabilities (docs/method.md, "Two facts you must know"); ``input`` and
        ``parameters`` as computed by the two functions, or None when not requested.
    """
    forward = ForwardModule(model, forward_fn or default_forward)
    with exact_mode(model), torch.no_grad():
        samples = [sample(batch, b) for b in range(batch_of(batch))]
        logits = torch.stack([logits_one(forward, x) for x in samples]).to(torch.float64)
    labels = targets(target, logits)
    p_target, most = fi_max(torch.softmax(logits, dim=1), labels)
    input_part = None
    if inputs:
        input_part = input_fi(
            model,
            batch,
            target,
            windows,
            forward_fn,
            rtol,
            input_key=input_key,
            input_module=input_module,
        )
    parameter_part = None
    if parameters:
        parameter_part = parameter_fi(model, batch, target, layers, forward_fn, rtol)
    return SensitivityResult(labels, p_target, torch.log(most), input_part, parameter_part)
