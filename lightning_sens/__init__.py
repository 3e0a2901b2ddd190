"""lightning-sens: training-time sensitivity monitoring for PyTorch Lightning.

Implements the influence measure of Shu & Zhu, "Sensitivity Analysis of Deep Neural Networks"
(AAAI 2019): the Fisher metric of the perturbation manifold and the first-order influence FI of
perturbations of a network's inputs and parameters. See docs/method.md.
"""

from lightning_sens.core import (
    BlockFI,
    ClosedFormFI,
    InputFI,
    LayerFI,
    ParameterFI,
    SensitivityResult,
    closed_form_fi,
    contrast_basis,
    default_rtol,
    fi_along_direction,
    fi_from_gram,
    input_fi,
    log_prob_gradient,
    parameter_fi,
    sensitivity,
    trainable_layers,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BlockFI",
    "ClosedFormFI",
    "InputFI",
    "LayerFI",
    "ParameterFI",
    "SensitivityResult",
    "__version__",
    "closed_form_fi",
    "contrast_basis",
    "default_rtol",
    "fi_along_direction",
    "fi_from_gram",
    "input_fi",
    "log_prob_gradient",
    "parameter_fi",
    "sensitivity",
    "trainable_layers",
]
