"""What the monitor does when something fails: per epoch where nothing can be scored, per part
otherwise (the scores, curves, flags and tables are always written), once per run each, and
always raised with ``strict=True`` or for a setup error."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sens.callbacks.setup import MonitorSetupError

__all__ = ["Failures"]


class Failures:
    """One-time warnings and the failure policy of one monitor.

    Args:
        strict: raise every failure instead of leaving the part out.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.said: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            rank_zero_warn(message)

    def info_once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            rank_zero_info(message)

    def _raises(self, error: Exception) -> bool:
        return self.strict or isinstance(error, MonitorSetupError)

    @contextmanager
    def epoch(self, epoch: int) -> Iterator[list[bool]]:
        """Reading the batches or their logits: a failure skips the epoch's monitoring (the
        yielded flag turns true)."""
        failed = [False]
        try:
            yield failed
        except Exception as error:
            if self._raises(error):
                raise
            failed[0] = True
            rank_zero_warn(
                f"SensitivityMonitor skipped the monitoring of epoch {epoch}: "
                f"{type(error).__name__}: {error} (pass strict=True to raise instead)."
            )

    @contextmanager
    def part(self, what: str) -> Iterator[None]:
        """One part of an epoch's monitoring: on failure it is left out, the rest goes on."""
        try:
            yield
        except Exception as error:
            if self._raises(error):
                raise
            self.warn_once(
                f"part:{what}:{type(error).__name__}",
                f"SensitivityMonitor left out {what} ({type(error).__name__}: {error}); the "
                "scores, curves, flags and tables are still written. This warning is not "
                "repeated for later epochs (pass strict=True to raise instead).",
            )

    @contextmanager
    def engine_warnings(self) -> Iterator[None]:
        """The engine's warnings (e.g. no embedding for token inputs), once per run each."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            self.warn_once(f"engine:{warning.message}", str(warning.message))
