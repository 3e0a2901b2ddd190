"""The model-running parts of a decision, on rank zero: the training probe, the exact
engine on the probes, the training-set scan and the per-layer damage, each as far as the time
budget allows (:class:`~lightning_sens.callbacks.planner.Planner`) and each left out alone
when it fails (:class:`~lightning_sens.callbacks.policy.Failures`)."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_sens.callbacks.batches import Reader
from lightning_sens.callbacks.planner import EXACT, EXACT_FORWARDS_PER_CLASS, MIN_EXACT, Planner
from lightning_sens.callbacks.policy import Failures
from lightning_sens.config import MonitorConfig
from lightning_sens.core import SensitivityResult, sensitivity
from lightning_sens.core.inputs import Inputs, usable_windows
from lightning_sens.core.trace import DRAWS, sampled_metric_trace
from lightning_sens.damage import predict_damage
from lightning_sens.reporting.positions import TracedDamage
from lightning_sens.reporting.summary import SplitScores, split_scores
from lightning_sens.tracking import SCALE, Probes, SensitivityTracker

__all__ = ["Prober"]


class Prober:
    """Runs the model for the parts of an epoch that need it."""

    def __init__(
        self,
        config: MonitorConfig,
        reader: Reader,
        tracker: SensitivityTracker,
        planner: Planner,
        failures: Failures,
    ) -> None:
        self.config = config
        self.reader = reader
        self.tracker = tracker
        self.planner = planner
        self.failures = failures
        self.scan_pending = False

    def exact(self, module: LightningModule, inputs: Inputs, labels: Tensor) -> SensitivityResult:
        """Input maps with the predicted label (Setup 4), layers with the true label (Setup 2),
        from one forward pass and one set of backward products (``input_target``). A layer the
        engine cannot measure is left out, with one warning per run."""
        with self.failures.engine_warnings():
            result = sensitivity(
                module,
                inputs,
                labels,
                input_target="pred",
                windows=usable_windows(inputs, self.config.windows),
                layers=self.config.layers,
                exclude_layers=self.config.exclude_layers,
                on_unsupported="skip",
                channel_metric=True,
                forward_fn=self.reader.forward_fn,
                chunk_size=self.config.chunk_size,
            )
        if result.parameters is not None:
            for layer, reason in result.parameters.skipped.items():
                self.failures.warn_once(
                    f"layer:{layer}",
                    f"SensitivityMonitor leaves layer {layer!r} out of the per-layer FI: {reason}",
                )
        return result

    def probes(
        self,
        module: LightningModule,
        loaders: dict[str, DataLoader],
        scores: dict[str, SplitScores],
        epoch: int,
    ) -> Probes:
        """The training probe's closed form (where the training steps were not scored: added
        to ``scores``), then the exact engine on the first samples of both probes, as many as
        the budget allows."""
        c, plan = self.config, self.planner
        sizes = {"train": max(c.train_probe_size, c.exact_probe_size), "val": c.exact_probe_size}
        indices = {
            split: self.tracker.probe(split, len(loader.dataset), sizes[split])  # type: ignore[arg-type]
            for split, loader in loaders.items()
            if split in sizes and sizes[split] > 0
        }
        if "train" in indices and "train" not in scores:
            wanted = min(c.train_probe_size, len(indices["train"]))
            fit = plan.fit("train probe", wanted, min(64, wanted), plan.prior(1.0))
            plan.notice("train probe", fit, f"scored {fit.units} of {wanted} probe samples", epoch)
            if fit.units:
                with (
                    self.failures.part("the train probe"),
                    plan.budget.timed("train probe", fit.units),
                ):
                    chosen = indices["train"][: fit.units]
                    inputs, labels, ids = self.reader.fetch(loaders["train"], chosen, module.device)
                    logits = self.reader.logits(None, module, inputs, len(labels))
                    scores["train"] = split_scores(ids, labels, logits)
                    self.tracker.num_classes = logits.shape[-1]

        found = Probes()
        wanted = min([c.exact_probe_size, *(len(i) for i in indices.values())]) if indices else 0
        splits = list(indices)
        # units: samples × splits; the prior: the engine's forward passes per sample and split
        forwards = EXACT_FORWARDS_PER_CLASS * self.tracker.num_classes
        fit = plan.fit(EXACT, wanted * len(splits), MIN_EXACT * len(splits), plan.prior(forwards))
        size = fit.units // max(len(splits), 1)
        if fit.first_look:  # the smallest useful probe of one split: validation if there is one
            splits, size = ["val" if "val" in splits else splits[0]], min(MIN_EXACT, wanted)
        what = (
            f"ran the exact probes on {size} of {wanted} samples of {' and '.join(splits)}"
            if size
            else "skipped the exact probes"
        )
        plan.notice(EXACT, fit, what, epoch)
        if size:
            with (
                self.failures.part("the exact engine on the probes"),
                plan.budget.timed(EXACT, size * len(splits)),
            ):
                for split in splits:
                    inputs, labels, ids = self.reader.fetch(
                        loaders[split], indices[split][:size], module.device
                    )
                    found.results[split] = self.exact(module, inputs, labels)
                    found.ids[split] = ids
        return found

    def damage(self, module: LightningModule, probes: Probes) -> None:
        """Per-layer damage predicted from each probe's metric (docs/damage.md, "What the
        metric predicts")."""
        c = self.config
        for split, result in probes.results.items():
            if result.parameters is not None:
                with self.failures.part("the per-layer damage"), self.failures.engine_warnings():
                    probes.damage[split] = predict_damage(
                        module, result.parameters, (c.damage_noise,), (c.damage_bits,), (SCALE,)
                    )

    def trace_damage(
        self, module: LightningModule, loaders: dict[str, DataLoader], epoch: int
    ) -> dict[str, TracedDamage]:
        """A model with many positions per sample: per-layer damage predicted from the metric's
        trace, estimated with labels sampled from the model on the validation probe (else the
        training probe), as far as the budget allows (docs/damage.md, "Large outputs: the
        trace from sampled labels")."""
        c, plan, layout = self.config, self.planner, self.reader.layout
        split = "val" if "val" in loaders else "train"
        if layout is None or split not in loaders or c.exact_probe_size == 0:
            return {}
        indices = self.tracker.probe(split, len(loaders[split].dataset), c.exact_probe_size)  # type: ignore[arg-type]
        wanted = len(indices)
        fit = plan.fit(EXACT, wanted, min(MIN_EXACT, wanted), plan.prior(float(DRAWS)))
        what = f"ran the sampled-label trace on {fit.units} of {wanted} samples of {split}"
        plan.notice(EXACT, fit, what if fit.units else "skipped the sampled-label trace", epoch)
        found: dict[str, TracedDamage] = {}
        if not fit.units:
            return found
        with self.failures.part("the per-layer damage"), plan.budget.timed(EXACT, fit.units):
            chosen = indices[: fit.units]
            inputs, labels, _ = self.reader.fetch(loaders[split], chosen, module.device)
            with self.failures.engine_warnings():
                trace = sampled_metric_trace(
                    module,
                    inputs,
                    layout=layout,
                    mask=self.reader.mask(inputs, labels),
                    layers=c.layers,
                    exclude_layers=c.exclude_layers,
                    forward_fn=self.reader.forward_fn,
                    channel_metric=True,
                    chunk_size=c.chunk_size,
                    seed=c.seed + epoch,
                )
            for layer, reason in trace.skipped.items():
                self.failures.warn_once(
                    f"layer:{layer}",
                    f"SensitivityMonitor leaves layer {layer!r} out of the per-layer damage: "
                    f"{reason}",
                )
            damage = predict_damage(module, trace, (c.damage_noise,), (c.damage_bits,), ())
            found[split] = TracedDamage(damage, trace)
        return found

    def scan(
        self,
        module: LightningModule,
        loaders: dict[str, DataLoader],
        scores: dict[str, SplitScores],
        epoch: int,
        quiet: bool,
    ) -> None:
        """With ``scan_train_set``, when due and within the budget: the closed form of every
        training sample (split ``train_all``, added to ``scores`` and ``loaders``)."""
        self.scan_pending = self.scan_pending or self.tracker.scan_due()
        if "train" not in loaders or not self.scan_pending:
            return
        size = len(loaders["train"].dataset)  # type: ignore[arg-type]
        fit = self.planner.fit("scan", 1, prior=self.planner.prior(float(size)))
        self.planner.notice("scan", fit, "postponed the training-set scan", epoch)
        if fit.units:
            self.scan_pending = False
            with self.failures.part("the training-set scan"), self.planner.budget.timed("scan"):
                device = module.device
                scores["train_all"] = self.reader.scan(loaders["train"], module, device, quiet)
                loaders["train_all"] = loaders["train"]

    def fetch_pictures(
        self,
        module: LightningModule,
        loaders: dict[str, DataLoader],
        wanted: dict[tuple[str, str], Tensor],
    ) -> dict[tuple[str, str], Inputs]:
        """The inputs of the samples the figures picture, by (figure kind, split)."""
        return {
            (kind, split): self.reader.fetch(loaders[split], ids, module.device)[0]
            for (kind, split), ids in wanted.items()
        }
