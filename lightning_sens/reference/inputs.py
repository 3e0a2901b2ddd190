"""Reference input FI: the whole input, window maps and positions, one sample at a time."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sens.core.fi import BlockFI
from lightning_sens.core.inputs import ForwardModule, default_forward
from lightning_sens.core.results import InputFI
from lightning_sens.reference.measure import (
    ForwardFn,
    Inputs,
    Target,
    batch_of,
    block,
    exact_mode,
    fi_from_jacobian,
    fi_max,
    grad_log_py,
    jacobian,
    logits_one,
    metric_diagonal,
    sample,
    targets,
)

__all__ = ["input_fi"]


def _perturbed(
    inputs: Inputs, input_key: str | None, input_module: str | None
) -> tuple[Callable[[Inputs, Tensor], Inputs], Callable[[Inputs], Tensor]]:
    """How ``ω`` enters one sample's forward, and the shape of ``ω`` for a sample.

    Returns ``(apply, like)``: ``apply(x, ω)`` gives the inputs to run (for a module output,
    ``ω`` is added by the forward hook of :func:`_perturbing` instead); ``like(x)`` is a tensor
    shaped as ``ω`` for input perturbations.
    """
    if input_module is not None:
        return (lambda x, omega: x), (lambda x: torch.zeros(0))
    if isinstance(inputs, Tensor):
        return (lambda x, omega: x + omega), (lambda x: torch.zeros_like(x))
    if input_key is None:
        raise ValueError("dict inputs need input_key (a floating tensor) or input_module")
    key = input_key
    return (
        lambda x, omega: {**x, key: x[key] + omega},
        lambda x: torch.zeros_like(x[key]),
    )


@contextmanager
def _perturbing(module: nn.Module | None, omega_now: list[Tensor]) -> Iterator[list[Tensor]]:
    """While open, ``module``'s output gets ``omega_now[0]`` added; records unperturbed outputs."""
    seen: list[Tensor] = []
    if module is None:
        yield seen
        return

    def hook(_m: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if not omega_now:
            seen.append(output.detach())
            return None
        return output + omega_now[0]

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def input_fi(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    windows: tuple[int, ...] = (1, 3, 5, 7),
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-10,
    input_key: str | None = None,
    input_module: str | None = None,
) -> InputFI:
    """Influence of additive input perturbations ``x + ω``, ``ω0 = 0`` (Setups 1, 3, 4).

    Args:
        model: the classifier; never modified (eval mode during the call, flags restored).
        inputs: a batch (B, *shape), or a dict of tensors passed as keyword arguments.
        target: true labels (B,) or ``"pred"`` for the predicted label ``argmax z``; a binary
            classifier's 0/1 labels may be float or bool, (B,) or (B, 1) (see ``targets``).
        windows: odd window sizes ``2s + 1`` for the per-channel maps (images, and token
            sequences perturbed at ``input_module``).
        forward_fn: ``forward_fn(model, x) -> logits (N, K)``, or one binary logit z, (N,) or
            (N, 1), read as the two-class logits (0, z); default ``model(x)`` (or
            ``model(**x)`` for a dict); an output's ``logits`` attribute or key is used.
        rtol: relative tolerance, see :func:`fi_from_jacobian`.
        input_key: for dict inputs, the floating tensor to perturb.
        input_module: perturb this module's output instead (``ω`` is added to it; token models
            are perturbed at their input embedding's output ``(1, T, d)`` per sample).

    Returns:
        The engine's own result type, :class:`~lightning_sens.core.results.InputFI`, every
        field computed here (all on the device of the inputs; each :class:`BlockFI` holds FI,
        relative FI ``fi / ((1 − p_y) / p_y)``, 0 where ``p_y = 1``, and the effective rank):

        - ``whole``: the whole input as one block, ``(B,)``.
        - ``maps``: for images (B, C, H, W) and non-empty ``windows``, ``{w: (B, C, H, W)}``,
        the block at (b, c, h, v) being channel c, rows h−s..h+s and columns v−s..v+s clipped
        to the image; for a module output (1, T, d) per sample, ``{w: (B, T, d)}``
        (coordinate j of tokens t−s..t+s). Empty for other inputs or ``windows=()``.
        - ``position_map``: the block of all C channels of pixel (h, v), ``(B, H, W)``, or of
        every coordinate of token t, ``(B, T)``; None where ``maps`` is empty.
        - ``source``: what was perturbed, ``"inputs"``, ``"inputs['<input_key>']"`` or
        ``"output of '<input_module>'"``.
        - ``metric_map`` and ``gradient`` (B, *shape): per coordinate, J_iᵀ H J_i and
        ∂ log p_y / ∂x_i (of the perturbed tensor: the input, or ``input_module``'s output).

        The class and p_y used are in :func:`~lightning_sens.reference.sensitivity`'s result.
    """
    for w in windows:
        if w < 1 or w % 2 != 1:
            raise ValueError(f"window sizes must be odd and positive, got {w}")
    forward_fn = forward_fn or default_forward
    wrapper = ForwardModule(model, forward_fn)
    apply, start = _perturbed(inputs, input_key, input_module)
    hooked = model.get_submodule(input_module) if input_module is not None else None
    omega_now: list[Tensor] = []
    with exact_mode(model), _perturbing(hooked, omega_now) as seen:
        B = batch_of(inputs)
        samples = [sample(inputs, b) for b in range(B)]

        def logits_of_omega(x: Inputs, omega: Tensor) -> Tensor:
            if hooked is not None:
                omega_now[:] = [omega]
            try:
                return logits_one(wrapper, apply(x, omega))
            finally:
                omega_now.clear()

        logits = torch.stack([logits_one(wrapper, x).detach() for x in samples])
        logits = logits.to(torch.float64)
        probs = torch.softmax(logits, dim=1)
        labels = targets(target, logits)
        per_sample: dict[str, list[Tensor]] = {}
        for b, x in enumerate(samples):
            p, c = probs[b], grad_log_py(probs[b], labels[b])
            omega0 = start(x) if hooked is None else seen[b]
            omega0 = torch.zeros_like(omega0)
            J = jacobian(partial(logits_of_omega, x), omega0).to(torch.float64)
            J = J.reshape(J.shape[0], *omega0.shape[1:])  # (K, *shape of one sample)
            flat = J.reshape(J.shape[0], -1)
            found = {"": fi_from_jacobian(flat, p, c, rtol)}
            shape = J.shape[1:]
            per_sample.setdefault("metric_map", []).append(metric_diagonal(flat, p).reshape(shape))
            per_sample.setdefault("gradient", []).append((c @ flat).reshape(shape))
            maps_shape = _maps_layout(J, hooked is not None)
            if maps_shape is not None and windows:
                for w in windows:
                    found[f"map{w}"] = _window_map(maps_shape, p, c, w // 2, True, rtol)
                found["position"] = _window_map(maps_shape, p, c, 0, False, rtol)
            for key, (fi, rank) in found.items():
                per_sample.setdefault(f"fi{key}", []).append(fi)
                per_sample.setdefault(f"rank{key}", []).append(rank)
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}
    _, most = fi_max(probs, labels)
    tokens = hooked is not None

    def found_block(key: str) -> BlockFI:
        fi, rank = stacked[f"fi{key}"], stacked[f"rank{key}"]
        if tokens and key:  # (B, d, 1, T) -> (B, T, d); (B, 1, T) -> (B, T)
            fi, rank = (t[:, :, 0].transpose(1, 2) if t.dim() == 4 else t[:, 0] for t in (fi, rank))
        return block(fi, rank, most)

    with_maps = "fiposition" in stacked
    if input_module is not None:
        source = f"output of {input_module!r}"
    else:
        source = "inputs" if input_key is None else f"inputs[{input_key!r}]"
    return InputFI(
        whole=found_block(""),
        maps={w: found_block(f"map{w}") for w in windows} if with_maps else {},
        position_map=found_block("position") if with_maps else None,
        source=source,
        metric_map=stacked["metric_map"],
        gradient=stacked["gradient"],
    )


def _maps_layout(J: Tensor, from_module: bool) -> Tensor | None:
    """``J`` as (K, C, H, W) for window maps: images as they are, a token sequence (K, T, d) as
    (K, d, 1, T); None for other shapes."""
    if not from_module and J.dim() == 4:
        return J
    if from_module and J.dim() == 3:
        return J.transpose(1, 2).unsqueeze(2)
    return None


def _window_map(
    J: Tensor, p: Tensor, c: Tensor, s: int, per_channel: bool, rtol: float
) -> tuple[Tensor, Tensor]:
    """FI and rank of every window of half-width ``s`` of an input Jacobian ``J`` (K, C, H, W).

    The block at (c, h, v) (``per_channel``; result (C, H, W)) or at (h, v) (all channels; result
    (H, W)) is rows h−s..h+s and columns v−s..v+s, clipped to the input. A sequence has H = 1,
    so its windows span tokens only.
    """
    K, C, Hh, W = J.shape
    shape = (C, Hh, W) if per_channel else (Hh, W)
    fi = torch.zeros(shape, dtype=torch.float64, device=J.device)
    rank = torch.zeros(shape, dtype=torch.int64, device=J.device)
    for idx in itertools.product(*(range(n) for n in shape)):
        h, v = idx[-2:]
        chans = slice(idx[0], idx[0] + 1) if per_channel else slice(None)
        # slicing clips the end at the border; the start is clipped by max(·, 0)
        block = J[:, chans, max(h - s, 0) : h + s + 1, max(v - s, 0) : v + s + 1]
        fi[idx], rank[idx] = fi_from_jacobian(block.reshape(K, -1), p, c, rtol)
    return fi, rank
