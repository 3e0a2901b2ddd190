"""lightning-sens: training-time sensitivity monitoring for PyTorch Lightning.

Implements the influence measure of Shu & Zhu, "Sensitivity Analysis of Deep Neural Networks"
(AAAI 2019): the Fisher metric of the perturbation manifold and the first-order influence FI of
perturbations of a network's inputs and parameters. See docs/method.md.
"""

from lightning_sens import core
from lightning_sens.core import *  # noqa: F403  (the core's public API is the package's)

__version__ = "0.1.0.dev0"

__all__ = [  # noqa: F405
    *core.__all__,
    "MonitorConfig",
    "SensitivityMonitor",
    "WithIndex",
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
