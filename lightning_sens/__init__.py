"""lightning-sens: training-time sensitivity monitoring for PyTorch Lightning.

Implements the influence measure of Shu & Zhu, "Sensitivity Analysis of Deep Neural Networks"
(AAAI 2019): the Fisher metric of the perturbation manifold and the first-order influence FI of
perturbations of a network's inputs and parameters. See docs/method.md, "The measure".
"""

from lightning_sens.core import (  # the core's public API is the package's
    BlockFI,
    ClosedFormFI,
    InputFI,
    LabelReference,
    LayerFI,
    MetricFrame,
    OutputLayout,
    ParameterFI,
    PositionScores,
    SampleSummary,
    SensitivityResult,
    UnsupportedLayerError,
    closed_form_fi,
    contrast_basis,
    default_forward,
    default_rtol,
    fi_along_direction,
    fi_from_gram,
    input_fi,
    label_reference,
    log_prob_gradient,
    logits_of,
    metric_frame,
    parameter_fi,
    position_scores,
    read_layout,
    sensitivity,
    trainable_layers,
)

__version__ = "0.1.0.dev0"

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
    "label_reference",
    "position_scores",
    "LabelReference",
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
    # the Lightning callback (imported on first use)
    "SensitivityMonitor",
    "MonitorConfig",
    "WithIndex",
    # the package
    "__version__",
]


def __getattr__(name: str) -> object:
    # Lazy, so that `import lightning_sens` (the pure core) does not import Lightning.
    if name == "SensitivityMonitor":
        from lightning_sens.callbacks import SensitivityMonitor

        return SensitivityMonitor
    if name == "MonitorConfig":
        from lightning_sens.config import MonitorConfig

        return MonitorConfig
    if name == "WithIndex":
        from lightning_sens.data import WithIndex

        return WithIndex
    raise AttributeError(f"module 'lightning_sens' has no attribute {name!r}")
