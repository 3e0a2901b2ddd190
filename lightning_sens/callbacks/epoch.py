"""One decision on rank zero, step by step: score (the probes and the scan add to the
gathered scores), probe (the exact engine and the damage), flag (the tracker's ``compute``),
write (scalars, histograms, tables) and draw (figures on a background thread)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_sens.callbacks.batches import Reader
from lightning_sens.callbacks.budget import TimeBudget
from lightning_sens.callbacks.drawing import FigureWorker
from lightning_sens.callbacks.output import Output
from lightning_sens.callbacks.planner import FIGURES, FLAGS, SECONDS_PER_FIGURE, Planner
from lightning_sens.callbacks.policy import Failures
from lightning_sens.callbacks.probing import Prober
from lightning_sens.callbacks.rng import preserved_rng
from lightning_sens.callbacks.setup import eval_mode
from lightning_sens.config import MonitorConfig
from lightning_sens.core.outputs import position_scores
from lightning_sens.core.references import FlagKind
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.images import Describe
from lightning_sens.reporting.position_maps import figure_to_image, position_maps
from lightning_sens.reporting.positions import PositionRows
from lightning_sens.reporting.summary import SplitScores
from lightning_sens.reporting.writers import save_png
from lightning_sens.tracking import EpochReport, PositionReport, Probes, SensitivityTracker

__all__ = ["MANY_FLAGGED", "EpochRunner"]

MANY_FLAGGED = 0.1
"""The share of a split's judged samples above which the monitor warns that its flags are many
(models with many positions)."""


class EpochRunner:
    """The monitor's work at a decision, and the time budget it is done within.

    Attributes:
        budget, planner: what the monitor spent; how much of each optional part fits now.
        drawing: the figure thread.
        prober: the parts that run the model.
        output: the parts that write.
    """

    def __init__(
        self,
        config: MonitorConfig,
        reader: Reader,
        tracker: SensitivityTracker,
        failures: Failures,
        describe_fn: Describe | None,
    ) -> None:
        self.config, self.tracker, self.failures = config, tracker, failures
        self.budget = TimeBudget(config.budget)
        self.planner = Planner(self.budget, failures)
        self.drawing = FigureWorker(self.budget)
        self.prober = Prober(config, reader, tracker, self.planner, failures)
        self.output = Output(config, self.planner, self.drawing, describe_fn)

    def end(
        self,
        trainer: Trainer,
        module: LightningModule,
        at: tuple[int, int],
        loaders: dict[str, DataLoader],
        use_evidence: bool,
        class_names: tuple[str, ...] | None,
    ) -> None:
        """A decision, on every rank: gather the scores (a collective), then on rank zero
        :meth:`run` where there is something to score (the scores gathered, or a training probe
        to draw); a failure skips the decision with a warning."""
        with self.failures.epoch(at[0]), preserved_rng():
            if self.prober.reader.layout is not None:  # many positions per sample
                rows = self.tracker.gather_positions()  # a collective: every rank
                log_dir = Path(trainer.log_dir or trainer.default_root_dir)
                if trainer.is_global_zero and rows:
                    self.run_positions(trainer, module, rows, loaders, at, log_dir)
                return
            scores = self.tracker.gather()  # a collective: every rank
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective, too
            if trainer.is_global_zero and (scores or "train" in loaders):
                self.run(trainer, module, scores, loaders, at, log_dir, use_evidence, class_names)

    def run(
        self,
        trainer: Trainer,
        module: LightningModule,
        scores: dict[str, SplitScores],
        loaders: dict[str, DataLoader],
        at: tuple[int, int],
        log_dir: Path,
        use_evidence: bool,
        class_names: tuple[str, ...] | None,
    ) -> None:
        """Probe, flag, write and draw one decision, logged at ``at`` = (epoch, step).
        ``use_evidence``: flag the training split by the evidence of every training step so
        far (:meth:`~lightning_sens.tracking.SensitivityTracker.compute`)."""
        epoch, step = at
        self.finish_figures(wait=False)  # an earlier epoch's figures failed: say so once
        self.planner.rows = sum(len(s.ids) for s in scores.values())
        probes = self.prober.probes(module, loaders, scores, epoch)
        quiet = trainer.progress_bar_callback is None
        self.prober.scan(module, loaders, scores, epoch, quiet)
        self.prober.damage(module, probes)
        if not scores:  # nothing was scored (the training probe failed or did not fit)
            return
        with self.budget.timed(FLAGS):  # flags, scalars and tables: the part the budget reserves
            extra = self._cost(probes) if self.planner.active else None
            report = self.tracker.compute(
                epoch, step, scores, probes, use_evidence=use_evidence, extra=extra
            )
            self.output.write(trainer.loggers, report, log_dir)
        self.planner.over(epoch)
        self._undecided(report, self._names(class_names))
        with self.failures.part("the figures"):
            self.output.figures(
                report,
                lambda wanted: self.prober.fetch_pictures(module, loaders, wanted),
                self.tracker.history,
                self.tracker.num_classes,
                self._names(class_names),
                log_dir,
            )

    def run_positions(
        self,
        trainer: Trainer,
        module: LightningModule,
        rows: dict[str, PositionRows],
        loaders: dict[str, DataLoader],
        at: tuple[int, int],
        log_dir: Path,
    ) -> None:
        """One decision of a model with many positions per sample: the curves, histograms, the
        positions table and the per-layer damage from sampled labels (docs/tasks.md, "What the
        monitor logs")."""
        layout = self.prober.reader.layout
        read = layout.describe() if layout is not None else ""
        flags = _flag_sentence(rows, self.tracker.flag_kind, self.tracker.config)
        self.failures.info_once(
            "positions",
            f"SensitivityMonitor reads this model's outputs as {read}: it logs the loss, "
            "the accuracy and log FI of every position reduced per sample (mean and upper "
            "quantile) for train and validation, writes every sample's scores to the positions "
            f"table, {flags} and predicts per-layer damage from the metric's trace with sampled "
            "labels. Figures other than the position maps and the exact probes are computed "
            "for one class per sample only in this version (docs/tasks.md).",
        )
        damage = self.prober.trace_damage(module, loaders, at[0])
        with self.budget.timed(FLAGS):
            extra = {keys.cost_share(): self.budget.cost_share} if self.planner.active else {}
            if layout is not None and layout.task != "multilabel":
                extra[keys.position_stride()] = float(self.prober.reader.stride)
            report = self.tracker.compute_positions(at[0], at[1], rows, extra, damage)
            self.output.write_positions(trainer.loggers, report, log_dir)
        self._many_flagged(report)
        if trainer.world_size > 1:  # a forward and a figure on rank zero crashed a gloo peer
            self.failures.info_once(
                "position-maps-ddp",
                "SensitivityMonitor draws the position maps in single-process runs only in this "
                "version; the positions table and the curves are written on every run.",
            )
        else:
            with self.failures.part("the position maps"):
                self._position_maps(module, rows, report.evidence, loaders, at, log_dir)
        self.planner.over(at[0])

    def _position_maps(
        self,
        module: LightningModule,
        rows: dict[str, PositionRows],
        evidence: dict[str, tuple[Tensor, Tensor]],
        loaders: dict[str, DataLoader],
        at: tuple[int, int],
        log_dir: Path,
    ) -> None:
        """The flagged samples of one split, highest evidence first, then those with the
        highest upper quantile of log FI, each position's log FI drawn over the sample
        (docs/tasks.md, "The position maps"): validation, else training; as far as the budget
        allows."""
        c, writer, layout = self.config, self.output.writer, self.prober.reader.layout
        if not c.log_images or writer is None or layout is None or c.num_images == 0:
            return
        if writer.tensorboard is None and not c.save_figures:
            return
        split = next((s for s in ("val", "train") if s in rows and s in loaders), None)
        if split is None:
            return
        fit = self.planner.fit(FIGURES, 1, 1, SECONDS_PER_FIGURE)
        if not fit.units:
            return
        with self.budget.timed(FIGURES):
            found = rows[split]
            share, flagged = evidence.get(split, (found.wrong_share, found.wrong_share > 1))
            order = torch.argsort(found.log_fi_upper.nan_to_num(float("-inf")), descending=True)
            first = torch.where(flagged, share, float("-inf"))[order].nan_to_num(float("-inf"))
            order = order[torch.argsort(first, descending=True, stable=True)]
            chosen = found.ids[order[: c.num_images]]
            reader = self.prober.reader
            inputs, labels, ids = reader.fetch(loaders[split], chosen, module.device)
            with eval_mode(module):
                logits = reader.forward(module, inputs)
            scores = position_scores(logits, labels, layout, reader.mask(inputs, labels))
            log_fi = scores.log_fi.reshape(len(ids), *scores.positions).cpu()
            pixels = log_fi.dim() == 3
            images = inputs if pixels and isinstance(inputs, Tensor) and inputs.dim() == 4 else None
            masks = labels.cpu() if pixels and layout.task == "multiclass" else None
            upper = dict(zip(found.ids.tolist(), found.log_fi_upper.tolist(), strict=True))
            wrong = {
                i: v
                for i, v, f in zip(
                    found.ids.tolist(), share.tolist(), flagged.tolist(), strict=True
                )
                if f
            }
            captions = [
                f"{split} {i}: "
                + (
                    _flag_caption(wrong[i], self.tracker.flag_kind)
                    if i in wrong
                    else f"upper log FI {upper[i]:.2f}"
                )
                for i in ids.tolist()
            ]
            classes = logits.shape[layout.class_dim or -1] if masks is not None else None
            if layout.flattened:
                classes = logits.shape[-1] if masks is not None else None
            maps = position_maps(log_fi, captions, images, masks, classes=classes)
            image = figure_to_image(maps)
            writer.image(keys.image("position_map", split), image, at[1])
            if c.save_figures:
                save_png(image, paths.figure(log_dir, "position_map", split, *at))
            writer.flush()

    def _many_flagged(self, report: PositionReport) -> None:
        """Once per run and split: a decision that flags more than :data:`MANY_FLAGGED` of
        the samples it judged, with what that may mean (docs/tasks.md, "Flags: which samples'
        labels look wrong")."""
        for split, (evidence, flagged) in report.evidence.items():
            judged, count = int(torch.isfinite(evidence).sum()), int(flagged.sum())
            if count > MANY_FLAGGED * judged:
                self.failures.warn_once(
                    f"many-flagged:{split}",
                    f"SensitivityMonitor flags {count} of the {judged} {split} samples it judged "
                    f"({count / judged:.0%}) at epoch {report.epoch}. So many flags mean many "
                    "wrong labels, a model still far from fitting its data, or one systematic "
                    "difference that runs through many samples (a border drawn thinner, a "
                    "convention changed halfway), where the rule cannot tell which convention is "
                    "the wrong one. Compare flagged and unflagged samples in the position maps "
                    "before removing any (docs/tasks.md).",
                )

    def _undecided(self, report: EpochReport, names: tuple[str, ...] | None) -> None:
        """Once per run and split: the classes whose labels the flag rule could not judge, and
        why (docs/flags.md, "When the rule declines to decide")."""
        for split, decision in report.decisions.items():
            undecided = decision.undecided_classes
            if undecided:
                shown = [names[k] if names else str(k) for k in undecided[:10]]
                more = f" and {len(undecided) - 10} more" if len(undecided) > 10 else ""
                self.failures.info_once(
                    f"undecided:{split}",
                    f"SensitivityMonitor flags no {split} sample of the classes "
                    f"{', '.join(shown)}{more} at epoch {report.epoch}: the model does not "
                    "separate them from the other classes yet, so their scores say nothing "
                    f"about their labels ({keys.undecided_classes(split)} counts such classes "
                    "at every decision).",
                )

    def _cost(self, probes: Probes) -> dict[str, float]:
        """The monitor's cost share so far and the exact probes' size at this decision."""
        size = max((len(ids) for ids in probes.ids.values()), default=0)
        return {keys.cost_share(): self.budget.cost_share, keys.exact_probe_size(): float(size)}

    def _names(self, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """Class names where they fit the model's classes (else the figures show numbers)."""
        k = self.tracker.num_classes
        if names is not None and len(names) != k:
            self.failures.warn_once(
                "class-names",
                f"SensitivityMonitor got {len(names)} class names for a model with {k} classes; "
                "the figures show class numbers instead.",
            )
            return None
        return names

    def finish_figures(self, wait: bool = True) -> None:
        """Raise (as a part) what the figures failed with; with ``wait``, first wait for the
        figures in flight and flush what they drew (the end of fit or validate)."""
        error = self.drawing.wait() if wait else self.drawing.failure()
        if error is not None:
            with self.failures.part("the figures"):
                raise error
        if wait and self.output.writer is not None:
            self.output.writer.flush()

    def close(self, trainer: Trainer, end_of_fit: bool) -> None:
        """The end of fit (the run's cost share, once) or of any stage (the event files)."""
        writer = self.output.writer
        if end_of_fit:
            self.finish_figures()
            self.budget.stop()
            if writer is not None and trainer.is_global_zero:
                writer.scalars({keys.cost_share(): self.budget.cost_share}, trainer.global_step)
                writer.flush()
            self.planner.active = False
            return
        self.finish_figures()
        self.drawing.close()
        if writer is not None:  # the split runs' event files; reopened if used again
            writer.close()


def _flag_caption(evidence: float, kind: FlagKind) -> str:
    """A flagged sample's caption in the position maps."""
    if kind == "documents":
        return f"flagged, loss {evidence:.1f} deviations above the rest"
    return f"flagged, ~{evidence:.0%} of labels wrong"


def _flag_sentence(rows: dict[str, PositionRows], kind: FlagKind, config: MonitorConfig) -> str:
    """What the positions' flags do for this model, in a few words."""
    if kind == "documents":
        return (
            "flags the documents whose loss (log perplexity) lies "
            f"{config.flag_threshold:g} robust standard deviations or more above the others' "
            "(docs/tasks.md),"
        )
    if kind == "ranking":
        return (
            "writes every sample's estimated share of wrong labels but flags none (one sigmoid "
            "per class: the rule is not yet quiet on clean multi-label data, docs/tasks.md),"
        )
    if any(bool(torch.isfinite(r.wrong_share).any()) for r in rows.values()):
        return (
            f"flags the samples an estimated {config.position_flag_share * 100:g} % or more of "
            "whose positions carry wrong labels (docs/tasks.md),"
        )
    return "flags nothing yet (no sample could be judged: docs/tasks.md),"
