"""Lightning adapters: the only part of lightning-sens (with the CLI) that imports Lightning."""

from lightning_sens.callbacks.monitor import MonitorSetupError, SensitivityMonitor

__all__ = ["MonitorSetupError", "SensitivityMonitor"]
