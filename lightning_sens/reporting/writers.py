"""Hand results to whatever loggers the Trainer has (duck-typed: no Lightning import here).

Scalars go to every logger through ``log_metrics``; histograms, images, the custom-scalars layout
and hparams need a TensorBoard ``SummaryWriter`` and are skipped, with one message, elsewhere.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

__all__ = ["LoggerLike", "Writer", "save_png"]

_log = logging.getLogger("lightning_sens")


class LoggerLike(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


def _summary_writer(logger: object) -> Any | None:
    experiment = getattr(logger, "experiment", None)
    required = ("add_histogram", "add_image", "add_custom_scalars", "add_scalar")
    if experiment is not None and all(hasattr(experiment, name) for name in required):
        return experiment
    return None


class Writer:
    """Routes the monitor's output to the loggers; remembers what it has said once."""

    def __init__(self, loggers: Sequence[object]) -> None:
        self.loggers = list(loggers)
        writers = [_summary_writer(logger) for logger in self.loggers]
        self.tensorboard = next((w for w in writers if w is not None), None)
        self.layout_written = False
        self.images_skipped_said = False

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        for logger in self.loggers:
            logger.log_metrics(finite, step=step)  # type: ignore[attr-defined]

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        finite = values[values.isfinite()]
        if self.tensorboard is not None and finite.numel():
            self.tensorboard.add_histogram(tag, finite.float(), step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """Log a (3, H, W) uint8 image (TensorBoard only)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats="CHW")

    def skip_images(self) -> None:
        """Say once that figures need TensorBoard."""
        if not self.images_skipped_said:
            self.images_skipped_said = True
            _log.warning(
                "No TensorBoard logger: sensitivity figures are skipped; scalars still go to "
                "the loggers and the flag tables to the log directory."
            )

    def layout(self, layout: dict[str, dict[str, list[object]]]) -> None:
        if self.tensorboard is not None and not self.layout_written:
            self.tensorboard.add_custom_scalars(layout)
            self.layout_written = True

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()


def save_png(image: Tensor, path: Path) -> None:
    """Write a (3, H, W) uint8 image as PNG (through a temporary file, then a rename)."""
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    imsave(temporary, image.permute(1, 2, 0).cpu().numpy())
    os.replace(temporary, path)
