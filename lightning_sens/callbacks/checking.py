"""The check before the first step of ``fit`` and ``validate`` (docs/monitor.md, "Failures"):
one batch of each split through ``batch_fn`` and the model, the labels against the
logits, and the exact engine on one sample."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_sens.callbacks.batches import Reader
from lightning_sens.callbacks.policy import Failures
from lightning_sens.callbacks.probing import Prober
from lightning_sens.callbacks.rng import preserved_rng
from lightning_sens.callbacks.setup import (
    MonitorSetupError,
    check_labels,
    class_labels,
    dataset_classes,
    describe_inputs,
    eval_mode,
    shape_of,
)
from lightning_sens.config import MonitorConfig
from lightning_sens.core.inputs import Inputs, default_forward, found_logits, select
from lightning_sens.core.layout import OutputLayout, read_layout
from lightning_sens.core.references import flag_kind

__all__ = ["check_setup"]


def _layout(
    split: str, logits: Any, labels: Tensor, inputs: Inputs, config: MonitorConfig
) -> OutputLayout | None:
    """How the logits meet the labels (:func:`~lightning_sens.core.outputs.read_layout`):
    None for one class per sample (the classifier's path), the layout where a sample has many
    positions; an unreadable layout raises :class:`MonitorSetupError` with the fix."""
    if not isinstance(logits, Tensor):
        raise MonitorSetupError(
            f"The module's forward returned {shape_of(logits)}, not (B, K) logits (or one binary "
            "logit, or logits with a class axis for every token or pixel) or an output with a "
            "`logits` attribute. Pass SensitivityMonitor(forward_fn=lambda module, x: ...) "
            "that returns the logits."
        )
    try:
        layout = read_layout(logits, labels, inputs, config.task, config.ignore_index)
    except (TypeError, ValueError) as error:
        raise MonitorSetupError(
            f"SensitivityMonitor cannot read the first {split} batch's logits against its "
            f'labels: {error} (docs/tasks.md, "How the monitor reads a task")'
        ) from error
    return layout if layout.dense else None


def _with_labels(reader: Reader, module: LightningModule, inputs: Inputs, labels: Tensor) -> Any:
    """The output of a forward that takes the labels too, ``forward(inputs, target)`` (teacher
    forcing, as in Lightning's demo Transformer), called with both by name; None where the
    forward does not take two arguments or fails with them too. On success the reader passes
    both from now on (:meth:`Reader.with_labels`)."""
    if reader.forward_fn is not None or not isinstance(inputs, Tensor):
        return None
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) != 2 or positional[0].kind == inspect.Parameter.POSITIONAL_ONLY:
        return None
    names = (positional[0].name, positional[1].name)
    try:
        with torch.no_grad():
            output = module(**{names[0]: inputs, names[1]: labels})
    except Exception:
        return None
    reader.label_arguments = names
    return output


def check_setup(
    reader: Reader,
    module: LightningModule,
    loaders: dict[str, DataLoader],
    prober: Prober,
    failures: Failures,
    deferrable: bool = False,
) -> tuple[str, ...] | None:
    """Read the first batch of each split, run the forward on it and the exact engine (with
    ``exact_probe_size`` > 0) on one sample: errors in the batches, the outputs or the labels
    raise :class:`MonitorSetupError` now, not after a training epoch; an engine failure warns
    now (the part it affects is left out later, as it would be anyway). The model's modes and
    the random streams are left as they were. Returns the class names the datasets carry
    (``dataset.classes``), if any.

    ``deferrable`` (``fit`` with the training steps scored): a module without ``forward()`` is
    not refused; the monitor reads the logits from the first training step instead, and says
    which parts need a forward."""
    first: tuple[Inputs, Tensor] | None = None
    if reader.forward_fn is None and not is_overridden("forward", module, LightningModule):
        children = [name for name, _ in module.named_children()]
        child = children[0] if children else "net"
        fix = (
            f"Define it, e.g. `def forward(self, x): return self.{child}(x)`, or pass "
            f"SensitivityMonitor(forward_fn=lambda module, x: module.{child}(x))."
        )
        if not deferrable:
            raise MonitorSetupError(
                f"The LightningModule {type(module).__name__} has no forward(); "
                "SensitivityMonitor runs the model through it (the probes, the pictures, and "
                f"the validation scores where validation_step returns no logits). {fix}"
            )
        reader.deferred = True  # the first training step's outputs say what the logits are
        failures.info_once(
            "no-forward",
            f"The LightningModule {type(module).__name__} has no forward(): SensitivityMonitor "
            "reads the logits from the training steps (and validation_step's outputs where it "
            "returns them); the exact probes, the per-layer damage, the pictures and the "
            f"validation scores where validation_step returns no logits need one. {fix}",
        )
        return None
    with preserved_rng(), eval_mode(module):
        for split, loader in loaders.items():
            inputs, labels = reader.first(loader, split, module.device)
            try:
                with torch.no_grad():
                    output = (reader.forward_fn or default_forward)(module, inputs)
            except Exception as error:
                output = _with_labels(reader, module, inputs, labels)
                if output is None:
                    raise MonitorSetupError(
                        f"SensitivityMonitor cannot run the model on a {split} batch "
                        f"({describe_inputs(inputs)}): {type(error).__name__}: {error}. Check "
                        "batch_fn (what it passes to the model) and forward_fn."
                    ) from error
                inputs = reader.with_labels(inputs, labels)
            logits = found_logits(output)
            reader.layout = _layout(split, logits, labels, inputs, prober.config)
            if reader.layout is not None:  # many positions: scored and reduced per sample
                reader.sample_shape = tuple(logits.shape[1:])
                axis = -1 if reader.layout.flattened else reader.layout.class_dim
                classes = 1 if axis is None else logits.shape[axis]
                prober.tracker.flag_kind = flag_kind(reader.layout, classes)
                try:
                    reader.position_rows(torch.arange(len(labels)), inputs, labels, logits)
                except (TypeError, ValueError) as error:
                    raise MonitorSetupError(
                        f"SensitivityMonitor cannot score the first {split} batch: {error}"
                    ) from error
                continue
            labels = class_labels(labels, f"the first {split} batch")
            logits = reader.forward(module, inputs)
            check_labels(split, labels, logits)
            first = first or (select(inputs, slice(0, 1), len(labels)), labels[:1])
        if first is not None and prober.config.exact_probe_size > 0:
            with failures.part("the exact engine on the probes"):
                prober.exact(module, *first)
    return dataset_classes(loaders)
