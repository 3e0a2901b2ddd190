"""The pure-torch core of lightning-sens: the influence measure and its fast exact engine.

Nothing here imports Lightning, TensorBoard or does file I/O.
"""

from lightning_sens.core.engine import (
    InputFI,
    LayerFI,
    ParameterFI,
    SensitivityResult,
    UnsupportedLayerError,
    input_fi,
    parameter_fi,
    sensitivity,
    trainable_layers,
)
from lightning_sens.core.fi import (
    BlockFI,
    ClosedFormFI,
    MetricFrame,
    closed_form_fi,
    contrast_basis,
    default_rtol,
    fi_along_direction,
    fi_from_gram,
    log_prob_gradient,
    metric_frame,
)
from lightning_sens.core.inputs import default_forward, logits_of

__all__ = [
    "BlockFI",
    "ClosedFormFI",
    "InputFI",
    "LayerFI",
    "MetricFrame",
    "ParameterFI",
    "SensitivityResult",
    "UnsupportedLayerError",
    "closed_form_fi",
    "contrast_basis",
    "default_forward",
    "default_rtol",
    "fi_along_direction",
    "fi_from_gram",
    "input_fi",
    "log_prob_gradient",
    "logits_of",
    "metric_frame",
    "parameter_fi",
    "sensitivity",
    "trainable_layers",
]
