"""SensitivityMonitor: the Lightning callback. It moves data between the Trainer and the core."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from lightning_sens.config import MonitorConfig
from lightning_sens.core import SensitivityResult, sensitivity
from lightning_sens.flagging import FlagHistory, flag
from lightning_sens.reporting import keys
from lightning_sens.reporting.images import epoch_images
from lightning_sens.reporting.summary import (
    SplitScores,
    epoch_metrics,
    flag_rows,
    probe_metrics,
    split_scores,
)
from lightning_sens.reporting.tables import write_table
from lightning_sens.reporting.writers import Writer, save_png

__all__ = ["MonitorSetupError", "SensitivityMonitor"]

Batch = tuple[Tensor, Tensor, Tensor | None]


class MonitorSetupError(TypeError):
    """The batches or the model's outputs cannot be read: raised even when ``strict=False``,
    since no later epoch would do better."""


def default_batch_fn(batch: Any) -> Batch:
    """``(inputs, labels)`` or ``(inputs, labels, sample_ids)``."""
    if isinstance(batch, list | tuple) and len(batch) in (2, 3) and isinstance(batch[0], Tensor):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise MonitorSetupError(
        f"SensitivityMonitor cannot read a batch of type {type(batch).__name__}; it expects "
        "(inputs, labels) or (inputs, labels, sample_ids). Pass batch_fn=lambda batch: "
        "(inputs, labels, ids_or_None)."
    )


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Monitoring must not move any random stream that training uses."""
    states = (random.getstate(), np.random.get_state())  # noqa: NPY002 (the global stream)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])  # noqa: NPY002


class SensitivityMonitor(Callback):
    """Sensitivity (the influence measure FI of Shu & Zhu, AAAI 2019) logged during validation.

    Every monitored validation epoch (``every_n_epochs``):

    1. every validation sample: closed-form FI of the whole input with the true and the predicted
       label, from the logits the validation loop computes (METHOD.md §5.1: exact, no backward);
    2. a fixed training probe (``train_probe_size`` samples, chosen once with ``seed``): the same,
       from one eval forward pass;
    3. the first ``exact_probe_size`` samples of the training probe and of a validation probe:
       the exact engine (whole-input rank certifying the closed form, input FI maps, per-layer FI,
       layer- and channel-scaling FI);
    4. flags: high-FI samples (true label) by ``flag_rule``, with persistence across epochs,
       written with every score to ``<log_dir>/sensitivity/flags_epoch<E>.csv``;
    5. with ``scan_train_set``, every ``scan_every_n_epochs`` monitored epochs: closed-form FI of
       every training sample (split ``train_all``: one eval forward pass per sample, on rank
       zero), so that outliers anywhere in the training set are flagged.

    Args:
        config: a :class:`~lightning_sens.config.MonitorConfig`; keyword options override its
            fields (``SensitivityMonitor(every_n_epochs=2)``).
        batch_fn: batch → (inputs, labels, sample ids or None), for batches that are not
            ``(inputs, labels[, ids])``.
        forward_fn: (module, inputs) → logits, for modules whose forward returns more.
        train_dataloader: where the training probe comes from when the Trainer has no training
            loader (``trainer.validate``, post-hoc evaluation).

    Logged metrics (all on the global-step axis; ``{t}`` is ``true`` or ``pred``, ``{s}`` is
    ``train``, ``val`` or, with the scan, ``train_all``; ``{stat}`` is ``median``, ``mean`` or
    ``q75`` … ``q100``):

    - ``sensitivity/{t}_label/{s}/log_fi_{stat}``: statistics of whole-input log FI;
    - ``sensitivity/{t}_label/gap/log_fi_{stat}``: train minus validation;
    - ``sensitivity/probe/{s}/closed_form_holds``: fraction of exact-probe samples with rank K − 1;
    - ``sensitivity/probe/{s}/map_w{w}_relative_fi_median``: input maps, window w;
    - ``sensitivity/layer_scale/{s}/{layer}``: median log FI of scaling the layer by one factor;
    - ``sensitivity/layer_channel/{s}/{layer}``: median relative FI of channel scaling;
    - ``sensitivity/layer_rank/{s}/{layer}``: mean effective rank of the layer's parameters;
    - ``sensitivity/layer_relative/{s}/{layer}``: median relative FI of the layer's parameters;
    - ``sensitivity/flags/{s}/flagged`` and ``.../persistent``: flag counts;
    - TensorBoard only: histograms ``sensitivity/{t}_label/{s}/log_fi``, a custom-scalars
      layout that overlays train and validation curves, and images
      ``sensitivity/images/{name}_{s}`` for ``name`` in ``manhattan`` (log FI by class, flags in
      red), ``flagged`` (the flagged samples, highest FI first), ``layer_heatmap`` (layer ×
      epoch), ``layer_strip`` (per-layer scaling FI of each probe sample) and ``fi_maps`` (input
      FI maps overlaid on the least confident probe samples);
    - hyperparameters ``sensitivity/<option>``: the configuration.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        batch_fn: Callable[[Any], Batch] | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
        train_dataloader: DataLoader | None = None,
        **options: Any,
    ) -> None:
        base = config or MonitorConfig()
        unknown = set(options) - {f.name for f in dataclasses.fields(MonitorConfig)}
        if unknown:
            raise TypeError(
                f"SensitivityMonitor got unknown options {sorted(unknown)}; see MonitorConfig "
                "for the allowed ones."
            )
        self.config = dataclasses.replace(base, **options)
        self.batch_fn = batch_fn or default_batch_fn
        self.forward_fn = forward_fn
        self.train_dataloader = train_dataloader
        # (epoch, step) to log under instead of the Trainer's: post-hoc evaluation of checkpoints
        self.position: tuple[int, int] | None = None
        self.probes: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.flags = FlagHistory(self.config.persistence)
        self._active = False
        self._buffer: list[SplitScores] = []
        self._seen = 0
        self._num_classes = 0
        self._writer: Writer | None = None

    @property
    def state_key(self) -> str:
        # Post-hoc evaluation must not pick up the state a training-time monitor saved.
        post_hoc = {"post_hoc": True} if self.position is not None else {}
        return self._generate_state_key(
            seed=self.config.seed, every_n_epochs=self.config.every_n_epochs, **post_hoc
        )

    # -- Lightning hooks --------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = self.position is not None or trainer.current_epoch % self.config.every_n_epochs == 0
        self._active = due and not trainer.sanity_checking
        self._buffer, self._seen = [], 0

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        with self._failure_policy(trainer):
            inputs, labels, ids = self.batch_fn(batch)
            if ids is None:
                ids = self._default_ids(trainer, len(labels))
            self._seen += len(labels)
            logits = self._logits(outputs, pl_module, inputs, len(labels))
            self._num_classes = logits.shape[1]
            self._buffer.append(split_scores(ids, labels, logits))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active or not self._buffer:
            return
        with self._failure_policy(trainer), _preserved_rng():
            scores = SplitScores.cat(self._buffer)
            self._buffer = []
            if trainer.world_size > 1:  # every rank scored its shard; rank zero gets them all
                scores = scores.map(lambda t: self._gather(pl_module, t))
            log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
            if trainer.is_global_zero:
                self._monitor_epoch(trainer, pl_module, scores.unique(), Path(log_dir))

    def _default_ids(self, trainer: Trainer, size: int) -> Tensor:
        """Dataset indices of an unshuffled validation loader, also under DistributedSampler,
        which deals indices round-robin and pads by wrapping around to the start."""
        position = torch.arange(self._seen, self._seen + size)
        if trainer.world_size == 1:
            return position
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, list | tuple) else loader
        total = len(loader.dataset)  # type: ignore[union-attr]
        return (trainer.global_rank + trainer.world_size * position) % total

    @staticmethod
    def _gather(module: LightningModule, values: Tensor) -> Tensor:
        gathered = module.all_gather(values.to(module.device))
        return gathered.flatten(0, 1).cpu()  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "probes": {k: v.tolist() for k, v in self.probes.items()},
            "history": self.history,
            "flags": self.flags.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes = {
            k: torch.tensor(v, dtype=torch.long) for k, v in state_dict["probes"].items()
        }
        self.history = list(state_dict["history"])
        self.flags = FlagHistory.from_state_dict(state_dict["flags"])

    # -- the work of one monitored epoch ------------------------------------------------------

    @contextmanager
    def _failure_policy(self, trainer: Trainer) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            if self.config.strict or isinstance(error, MonitorSetupError):
                raise
            self._active = False
            rank_zero_warn(
                f"SensitivityMonitor skipped the monitoring of epoch {trainer.current_epoch}: "
                f"{type(error).__name__}: {error} (pass strict=True to raise instead)."
            )

    def _logits(self, outputs: Any, module: LightningModule, inputs: Tensor, size: int) -> Tensor:
        """The validation step's logits where it returned them; otherwise one more forward."""
        if isinstance(outputs, dict):
            outputs = outputs.get("logits")
        if isinstance(outputs, Tensor) and outputs.dim() == 2 and outputs.shape[0] == size:
            return outputs
        return self._forward(module, inputs)

    def _forward(self, module: LightningModule, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.forward_fn(module, inputs) if self.forward_fn else module(inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise MonitorSetupError(
                f"The module's forward returned {shape}, not (B, K) logits. Pass "
                "SensitivityMonitor(forward_fn=lambda module, x: ...) that returns the logits."
            )
        return logits

    def _probe_indices(self, split: str, dataset_size: int, size: int) -> Tensor:
        if split not in self.probes:
            generator = torch.Generator().manual_seed(self.config.seed + (split == "val"))
            self.probes[split] = torch.randperm(dataset_size, generator=generator)[:size]
        return self.probes[split]

    def _fetch(
        self, loader: DataLoader, indices: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        samples = [loader.dataset[i] for i in indices.tolist()]
        inputs, labels, _ = self.batch_fn((loader.collate_fn or default_collate)(samples))
        return inputs.to(device), labels.to(device), indices

    def _scan_due(self) -> bool:
        done = len(self.flags.monitored.get("train", []))
        return self.config.scan_train_set and done % self.config.scan_every_n_epochs == 0

    def _scan(self, trainer: Trainer, loader: DataLoader, module: LightningModule) -> SplitScores:
        """Closed-form FI of every training sample, in dataset order (Setup 1 on the full set)."""
        ordered = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or 256,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        parts, seen = [], 0
        quiet = trainer.progress_bar_callback is None
        for batch in tqdm(
            ordered, desc="sensitivity: scanning the training set", leave=False, disable=quiet
        ):
            inputs, labels, ids = self.batch_fn(batch)
            if ids is None:
                ids = torch.arange(seen, seen + len(labels))
            seen += len(labels)
            parts.append(split_scores(ids, labels, self._forward(module, inputs.to(module.device))))
        return SplitScores.cat(parts)

    def _exact(self, module: LightningModule, inputs: Tensor, labels: Tensor) -> SensitivityResult:
        """Input maps with the predicted label (Setup 4), layers with the true label (Setup 2).

        The two calls share nothing but the forward pass; their backward products differ (to the
        input, and to the layers' outputs)."""
        options: dict[str, Any] = {
            "forward_fn": self.forward_fn,
            "chunk_size": self.config.chunk_size,
        }
        layers = sensitivity(
            module, inputs, labels, input_maps=False, layers=self.config.layers, **options
        )
        if not inputs.is_floating_point():
            return layers
        image = inputs.dim() == 4
        windows = tuple(w for w in self.config.windows if image and w <= min(inputs.shape[-2:]))
        maps = sensitivity(module, inputs, "pred", windows=windows, parameters=False, **options)
        return dataclasses.replace(layers, input=maps.input)

    def _monitor_epoch(
        self, trainer: Trainer, module: LightningModule, val: SplitScores, log_dir: Path
    ) -> None:
        """Rank zero: probes, flags, logging and tables of one monitored epoch."""
        epoch, step = self.position or (trainer.current_epoch, trainer.global_step)
        scores = {"val": val}
        probes: dict[str, SensitivityResult] = {}
        probe_ids: dict[str, Tensor] = {}
        loaders = {}
        train = trainer.train_dataloader
        train = self.train_dataloader if train is None else train
        for split, found in (("train", train), ("val", trainer.val_dataloaders)):
            loader = found[0] if isinstance(found, list | tuple) and found else found
            if isinstance(loader, DataLoader):
                loaders[split] = loader
        for split, loader in loaders.items():
            size = (
                self.config.train_probe_size if split == "train" else self.config.exact_probe_size
            )
            indices = self._probe_indices(split, len(loader.dataset), size)  # type: ignore[arg-type]
            inputs, labels, ids = self._fetch(loader, indices, module.device)
            if split == "train":
                logits = torch.cat([self._forward(module, part) for part in inputs.split(256)])
                scores["train"] = split_scores(ids, labels, logits)
            exact = slice(0, self.config.exact_probe_size)
            if self.config.exact_probe_size > 0:
                probes[split] = self._exact(module, inputs[exact], labels[exact])
                probe_ids[split] = ids[exact]
        if "train" in loaders and self._scan_due():
            scores["train_all"] = self._scan(trainer, loaders["train"], module)
            loaders["train_all"] = loaders["train"]

        metrics = epoch_metrics(scores)
        for split, result in probes.items():
            metrics.update(probe_metrics(split, result, self._num_classes))
        rows = []
        decisions = {}
        for split, s in scores.items():
            decision = decisions[split] = flag(
                s.log_fi_true, self.config.flag_rule, self.config.flag_threshold, self.config.top_k
            )
            self.flags.update(split, epoch, s.ids[decision.flagged].tolist())
            ranks: dict[int, int] = {}
            if split in probes and probes[split].input is not None:
                whole = probes[split].input.whole.effective_rank  # type: ignore[union-attr]
                ranks = dict(zip(probe_ids[split].tolist(), whole.tolist(), strict=True))
            split_rows = flag_rows(split, epoch, s, decision, self.flags, ranks)
            rows += split_rows
            metrics[keys.flag_count(split)] = float(decision.flagged.sum())
            persistent = sum(r.flagged_recent * 2 > self.config.persistence for r in split_rows)
            metrics[keys.persistent_count(split)] = float(persistent)

        self.history.append({"epoch": epoch, "step": step, **metrics})
        writer = self._writer = self._writer or self._new_writer(trainer)
        writer.layout(keys.custom_scalars_layout())
        writer.scalars(metrics, step)
        for split, s in scores.items():
            writer.histogram(keys.histogram("true", split), s.log_fi_true, step)
            writer.histogram(keys.histogram("pred", split), s.log_fi_pred, step)
        if self.config.log_images and (writer.tensorboard is not None or self.config.save_figures):

            def fetch(split: str, ids: Tensor) -> Tensor:
                return self._fetch(loaders[split], ids, module.device)[0]

            images = epoch_images(
                scores,
                decisions,
                probes,
                probe_ids,
                self.history,
                self._num_classes,
                self.config.num_images,
                fetch,
            )
            for tag, image in images.items():
                writer.image(tag, image, step)
                if self.config.save_figures:
                    name = f"{tag.rsplit('/', 1)[-1]}_epoch{epoch:04d}.png"
                    save_png(image, log_dir / "sensitivity" / "figures" / name)
        if self.config.log_images and writer.tensorboard is None:
            writer.skip_images()
        writer.flush()
        write_table(rows, log_dir / "sensitivity" / f"flags_epoch{epoch:04d}.csv")

    def _new_writer(self, trainer: Trainer) -> Writer:
        writer = Writer(trainer.loggers)
        for logger in trainer.loggers:  # the configuration, once, with the run's hparams
            logger.log_hyperparams(
                {f"sensitivity/{k}": v for k, v in self.config.to_dict().items()}
            )
        return writer
