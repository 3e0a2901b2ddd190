"""The check before the first step of ``fit`` and ``validate`` (docs/monitor.md, "Failures"):
one batch of each split through ``batch_fn`` and the model, the labels against the
logits, and the exact engine on one sample."""

from __future__ import annotations

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


def check_setup(
    reader: Reader,
    module: LightningModule,
    loaders: dict[str, DataLoader],
    prober: Prober,
    failures: Failures,
) -> tuple[str, ...] | None:
    """Read the first batch of each split, run the forward on it and the exact engine (with
    ``exact_probe_size`` > 0) on one sample: errors in the batches, the outputs or the labels
    raise :class:`MonitorSetupError` now, not after a training epoch; an engine failure warns
    now (the part it affects is left out later, as it would be anyway). The model's modes and
    the random streams are left as they were. Returns the class names the datasets carry
    (``dataset.classes``), if any."""
    first: tuple[Inputs, Tensor] | None = None
    if reader.forward_fn is None and not is_overridden("forward", module, LightningModule):
        children = [name for name, _ in module.named_children()]
        child = children[0] if children else "net"
        raise MonitorSetupError(
            f"The LightningModule {type(module).__name__} has no forward(); SensitivityMonitor "
            "runs the model through it (the probes, the pictures, and the validation scores "
            "where validation_step returns no logits). Define it, e.g. `def forward(self, x): "
            f"return self.{child}(x)`, or pass SensitivityMonitor(forward_fn=lambda module, x: "
            f"module.{child}(x))."
        )
    with preserved_rng(), eval_mode(module):
        for split, loader in loaders.items():
            inputs, labels = reader.first(loader, split, module.device)
            try:
                with torch.no_grad():
                    output = (reader.forward_fn or default_forward)(module, inputs)
            except Exception as error:
                raise MonitorSetupError(
                    f"SensitivityMonitor cannot run the model on a {split} batch "
                    f"({describe_inputs(inputs)}): {type(error).__name__}: {error}. Check "
                    "batch_fn (what it passes to the model) and forward_fn."
                ) from error
            logits = found_logits(output)
            reader.layout = _layout(split, logits, labels, inputs, prober.config)
            if reader.layout is not None:  # many positions: scored and reduced per sample
                reader.sample_shape = tuple(logits.shape[1:])
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
