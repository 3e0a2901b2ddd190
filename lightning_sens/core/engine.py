"""The exact FI engine: one forward, K − 1 backward products, then K-space algebra per block.

:func:`sensitivity` computes input FI (whole input and window maps) and parameter FI (per layer,
layer scaling, channel scaling, all layers jointly) from the same backward pass;
:func:`input_fi` and :func:`parameter_fi` are its two halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sens.core.capture import (
    Backward,
    ForwardFn,
    backprops,
    check_captured,
    eval_mode,
    forward_capture,
)
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
from lightning_sens.core.grams import LayerAccumulator
from lightning_sens.core.results import (
    InputFI,
    LayerFI,
    ParameterFI,
    SensitivityResult,
    concat_results,
)
from lightning_sens.core.validation import check_inputs, check_logits, check_target, check_windows

__all__ = [
    "InputFI",
    "LayerFI",
    "ParameterFI",
    "SensitivityResult",
    "input_fi",
    "parameter_fi",
    "sensitivity",
    "trainable_layers",
]

_FORWARD_HINT = (
    " If the model's forward does not return plain logits, pass `forward_fn=lambda model, x: ...`"
    " that returns them."
)


def trainable_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The monitored layers: every module that directly owns a parameter with ``requires_grad``
    (or the named ones, checked), in ``named_modules()`` order."""
    owners = {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    if layers is None:
        return owners
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of module names, got the string {layers!r}.")
    chosen = {}
    for name in layers:
        if name not in owners:
            raise ValueError(
                f"layers names {name!r}, which is not a module owning trainable parameters. "
                f"Choose among: {sorted(owners)[:20]}."
            )
        chosen[name] = owners[name]
    return chosen


def _window_grams(planes: Tensor, window: int, K1: int) -> Tensor:
    """Window Grams from per-pixel products of the upper triangle of pairs (k ≤ l).

    Args:
        planes: ``(B, C, P, H, W)`` with P = K'(K'+1)/2 products g_k ⊙ g_l per pixel.
        window: odd size w; each pixel's w × w window is summed, zero outside the image.

    Returns:
        ``(B, C, H, W, K', K')`` symmetric Grams.
    """
    B, C, P, H, W = planes.shape
    if window > 1:
        flat = planes.reshape(B, C * P, H, W)
        flat = F.avg_pool2d(flat, window, stride=1, padding=window // 2, divisor_override=1)
        planes = flat.reshape(B, C, P, H, W)
    rows, cols = torch.triu_indices(K1, K1, device=planes.device)
    grams = planes.new_empty(B, C, H, W, K1, K1)
    packed = planes.permute(0, 1, 3, 4, 2)
    grams[..., rows, cols] = packed
    grams[..., cols, rows] = packed
    return grams


def _input_result(
    grads: Tensor, probs: Tensor, c: Tensor, windows: tuple[int, ...], rtol: float
) -> InputFI:
    grads = grads.to(torch.float64)
    whole_gram = torch.einsum("kbn,lbn->bkl", grads.flatten(2), grads.flatten(2))
    whole = fi_from_contrast_gram(whole_gram, probs, c, rtol)
    if grads.dim() != 5 or not windows:
        return InputFI(whole=whole, maps={}, pixel_map=None)
    columns = grads.permute(1, 3, 4, 0, 2)  # (B, H, W, K', C): one pixel's channels
    pixel = fi_from_contrast_columns(columns, probs[:, None, None], c[:, None, None], rtol)
    maps_probs, maps_c = probs[:, None, None, None], c[:, None, None, None]
    maps = {}
    if 1 in windows:
        single = columns.permute(0, 4, 1, 2, 3).unsqueeze(-1)  # (B, C, H, W, K', 1)
        maps[1] = fi_from_contrast_columns(single, maps_probs, maps_c, rtol)
    larger = [w for w in windows if w > 1]
    if larger:
        K1 = grads.shape[0]
        rows, cols = torch.triu_indices(K1, K1, device=grads.device)
        planes = (grads[rows] * grads[cols]).transpose(0, 1).transpose(1, 2)  # (B, C, P, H, W)
        for w in larger:
            window_grams = _window_grams(planes.contiguous(), w, K1)
            maps[w] = fi_from_contrast_gram(window_grams, maps_probs, maps_c, rtol)
    return InputFI(whole=whole, maps={w: maps[w] for w in windows}, pixel_map=pixel)


def _chunk_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    with_input: bool,
    windows: tuple[int, ...],
    layers: dict[str, nn.Module],
    forward_fn: ForwardFn,
    rtol: float | None,
    backward: Backward,
) -> SensitivityResult:
    x = inputs.clone()
    differentiate_input = with_input and x.is_floating_point()
    if differentiate_input:
        x.requires_grad_(True)
    with forward_capture(layers) as records:
        logits = forward_fn(model, x)
    check_logits(logits, _FORWARD_HINT)
    check_captured(records)
    y = resolve_target(logits, target)
    check_target(y, logits)

    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    c = log_prob_gradient(probs, y)
    closed = closed_form_fi(logits, y)  # p_y and log((1 − p_y)/p_y), the largest FI

    held = {name: r.output for name, r in records.items() if r.output is not None}
    missing = sorted(set(layers) - set(held))
    if missing:
        raise ValueError(
            f"Layers {missing} did not run in the forward pass; leave them out with `layers=`."
        )
    wrt = ([x] if differentiate_input else []) + list(held.values())
    if not logits.requires_grad:
        raise ValueError(
            "Nothing to differentiate: the logits do not depend on a floating-point input or on "
            "any monitored layer." + _FORWARD_HINT
        )
    K = logits.shape[1]
    cotangents = contrast_basis(K, logits.dtype, logits.device).T
    tol = default_rtol(logits.dtype) if rtol is None else rtol
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    accumulators = [
        LayerAccumulator(layers[name], r.args, r.kwargs, held[name].detach(), K - 1, compute_dtype)
        for name, r in records.items()
    ]
    input_grads: list[Tensor] = []

    def consume(found: list[Tensor]) -> None:
        if differentiate_input:
            input_grads.append(found[0])
        for accumulator, g in zip(accumulators, found[int(differentiate_input) :], strict=True):
            accumulator.add(g)

    backprops(logits, wrt, cotangents, consume, backward)

    input_result = None
    if differentiate_input:
        input_result = _input_result(torch.stack(input_grads), probs, c, windows, tol)

    parameter_result = None
    if layers:
        found = {name: a.result() for name, a in zip(records, accumulators, strict=True)}
        # One batched call for every K' × K' Gram: layers, channel families, all parameters.
        grams = [f.gram.to(torch.float64) for f in found.values()]
        channel_names = [n for n, f in found.items() if f.channel_scale is not None]
        for name in channel_names:
            u = found[name].channel_scale.to(torch.float64)  # type: ignore[union-attr]
            grams.append(u @ u.transpose(-1, -2))
        grams.append(torch.stack(grams[: len(found)]).sum(0))
        blocks = fi_from_contrast_gram(torch.stack(grams), probs, c, tol)
        scales = torch.stack([f.scale.to(torch.float64) for f in found.values()]).unsqueeze(-1)
        scale_fi = fi_from_contrast_columns(scales, probs, c, tol)
        channel_fi = {n: blocks[len(found) + i] for i, n in enumerate(channel_names)}
        per_layer = {
            name: LayerFI(
                parameters=blocks[i],
                scale=scale_fi[i],
                channel_scale=channel_fi.get(name),
                method=f.method,
            )
            for i, (name, f) in enumerate(found.items())
        }
        parameter_result = ParameterFI(per_layer, blocks[-1])
    return SensitivityResult(y, closed.p_target, closed.log_fi, input_result, parameter_result)


def _default_forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def sensitivity(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    *,
    input_maps: bool = True,
    windows: Sequence[int] = (1, 3, 5, 7),
    parameters: bool = True,
    layers: Sequence[str] | None = None,
    forward_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
) -> SensitivityResult:
    """Exact FI of input and parameter perturbations of a batch, from one backward pass.

    The model is evaluated in eval mode (each module's mode is restored afterwards); its
    parameters, buffers, ``.grad`` and hooks are left as they were. Works inside
    ``torch.inference_mode()`` and ``torch.no_grad()`` (as in Lightning's validation loop).

    Args:
        model: a classifier; ``forward_fn(model, inputs)`` must return ``(B, K)`` logits.
        inputs: ``(B, ...)``; image maps need ``(B, C, H, W)``. Integer inputs (token ids)
            give parameter FI only.
        target: ``(B,)`` true labels (Setups 1, 2) or ``"pred"`` (Setups 3, 4).
        input_maps: compute input FI (whole input, and maps for image inputs).
        windows: odd window sizes 2s + 1 for the maps; ``()`` for the whole input only.
        parameters: compute per-layer parameter FI.
        layers: module names to monitor; None for every module owning trainable parameters.
        forward_fn: ``(model, inputs) -> logits`` for models whose forward returns more.
        chunk_size: samples per forward/backward pass, to bound memory. Results do not depend
            on it (every quantity is per sample). None: 16 on CPU, 64 on CUDA, the fastest
            sizes measured for a ResNet-18 at 32 × 32 (docs/performance.md).
        rtol: relative eigenvalue tolerance for rank decisions (default from the model's dtype,
            see :func:`~lightning_sens.core.fi.default_rtol`).
        backward: "batched", "loop" or "auto" (see :func:`~lightning_sens.core.capture.backprops`).

    Returns:
        :class:`SensitivityResult` with per-sample float64 FI, relative FI and effective ranks.
    """
    check_inputs(inputs)
    if backward not in ("auto", "batched", "loop"):
        raise ValueError(f"backward must be 'auto', 'batched' or 'loop', got {backward!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    if rtol is not None and not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}.")
    windows = tuple(windows)
    if input_maps and inputs.dim() == 4:
        windows = check_windows(windows, inputs.shape[2], inputs.shape[3])
    monitored = trainable_layers(model, layers) if parameters else {}
    if isinstance(target, Tensor) and (target.dim() != 1 or target.shape[0] != inputs.shape[0]):
        raise ValueError(
            f"target must have shape (B,) = ({inputs.shape[0]},), got {tuple(target.shape)}."
        )
    forward = forward_fn or _default_forward
    B = inputs.shape[0]
    step = chunk_size or (64 if inputs.is_cuda else 16)
    parts = []
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        for start in range(0, B, step):
            chunk_target = target if isinstance(target, str) else target[start : start + step]
            parts.append(
                _chunk_sensitivity(
                    model,
                    inputs[start : start + step],
                    chunk_target,
                    input_maps,
                    windows,
                    monitored,
                    forward,
                    rtol,
                    backward,
                )
            )
    return concat_results(parts)


def input_fi(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    windows: Sequence[int] = (1, 3, 5, 7),
    *,
    forward_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
) -> InputFI:
    """Input FI only (whole input and window maps); see :func:`sensitivity`."""
    if not inputs.is_floating_point():
        raise TypeError(
            f"input_fi needs floating-point inputs to perturb, got dtype {inputs.dtype}; for "
            "token ids use parameter_fi (e.g. of the embedding layer)."
        )
    result = sensitivity(
        model,
        inputs,
        target,
        windows=windows,
        parameters=False,
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        rtol=rtol,
        backward=backward,
    )
    assert result.input is not None  # floating inputs always give input FI
    return result.input


def parameter_fi(
    model: nn.Module,
    inputs: Tensor,
    target: Target,
    layers: Sequence[str] | None = None,
    *,
    forward_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
) -> ParameterFI:
    """Parameter FI only (per layer, scaling families, all layers jointly).

    See :func:`sensitivity` for the arguments.
    """
    chosen = trainable_layers(model, layers)
    if not chosen:
        raise ValueError("The model has no module with trainable parameters to perturb.")
    result = sensitivity(
        model,
        inputs,
        target,
        input_maps=False,
        layers=list(chosen),
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        rtol=rtol,
        backward=backward,
    )
    assert result.parameters is not None  # parameters=True always gives parameter FI
    return result.parameters
