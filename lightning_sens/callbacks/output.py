"""What a decision writes, on rank zero: scalars and histograms to the loggers, the flag
and layer tables as files, and the figures, drawn on a background thread."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_sens.callbacks.budget import Fit
from lightning_sens.callbacks.drawing import FigureWorker
from lightning_sens.callbacks.planner import FIGURES, SECONDS_PER_FIGURE, Planner
from lightning_sens.config import MonitorConfig
from lightning_sens.core.inputs import Inputs
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.images import Describe, epoch_images, pictured_samples
from lightning_sens.reporting.positions import POSITION_COLUMNS
from lightning_sens.reporting.tables import LAYER_COLUMNS, write_table
from lightning_sens.reporting.writers import Writer, save_png
from lightning_sens.tracking import EpochReport, PositionReport, Probes

__all__ = ["Output", "new_writer"]


def _one_split(report: EpochReport) -> EpochReport:
    """The report of one split: the one the exact probes ran on, else validation, else the
    first."""
    probes = report.probes
    splits = list(probes.results) or list(report.scores)
    split = "val" if "val" in splits else splits[0]

    def only(found: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in found.items() if k == split}

    kept = Probes(only(probes.results), only(probes.ids), only(probes.damage))
    return dataclasses.replace(
        report,
        scores=only(report.scores),
        decisions=only(report.decisions),
        evidence_splits=report.evidence_splits & {split},
        probes=kept,
    )


Fetch = Callable[[dict[tuple[str, str], Tensor]], dict[tuple[str, str], Inputs]]


def new_writer(loggers: list[Any], config: MonitorConfig, step: int) -> Writer:
    """The loggers' router, and the configuration once: as hparams where a logger keeps them
    (CSV, W&B, ...), as a text table in TensorBoard (whose hparams would add a constant
    ``hp_metric`` chart)."""
    writer = Writer(loggers)
    options = config.to_dict()
    for logger in loggers:
        if logger is not writer.tensorboard_logger:
            logger.log_hyperparams({keys.hparam(k): v for k, v in options.items()})
    rows = "\n".join(f"| {k} | {v} |" for k, v in options.items())
    writer.text(keys.config(), f"| option | value |\n|---|---|\n{rows}", step)
    return writer


class Output:
    """Writes one epoch's report.

    Args:
        config: the monitor's options.
        planner: how many figures fit the budget now.
        drawing: the figure thread.
        describe_fn: pictures of samples that are not images (one line of text each).
    """

    def __init__(
        self,
        config: MonitorConfig,
        planner: Planner,
        drawing: FigureWorker,
        describe_fn: Describe | None,
    ) -> None:
        self.config = config
        self.planner = planner
        self.drawing = drawing
        self.describe_fn = describe_fn
        self.writer: Writer | None = None

    def write(self, loggers: Sequence[Any], report: EpochReport, log_dir: Path) -> Writer:
        """Scalars and histograms to the loggers, the tables to files."""
        step, epoch = report.step, report.epoch
        writer = self.writer = self.writer or new_writer(list(loggers), self.config, step)
        writer.scalars(report.metrics, step)
        for split, (true, pred) in report.histograms.items():
            writer.histogram(keys.histogram("true", split), true, step)
            writer.histogram(keys.histogram("pred", split), pred, step)
        writer.flush()
        write_table(report.flags, paths.flag_table(log_dir, epoch, step))
        if report.layers:
            write_table(report.layers, paths.layer_table(log_dir, epoch, step), LAYER_COLUMNS)
        return writer

    def write_positions(
        self, loggers: Sequence[Any], report: PositionReport, log_dir: Path
    ) -> Writer:
        """:meth:`write` for a model with many positions per sample: scalars, histograms of
        the samples' mean log FI, and the positions table."""
        step, epoch = report.step, report.epoch
        writer = self.writer = self.writer or new_writer(list(loggers), self.config, step)
        writer.scalars(report.metrics, step)
        for split, (true, pred) in report.histograms.items():
            writer.histogram(keys.histogram("true", split), true, step)
            writer.histogram(keys.histogram("pred", split), pred, step)
        writer.flush()
        write_table(report.table, paths.position_table(log_dir, epoch, step), POSITION_COLUMNS)
        if report.layers:
            write_table(report.layers, paths.layer_table(log_dir, epoch, step), LAYER_COLUMNS)
        return writer

    def figures(
        self,
        report: EpochReport,
        fetch: Fetch,
        history: list[dict[str, float]],
        num_classes: int,
        class_names: tuple[str, ...] | None,
        log_dir: Path,
    ) -> None:
        """Fetch the pictured samples here (``fetch``: (kind, split) → ids to inputs), draw and
        log on the figure thread, as many figures as the budget allows."""
        writer = self.writer
        assert writer is not None, "write() comes first"
        if not self.config.log_images:
            return
        if writer.tensorboard is None:
            writer.skip_images(paths.folder(log_dir), self.config.save_figures)
            if not self.config.save_figures:
                return
        probes, epoch = report.probes, report.epoch
        count = 2 * len(report.scores) + 2 * len(probes.results)  # about this many figures
        fit = self.planner.fit(FIGURES, count, count, SECONDS_PER_FIGURE)
        if fit.units and self.planner.active and self.drawing.busy:
            fit = Fit(0, count, "the figures of an earlier epoch are still being drawn")
        if fit.first_look:  # one split's figures: the exact probe's, else validation's
            report = _one_split(report)
            what = f"drew the figures of {next(iter(report.scores))} only"
        else:
            what = f"skipped the {count} figures"
        self.planner.notice(FIGURES, fit, what, epoch)
        if fit.units:
            self._submit(report, fetch, history, num_classes, class_names, log_dir, writer)

    def _submit(
        self,
        report: EpochReport,
        fetch: Fetch,
        history: list[dict[str, float]],
        num_classes: int,
        class_names: tuple[str, ...] | None,
        log_dir: Path,
        writer: Writer,
    ) -> None:
        config, describe, probes = self.config, self.describe_fn, report.probes
        wanted = pictured_samples(
            report.scores, report.decisions, probes.results, probes.ids, config.num_images
        )
        pictures = fetch(wanted)
        history = [dict(row) for row in history]
        epoch, step = report.epoch, report.step

        def draw() -> int:  # on the figure thread: nothing here may touch the training state
            images = epoch_images(
                report.scores,
                report.decisions,
                probes.results,
                probes.ids,
                history,
                num_classes,
                config.num_images,
                pictures,
                describe,
                probes.damage,
                config.damage_noise,
                class_names=class_names,
                evidence_splits=report.evidence_splits,
            )
            for key, image in images.items():
                writer.image(key, image, step)
                if config.save_figures:
                    split, tag = keys.route(key)
                    name = tag.rsplit("/", 1)[-1]
                    save_png(image, paths.figure(log_dir, name, str(split), epoch, step))
            writer.flush()
            return len(images)

        self.drawing.submit(draw)
