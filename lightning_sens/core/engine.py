"""The exact FI engine: one forward, K − 1 backward products, then K-space algebra per block.

:func:`sensitivity` computes input FI (whole input and window maps) and parameter FI (per layer,
layer scaling, channel scaling, all layers jointly) from the same backward pass;
:func:`input_fi` and :func:`parameter_fi` are its two halves. How each layer is computed, and
which models are supported, is described in docs/engine.md, "Layer routes".
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_sens.core.capture import Backward, exact_context, unwrap_compiled
from lightning_sens.core.closed_forms import Target
from lightning_sens.core.hosts import OnUnsupported
from lightning_sens.core.inputs import ForwardFn, Inputs, batch_size, get, perturbed_input, select
from lightning_sens.core.results import (
    InputFI,
    LayerFI,
    ParameterFI,
    SensitivityResult,
    concat_results,
)
from lightning_sens.core.runner import Runner
from lightning_sens.core.session import Session
from lightning_sens.core.validation import (
    UnsupportedLayerError,
    check_inputs,
    check_windows,
    class_indices,
)

__all__ = [
    "InputFI",
    "LayerFI",
    "ParameterFI",
    "SensitivityResult",
    "UnsupportedLayerError",
    "input_fi",
    "parameter_fi",
    "sensitivity",
    "trainable_layers",
]


def _patterns(name: str, value: Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be a sequence of module names or glob patterns, got the string "
            f"{value!r}; write [{value!r}]."
        )
    return list(value)


def trainable_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    exclude_layers: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The monitored layers: every module that directly owns a parameter with ``requires_grad``
    (or those named in ``layers``, checked), minus those matching ``exclude_layers``, in
    ``named_modules()`` order.

    Args:
        model: the model (a ``torch.compile`` wrapper is looked through).
        layers: module names; None for every module owning trainable parameters.
        exclude_layers: module names or glob patterns (``"encoder.*.attn"``) to leave out.
    """
    model = unwrap_compiled(model)
    owners = {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    chosen = owners
    if layers is not None:
        chosen = {}
        for name in _patterns("layers", layers):
            frozen = dict(model.named_modules()).get(name)
            if name not in owners and frozen is not None and list(frozen.parameters(False)):
                raise ValueError(
                    f"layers names {name!r}, whose parameters are all frozen "
                    "(requires_grad=False): per-layer FI perturbs the parameters training "
                    f"moves. Unfreeze them to measure the layer: "
                    f"model.get_submodule({name!r}).requires_grad_(True)."
                )
            if name not in owners:
                close = difflib.get_close_matches(name, list(owners), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(
                    f"layers names {name!r}, which is not a module owning trainable parameters."
                    f"{hint} Choose among: {sorted(owners)[:20]}."
                )
            chosen[name] = owners[name]
    for pattern in _patterns("exclude_layers", exclude_layers):
        matched = [n for n in chosen if fnmatch.fnmatchcase(n, pattern)]
        if not matched and not any(fnmatch.fnmatchcase(n, pattern) for n in owners):
            raise ValueError(
                f"exclude_layers holds {pattern!r}, which matches no module owning trainable "
                f"parameters. Choose among: {sorted(owners)[:20]}."
            )
        chosen = {n: m for n, m in chosen.items() if n not in matched}
    return chosen


def _check_batch_statistics(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ValueError(
                f"BatchNorm layer {name!r} has no running statistics (track_running_stats=False), "
                "so even in eval mode it normalises with the statistics of the batch: every "
                "sample's logits depend on the other samples and per-sample FI is undefined. "
                "Use track_running_stats=True, or a per-sample norm (GroupNorm, LayerNorm)."
            )


def _default_chunk(inputs: Inputs) -> int:
    x = (
        inputs
        if isinstance(inputs, Tensor)
        else next(v for v in inputs.values() if isinstance(v, Tensor))
    )
    return 64 if x.is_cuda else 16


def sensitivity(
    model: nn.Module,
    batch: Inputs,
    target: Target,
    *,
    inputs: bool = True,
    input_maps: bool = True,
    windows: Sequence[int] = (1, 3, 5, 7),
    parameters: bool = True,
    layers: Sequence[str] | None = None,
    exclude_layers: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
    input_module: str | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
    on_unsupported: OnUnsupported = "raise",
    channel_metric: bool = False,
    input_target: Target | None = None,
) -> SensitivityResult:
    """Exact FI of input and parameter perturbations of a batch, from one backward pass.

    The model is evaluated in eval mode (each module's mode is restored afterwards), with
    autocast and TF32 off, in float32 at least (a bfloat16 model is evaluated with float32
    copies of its tensors); its parameters, buffers, ``.grad`` and hooks are left as they were.
    Works inside ``torch.inference_mode()`` and ``torch.no_grad()`` (as in Lightning's
    validation loop), on ``torch.compile``'d models, and on any architecture: layers without a
    fast route take the exact Jacobian route (docs/engine.md, "The Jacobian route").

    Args:
        model: a classifier; ``forward_fn(model, batch)`` must return ``(B, K)`` logits, or an
            output with a ``logits`` attribute or key (Hugging Face models). A binary
            classifier with one logit z, ``(B,)`` or ``(B, 1)``, is the two-class model with
            logits ``(0, z)`` (docs/method.md, "Binary classifiers with one logit").
        batch: the samples, a ``(B, ...)`` tensor or a dict of tensors passed as keyword
            arguments (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        target: ``(B,)`` true labels (Setups 1, 2) or ``"pred"`` (Setups 3, 4): integer class
            indices, or the 0/1 labels of a binary classifier (float or bool, ``(B,)`` or
            ``(B, 1)``), read as class indices; other float values are refused.
        inputs: compute input FI at all (``SensitivityResult.input``; None when False): the
            whole input and, with ``input_maps``, the window maps. Floating inputs are
            perturbed directly; token ids at the output of the embedding that reads them.
        input_maps: also compute the window maps and the position map of images and token
            sequences. When False (or ``windows=()``), ``InputFI.maps`` is empty and
            ``InputFI.position_map`` None; the whole input and the per-coordinate
            ``metric_map`` and ``gradient`` are still computed. Ignored when ``inputs`` is False.
        windows: odd window sizes 2s + 1 for the maps; ``()`` for the whole input only.
        parameters: compute per-layer parameter FI.
        layers: module names to monitor; None for every module owning trainable parameters.
        exclude_layers: module names or glob patterns to leave out.
        forward_fn: ``(model, batch) -> logits`` for models whose forward needs adapting.
        input_module: the module whose output is the perturbed input for token inputs
            (default: the model's ``get_input_embeddings()``, or the one ``nn.Embedding`` that
            reads the token ids).
        chunk_size: samples per forward/backward pass, to bound memory. Results do not depend
            on it (every quantity is per sample). None: 16 on CPU, 64 on CUDA.
        rtol: relative eigenvalue tolerance for rank decisions: a direction counts when its
            eigenvalue exceeds rtol · K · the block's largest. Default 1e-10 for float64 and
            float32 models alike (see :func:`~lightning_sens.core.fi.default_rtol`).
        backward: "batched", "loop" or "auto" (see :func:`~lightning_sens.core.capture.backprops`).
        on_unsupported: "raise" an :class:`UnsupportedLayerError` for a layer whose FI cannot be
            computed, or "skip" it (listed in ``ParameterFI.skipped``).
        channel_metric: also compute ``LayerFI.weight_channel_metric``, the metric of each
            output channel of a Linear/Conv weight, which weight-quantisation predictions need
            (docs/damage.md, "What the metric predicts"). No extra backward pass, but on the
            direct route about as much float64 work again as the layer's Gram; off by default.
        input_target: the label of the input FI when it differs from ``target`` (which then
            labels the parameter FI and the result's ``target``), e.g. ``target=labels,
            input_target="pred"`` for maps with the predicted label (Setup 4) and layers with the
            true label (Setup 2). The backward products do not depend on the label, so both come
            from one forward pass and one set of backward products. None: ``target``.

    Returns:
        :class:`SensitivityResult` with per-sample float64 FI, relative FI and effective ranks;
        ``target`` holds the class indices used (int64). Every tensor is detached (no autograd
        graph, also outside ``torch.inference_mode()``).
    """
    check_inputs(batch)
    if backward not in ("auto", "batched", "loop"):
        raise ValueError(f"backward must be 'auto', 'batched' or 'loop', got {backward!r}.")
    if on_unsupported not in ("raise", "skip"):
        raise ValueError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    if rtol is not None and not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}.")
    model = unwrap_compiled(model)
    B = batch_size(batch)
    perturbed = perturbed_input(batch, B)
    windows = tuple(windows) if inputs and input_maps else ()
    if windows and perturbed.kind != "none":
        shape = get(batch, perturbed.key).shape
        if perturbed.kind == "direct" and len(shape) == 4:
            windows = check_windows(windows, shape[2], shape[3])
        elif perturbed.kind == "tokens" and len(shape) == 2:
            windows = check_windows(windows, 1, shape[1], what="sequence of")
    monitored = trainable_layers(model, layers, exclude_layers) if parameters else {}
    if isinstance(target, Tensor):
        target = class_indices(target, "target")
    if isinstance(input_target, Tensor):
        input_target = class_indices(input_target, "input_target")
    for name, given in (("target", target), ("input_target", input_target)):
        if isinstance(given, Tensor) and given.shape[0] != B:
            raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(given.shape)}.")
    if input_module is not None:
        names = dict(model.named_modules())
        if input_module not in names:
            close = difflib.get_close_matches(input_module, list(names), n=3)
            raise ValueError(
                f"input_module {input_module!r} is not a module of the model"
                + (f"; did you mean {close}?" if close else ".")
            )
    _check_batch_statistics(model)
    step = chunk_size or _default_chunk(batch)
    parts = []
    with exact_context(model):
        session = Session(
            model,
            Runner(model, forward_fn),
            monitored,
            perturbed,
            input_module,
            inputs,
            windows,
            rtol,
            backward,
            on_unsupported,
            channel_metric,
        )
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            chunk_target = target if isinstance(target, str) else target[rows]
            chunk_input = input_target
            if isinstance(input_target, Tensor):
                chunk_input = input_target[rows]
            parts.append(
                session.run(
                    select(batch, rows, B),
                    chunk_target,
                    first=start == 0,
                    input_target=chunk_input,
                )
            )
    return concat_results(parts)


def input_fi(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    windows: Sequence[int] = (1, 3, 5, 7),
    *,
    forward_fn: ForwardFn | None = None,
    input_module: str | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
) -> InputFI:
    """Input FI only (whole input and window maps); see :func:`sensitivity`."""
    result = sensitivity(
        model,
        inputs,
        target,
        windows=windows,
        parameters=False,
        forward_fn=forward_fn,
        input_module=input_module,
        chunk_size=chunk_size,
        rtol=rtol,
        backward=backward,
    )
    if result.input is None:
        raise TypeError(
            "input_fi found nothing continuous to perturb: the inputs are not floating point and "
            "no embedding reading token ids was found. Pass input_module='<embedding name>'."
        )
    return result.input


def parameter_fi(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    layers: Sequence[str] | None = None,
    *,
    exclude_layers: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    backward: Backward = "auto",
    on_unsupported: OnUnsupported = "raise",
) -> ParameterFI:
    """Parameter FI only (per layer, scaling families, all layers jointly).

    See :func:`sensitivity` for the arguments.
    """
    chosen = trainable_layers(model, layers, exclude_layers)
    if not chosen:
        raise ValueError("The model has no module with trainable parameters to perturb.")
    result = sensitivity(
        model,
        inputs,
        target,
        inputs=False,
        layers=list(chosen),
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        rtol=rtol,
        backward=backward,
        on_unsupported=on_unsupported,
    )
    assert result.parameters is not None  # parameters=True always gives parameter FI
    return result.parameters
