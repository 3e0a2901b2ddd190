"""Hand results to whatever loggers the Trainer has (duck-typed: no Lightning import here).

Scalars go to every logger through ``log_metrics`` under their keys (``keys.py``). TensorBoard gets
one run per split instead, the Keras convention: ``<log_dir>/sensitivity/train``,
``.../val`` (and ``.../train_all``) hold the split's scalars, histograms and figures under the
same tags, so that its Time Series overlays train and validation in two colours with a legend;
keys without a split go to the Trainer's own run. Histograms and images need TensorBoard and are
skipped, with one message, elsewhere. :func:`read_scalars` reads it all back under the keys.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_sens.reporting import keys, paths

__all__ = ["LoggerLike", "Writer", "read_scalars", "save_png"]

_log = logging.getLogger("lightning_sens")


class LoggerLike(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


def _summary_writer(logger: object) -> Any | None:
    experiment = getattr(logger, "experiment", None)
    required = ("add_histogram", "add_image", "add_scalar", "add_text")
    if experiment is not None and all(hasattr(experiment, name) for name in required):
        return experiment
    return None


class Writer:
    """Routes the monitor's output to the loggers; remembers what it has said once.

    Args:
        loggers: the Trainer's loggers (anything with ``log_metrics``).
        log_dir: where the split runs go when a logger is TensorBoard (its own log_dir).
    """

    def __init__(self, loggers: Sequence[object], log_dir: Path | str | None = None) -> None:
        self.loggers = list(loggers)
        found = [(logger, _summary_writer(logger)) for logger in self.loggers]
        board = next(((lg, w) for lg, w in found if w is not None), None)
        self.tensorboard = None if board is None else board[1]
        self.tensorboard_logger = None if board is None else board[0]
        self._log_dir = None if board is None else Path(log_dir or board[1].log_dir)
        self._runs: dict[str, Any] = {}
        self.images_skipped_said = False

    def run(self, split: str | None) -> Any:
        """The SummaryWriter of a split's run (the Trainer's for None); None without TensorBoard."""
        if self.tensorboard is None or split is None:
            return self.tensorboard
        if split not in self._runs:
            from torch.utils.tensorboard import SummaryWriter

            assert self._log_dir is not None
            self._runs[split] = SummaryWriter(str(paths.split_run(self._log_dir, split)))
        return self._runs[split]

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Every finite metric to every logger; to TensorBoard by :func:`keys.route`."""
        finite = {k: float(v) for k, v in metrics.items() if not math.isnan(v)}
        for logger in self.loggers:
            if logger is not self.tensorboard_logger:
                logger.log_metrics(finite, step=step)  # type: ignore[attr-defined]
        if self.tensorboard is None:
            return
        own = {}
        for key, value in finite.items():
            split, tag = keys.route(key)
            if split is None:
                own[key] = value
            else:
                self.run(split).add_scalar(tag, value, step)
        if own:
            board: Any = self.tensorboard_logger
            board.log_metrics(own, step=step)

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        """The finite values as a histogram of 64 equal bins (TensorBoard only), binned here in
        torch: TensorBoard's own binning of ten thousand scores costs several milliseconds."""
        finite = values[values.isfinite()].to(torch.float64).cpu()
        if self.tensorboard is None or not finite.numel():
            return
        low, high = float(finite.min()), float(finite.max())
        if high <= low:  # one value: one bin around it
            low, high = low - 0.5, high + 0.5
        counts, edges = torch.histogram(finite, bins=64, range=(low, high))
        split, tag = keys.route(key)
        self.run(split).add_histogram_raw(
            tag,
            min=float(finite.min()),
            max=float(finite.max()),
            num=finite.numel(),
            sum=float(finite.sum()),
            sum_squares=float(finite.square().sum()),
            bucket_limits=edges.tolist(),  # right edges; an empty bin ends at the left edge
            bucket_counts=[0.0, *counts.tolist()],
            global_step=step,
        )

    def image(self, key: str, image: Tensor, step: int) -> None:
        """Log a (3, H, W) uint8 image (TensorBoard only)."""
        if self.tensorboard is not None:
            split, tag = keys.route(key)
            self.run(split).add_image(tag, image, step, dataformats="CHW")

    def text(self, key: str, text: str, step: int) -> None:
        """Markdown text (TensorBoard's Text tab; elsewhere nothing)."""
        if self.tensorboard is not None:
            split, tag = keys.route(key)
            self.run(split).add_text(tag, text, step)

    def skip_images(self, folder: Path, saved: bool) -> None:
        """Say once where the output goes without a TensorBoard logger: the tables under
        ``folder``, the figures as PNG files there where ``saved``, else nowhere."""
        if self.images_skipped_said:
            return
        self.images_skipped_said = True
        if self.loggers:
            names = ", ".join(sorted({type(logger).__name__ for logger in self.loggers}))
            where = f"its scalars go to {names} and its tables under {folder}"
        else:
            where = (
                f"with no logger at all, its tables go under {folder} and its curves stay in "
                "SensitivityMonitor.history"
            )
        figures = (
            f"its figures are saved as PNG files under {folder / 'figures'}"
            if saved
            else "it draws no figures (they need a TensorBoard logger; save_figures=True saves "
            "them as PNG files)"
        )
        _log.warning(f"SensitivityMonitor found no TensorBoard logger: {where}; {figures}.")

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
        for run in self._runs.values():
            run.flush()

    def close(self) -> None:
        """Close the split runs' files (the Trainer's run is its logger's to close)."""
        for run in self._runs.values():
            run.close()
        self._runs = {}


def read_scalars(log_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the monitor logged to TensorBoard under ``log_dir``, read back from the
    event files under its keys: key → [(step, value), ...] in step order (the Trainer's run
    and the split runs; the last value wins where a step was written twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    runs: list[tuple[str | None, Path]] = [(None, Path(log_dir))]
    runs += [(split, paths.split_run(log_dir, split)) for split in keys.RUNS]
    for split, folder in runs:
        if not folder.is_dir():
            continue
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            key = keys.unroute(split, tag)
            found = out.setdefault(key, {})
            for event in events.Scalars(tag):
                found[event.step] = event.value
    return {key: sorted(found.items()) for key, found in sorted(out.items())}


def save_png(image: Tensor, path: Path) -> None:
    """Write a (3, H, W) uint8 image as PNG (through a temporary file, then a rename)."""
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    imsave(temporary, image.permute(1, 2, 0).cpu().numpy())
    os.replace(temporary, path)
