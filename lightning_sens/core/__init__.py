"""The pure-torch core of lightning-sens: the influence measure and its fast exact engine.

Nothing here imports Lightning, TensorBoard or does file I/O.
"""

from lightning_sens.core.closed_forms import ClosedFormFI, closed_form_fi, log_prob_gradient
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
from lightning_sens.core.fi import BlockFI, default_rtol, fi_along_direction, fi_from_gram
from lightning_sens.core.frame import MetricFrame, contrast_basis, metric_frame
from lightning_sens.core.inputs import default_forward, logits_of
from lightning_sens.core.layout import OutputLayout, read_layout
from lightning_sens.core.outputs import PositionScores, SampleSummary, position_scores
from lightning_sens.core.references import LabelReference, label_reference

__all__ = [  # noqa: RUF022 (grouped by topic, not sorted)
    # the engine
    "sensitivity",
    "input_fi",
    "parameter_fi",
    "trainable_layers",
    "UnsupportedLayerError",
    # result types
    "SensitivityResult",
    "InputFI",
    "ParameterFI",
    "LayerFI",
    "BlockFI",
    # closed forms from the logits alone
    "ClosedFormFI",
    "closed_form_fi",
    "log_prob_gradient",
    # outputs with many positions (tokens, pixels, sigmoids)
    "read_layout",
    "OutputLayout",
    "LabelReference",
    "label_reference",
    "position_scores",
    "PositionScores",
    "SampleSummary",
    # FI of a family from its Gram matrix
    "fi_from_gram",
    "fi_along_direction",
    "default_rtol",
    # the metric in K-space
    "MetricFrame",
    "metric_frame",
    "contrast_basis",
    # how the model is called
    "default_forward",
    "logits_of",
]
