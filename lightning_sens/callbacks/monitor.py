"""SensitivityMonitor: the Lightning callback. It moves data between the Trainer and the core."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from lightning_sens.callbacks.budget import Fit, TimeBudget
from lightning_sens.callbacks.drawing import FigureWorker
from lightning_sens.callbacks.rng import preserved_rng
from lightning_sens.callbacks.setup import (
    MonitorSetupError,
    check_labels,
    dataset_classes,
    describe_inputs,
    eval_mode,
    shape_of,
    source_loader,
)
from lightning_sens.callbacks.train_scores import TrainScores
from lightning_sens.config import MonitorConfig
from lightning_sens.core import SensitivityResult, sensitivity
from lightning_sens.core.inputs import (
    Inputs,
    default_forward,
    logits_of,
    select,
    to_device,
    usable_windows,
)
from lightning_sens.damage import LayerDamage, predict_damage
from lightning_sens.flagging import FlagDecision, FlagHistory, flag
from lightning_sens.label_noise import LabelEvidence, estimate_noise
from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.images import Describe, epoch_images, pictured_samples
from lightning_sens.reporting.summary import (
    SplitScores,
    epoch_metrics,
    flag_columns,
    label_scores,
    layer_rows,
    probe_metrics,
    split_scores,
)
from lightning_sens.reporting.tables import LAYER_COLUMNS, LayerRow, write_table
from lightning_sens.reporting.writers import Writer, save_png

__all__ = ["MonitorSetupError", "SensitivityMonitor"]

_SCALE = 0.1  # δ of the layer table's "scale by 1 + δ" column
# Until a part has run once, the budget assumes: the exact engine costs this many forward passes
# per probe sample and split (one forward, K − 1 backward products, the Grams, in chunks smaller
# than the validation batches: about 10 K on a small CNN), and a
# figure this many seconds of CPU time (matplotlib, on the CPU of the training machine).
_EXACT_FORWARDS_PER_CLASS = 10.0
_SECONDS_PER_FIGURE = 0.25
_MIN_EXACT = 4  # fewer exact-probe samples per split than this are not worth an engine call
_SECONDS_PER_ROW = 1e-5  # flags and tables, per scored sample, until measured

Batch = tuple[Inputs, Tensor, Tensor | None]

# Keys of a dict batch (Hugging Face style) that are not model inputs.
LABEL_KEYS = ("labels", "label")
ID_KEYS = ("sample_id", "idx")


def default_batch_fn(batch: Any) -> Batch:
    """``(inputs, labels)``, ``(inputs, labels, sample_ids)``, or a dict batch.

    Inputs are a tensor or a dict of tensors. A dict batch (Hugging Face style) holds its labels
    under ``"labels"`` or ``"label"`` and optionally sample ids under ``"sample_id"`` or
    ``"idx"``; every other entry is passed to the model as a keyword argument.
    """
    pair = isinstance(batch, list | tuple) and len(batch) in (2, 3)
    if pair and isinstance(batch[0], Tensor | Mapping) and isinstance(batch[1], Tensor):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    if isinstance(batch, Mapping):
        found = [k for k in LABEL_KEYS if isinstance(batch.get(k), Tensor)]
        if found:
            ids = next((batch[k] for k in ID_KEYS if isinstance(batch.get(k), Tensor)), None)
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS + ID_KEYS}
            return inputs, batch[found[0]], ids
        raise MonitorSetupError(
            f"SensitivityMonitor cannot find the labels of a dict batch (keys {sorted(batch)}); "
            f"it reads them from {' or '.join(map(repr, LABEL_KEYS))}. Pass batch_fn=lambda "
            "batch: (inputs, labels, ids_or_None)."
        )
    raise MonitorSetupError(
        f"SensitivityMonitor cannot read a batch of type {type(batch).__name__}; it expects "
        "(inputs, labels), (inputs, labels, sample_ids) or a dict with 'labels'. Pass "
        "batch_fn=lambda batch: (inputs, labels, ids_or_None)."
    )


def _charged(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A hook whose wall time counts against the monitor's time budget."""

    @functools.wraps(hook)
    def charged(self: SensitivityMonitor, *args: Any, **kwargs: Any) -> Any:
        with self.budget.timed():
            return hook(self, *args, **kwargs)

    return charged


class SensitivityMonitor(Callback):
    """Sensitivity (the influence measure FI of Shu & Zhu, AAAI 2019) logged during validation.

    Every monitored validation epoch (``every_n_epochs``):

    1. every validation sample: closed-form FI of the whole input with the true and the predicted
       label, from the logits the validation loop computes (docs/method.md: exact, no backward);
    2. every training sample, from the logits of its training steps (``score_training_steps``),
       or else a fixed training probe (``train_probe_size`` samples, chosen once with ``seed``):
       the same, from one eval forward pass;
    3. the first ``exact_probe_size`` samples of the training probe and of a validation probe:
       the exact engine, one call per probe (whole-input rank certifying the closed form, input
       FI maps with the predicted label, per-layer FI and damage with the true label);
    4. flags: high-FI samples (true label) by ``flag_rule``, with persistence across epochs,
       written with every score to ``<log_dir>/sensitivity/flags_epoch<E>.csv``; per-layer
       predicted damage next to the paper's per-layer FI families in
       ``<log_dir>/sensitivity/layers_epoch<E>.csv``;
    5. with ``scan_train_set``, every ``scan_every_n_epochs`` monitored epochs: closed-form FI of
       every training sample (split ``train_all``: one eval forward pass per sample, on rank
       zero), so that outliers anywhere in the training set are flagged.

    Within ``budget`` (default 0.05: the monitored ``fit`` takes at most 5 % longer): the monitor
    times itself and runs parts 2 (the probe), 3 and 5 and the figures only as far as they fit;
    parts 1 and 4 are always done. Figures are drawn on a background thread (docs/monitor.md,
    "The time budget").

    It works on any model the engine supports (docs/engine.md): CNNs, transformers with dict
    batches (Hugging Face conventions: ``labels`` in the batch, a ``logits`` attribute on the
    output), recurrent, compiled and low-precision models. The monitor degrades per part, never
    per epoch: the closed-form scores, curves, flags and tables are always written; if the exact
    probes, a layer, the training probe or the figures fail, that part is left out with one
    warning per run (``strict=True`` raises instead).

    Args:
        config: a :class:`~lightning_sens.config.MonitorConfig`; keyword options override its
            fields (``SensitivityMonitor(every_n_epochs=2)``).
        batch_fn: batch → (inputs, labels, sample ids or None), for batches that
            :func:`default_batch_fn` cannot read.
        forward_fn: (module, inputs) → logits, for modules whose forward returns something
            else than logits or an output with a ``logits`` attribute or key.
        train_dataloader: where the training probe comes from when the Trainer has no training
            loader (``trainer.validate``, post-hoc evaluation).
        describe_fn: one sample's inputs (a batch of one) → a line of text, for pictures of
            samples that are not images (e.g. ``lambda x: tokenizer.decode(x["input_ids"][0])``;
            default: the token ids).

    Logged metrics (on the global-step axis; ``{s}`` is the split: ``train``, ``val`` or, with
    the scan, ``train_all``; ``{t}`` is ``true`` or ``pred``; ``{stat}`` is ``median``, ``mean``
    or ``q75`` … ``q100``). Other loggers get the keys as they are; TensorBoard gets one run per
    split, ``<log_dir>/sensitivity/{s}``, with the tag the key without ``{s}/`` (Keras'
    convention: Time Series overlays train and validation in two colours):

    - ``sensitivity/{s}/flagged``, ``.../persistent``, ``.../estimated_wrong``: flag counts and
      the counterfactual rule's estimated share of wrong labels;
    - ``sensitivity/{s}/loss``, ``.../accuracy``: of the scored samples;
    - ``sensitivity/train_val_gap``: train minus validation median log FI, predicted label;
    - ``sensitivity_fi/{s}/{t}_label/log_fi_{stat}``: statistics of whole-input log FI;
    - ``sensitivity_layers/{s}/kl_noise/{layer}``: expected KL (nats per sample) of Gaussian
      noise of ``damage_noise`` × the layer's rms on its parameters, from the metric tr(G_l):
      which layers a perturbation damages most (docs/damage.md);
    - ``sensitivity_layers/{s}/kl_{b}bit/{layer}``: expected KL of rounding the layer's weights
      to ``damage_bits`` bits, one step per output channel (Linear and convolution layers);
    - ``sensitivity_layers/{s}/at_closed_form``: share of the layers at rank K − 1, and for the
      others only ``.../log_fi/{layer}``, ``.../relative_fi/{layer}``, ``.../rank/{layer}``;
    - ``sensitivity_probe/{s}/closed_form_holds``: fraction of exact-probe samples with rank
      K − 1; ``sensitivity_probe/{s}/map_w{w}_relative_fi_median``: input maps, for the windows
      below rank K − 1;
    - ``sensitivity_monitor/cost_share``: the monitor's seconds per second of the rest of
      training (with a budget; also once at the end of fit) and
      ``sensitivity_monitor/exact_probe_size``: the exact probes' samples per split this epoch;
    - TensorBoard only: histograms ``sensitivity_fi/{s}/{t}_label/log_fi``, the configuration as
      text ``sensitivity_monitor/config``, and images ``sensitivity_images/{s}/{name}`` for
      ``name`` in ``manhattan`` (log FI by class, flags in red), ``flagged`` (the flagged
      samples, highest FI first: pictures of images, text of anything else),
      ``layer_heatmap`` (expected KL under noise, layer × epoch), ``layer_strip`` (the same per
      probe sample) and ``fi_maps`` (input maps overlaid on the least confident probe samples;
      per-token strips for token inputs);
    - other loggers: hyperparameters ``sensitivity/<option>``, the configuration.

    Before the first step of ``fit`` and ``validate`` the monitor reads one batch of each split
    and runs the model and the engine on it: setup errors (:class:`MonitorSetupError`) come in
    seconds.

    Warnings (once per run each): a part of an epoch's monitoring that failed, a layer the
    engine could not measure, token inputs without an embedding to perturb, and the other
    loggers' lack of image support.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        batch_fn: Callable[[Any], Batch] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        train_dataloader: DataLoader | None = None,
        describe_fn: Describe | None = None,
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
        self.describe_fn = describe_fn
        # (epoch, step) to log under instead of the Trainer's: post-hoc evaluation of checkpoints
        self.position: tuple[int, int] | None = None
        self.probes: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.flags = FlagHistory(self.config.persistence)
        # every training sample's log FI under every label, summed over the training steps
        self.evidence: LabelEvidence | None = None
        # per class and cell, the largest count of wrong labels estimated from one epoch's training
        # steps (after the first): memorisation lowers later estimates, this keeps the evidence
        self.noise_floor: Tensor | None = None
        self._folds = 0
        self._train = TrainScores(self.batch_fn, self._warn_once)
        self._train_epoch: SplitScores | None = None
        self._active = False
        self._buffer: list[SplitScores] = []
        self._seen = 0
        self._num_classes = 0
        self._writer: Writer | None = None
        self._warned: set[str] = set()
        # the time budget: what the monitor spent, what each optional part costs
        self.budget = TimeBudget(self.config.budget)
        self._drawing = FigureWorker(self.budget)
        self._budgeted = False  # during fit only
        self._forward_cost: float | None = None  # seconds per validation sample, eval forward
        self._validation_clock = (0.0, 0.0)
        self._scan_pending = False
        self._rows = 0  # scored samples of this epoch: its flag table's rows
        self._checked: set[tuple[str, int]] = set()  # (stage, trainer) whose setup was checked
        self.class_names: tuple[str, ...] | None = self.config.class_names
        # what the Trainer's precision does to a batch before the model sees it (64-true: to
        # float64); applied to every batch the monitor reads itself
        self._convert_input: Callable[[Any], Any] = lambda batch: batch

    @property
    def figure_sets_drawn(self) -> int:
        """Monitored epochs whose figures were drawn to the end (the time budget skips some)."""
        return self._drawing.drawn

    @property
    def state_key(self) -> str:
        # Post-hoc evaluation must not pick up the state a training-time monitor saved.
        post_hoc = {"post_hoc": True} if self.position is not None else {}
        return self._generate_state_key(
            seed=self.config.seed, every_n_epochs=self.config.every_n_epochs, **post_hoc
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._convert_input = trainer.precision_plugin.convert_input

    # -- fail in seconds: one batch of each split and one sample through everything ------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = {}
        sources = (("train", trainer.fit_loop), ("val", trainer.fit_loop.epoch_loop.val_loop))
        for split, loop in sources:
            found = source_loader(loop)
            if found is not None:
                loaders[split] = found
        self._check_setup(trainer, pl_module, "fit", loaders)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # trainer.validate: its loaders are set up
            self._check_setup(trainer, pl_module, "validate", self._loaders(trainer))

    def _check_setup(
        self,
        trainer: Trainer,
        module: LightningModule,
        stage: str,
        loaders: dict[str, DataLoader],
    ) -> None:
        """Read one batch of each split with ``batch_fn``, run the forward on it and the exact
        engine on one sample: errors in the batches, the outputs or the labels are raised now
        (:class:`MonitorSetupError`), not after a training epoch; an engine failure warns now
        (the part it affects is left out later, as it would be anyway)."""
        if (stage, id(trainer)) in self._checked:  # every rank: all raise, none waits
            return
        self._checked.add((stage, id(trainer)))
        if self.class_names is None:
            self.class_names = dataset_classes(loaders.get("val") or loaders.get("train"))
        first: tuple[Inputs, Tensor] | None = None
        with preserved_rng(), eval_mode(module):
            for split, loader in loaders.items():
                inputs, labels = self._first_batch(loader, split, module.device)
                try:
                    logits = self._forward(module, inputs)
                except MonitorSetupError:
                    raise
                except Exception as error:
                    raise MonitorSetupError(
                        f"SensitivityMonitor cannot run the model on a {split} batch "
                        f"({describe_inputs(inputs)}): {type(error).__name__}: {error}. Check "
                        "batch_fn (what it passes to the model) and forward_fn."
                    ) from error
                check_labels(split, labels, logits)
                first = first or (select(inputs, slice(0, 1), len(labels)), labels[:1])
            if first is not None and self.config.exact_probe_size > 0:
                with self._part("the exact engine on the probes"):
                    self._exact(module, *first)

    def _first_batch(
        self, loader: DataLoader, split: str, device: torch.device
    ) -> tuple[Inputs, Tensor]:
        """The first batch, its samples fetched from the dataset (no workers started), or
        the loader's first batch where the dataset cannot be indexed."""
        dataset = loader.dataset
        try:
            size = min(loader.batch_size or 2, len(dataset))  # type: ignore[arg-type]
            samples = [dataset[i] for i in range(size)]
            batch = (loader.collate_fn or default_collate)(samples)
        except (TypeError, NotImplementedError, AttributeError):
            batch = next(iter(loader))
        try:
            inputs, labels, _ = self.batch_fn(self._convert_input(batch))
        except MonitorSetupError:
            raise
        except Exception as error:
            raise MonitorSetupError(
                f"SensitivityMonitor cannot read the first {split} batch with batch_fn: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise MonitorSetupError(
                f"SensitivityMonitor read labels of shape {shape_of(labels)} from a {split} "
                "batch; it needs one class index per sample, (B,). Pass batch_fn=lambda batch: "
                "(inputs, labels, ids_or_None)."
            )
        return to_device(inputs, device), labels.to(device)

    # -- Lightning hooks: training steps ------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.budget.start()
        self._budgeted = self.config.budget is not None
        with self.budget.timed():
            if self.config.score_training_steps:
                self._train.start(trainer, pl_module)

    @_charged
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train.on_epoch_start()

    @_charged
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._train.on_batch_start()

    @_charged
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._train.active:
            return
        try:
            self._train.on_batch_end(trainer, pl_module, outputs, batch)
        except Exception as error:
            if self.config.strict or isinstance(error, MonitorSetupError):
                raise
            self._train.active = False
            self._warn_once(
                "train-error",
                f"SensitivityMonitor stopped scoring the training steps ({type(error).__name__}: "
                f"{error}); the training curves come from the probe (strict=True raises).",
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train.stop()
        self._finish_figures()
        self.budget.stop()
        if self._writer is not None and trainer.is_global_zero:  # the whole run's cost share
            self._writer.scalars({keys.cost_share(): self.budget.cost_share}, trainer.global_step)
            self._writer.flush()
        self._budgeted = False

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._train.stop()
        self._drawing.wait()  # the figures drawn so far reach the logs; their errors do not matter

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish_figures()
        self._drawing.close()
        if self._writer is not None:  # the split runs' event files; reopened if used again
            self._writer.close()

    def _finish_figures(self) -> None:
        """Wait for the figures in flight (the end of fit or validate) and flush them."""
        error = self._drawing.wait()
        if error is not None:
            with self._part("the figures"):
                raise error
        if self._writer is not None:
            self._writer.flush()

    # -- Lightning hooks: validation ---------------------------------------------------------

    @_charged
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = self.position is not None or trainer.current_epoch % self.config.every_n_epochs == 0
        self._active = due and not trainer.sanity_checking
        self._buffer, self._seen = [], 0
        self._validation_clock = (time.perf_counter(), self.budget.used)

    @_charged
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

    @_charged
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active and self._seen:  # the loop's own time per sample: the budget's prior
            began, used = self._validation_clock
            loop = time.perf_counter() - began - (self.budget.used - used)
            self._forward_cost = max(loop, 0.0) / self._seen
        if self._train.started and not trainer.sanity_checking:
            with self._part("the training-step scores"):
                self._fold_training_steps(trainer)  # a collective: every rank takes part
        if not self._active or not self._buffer:
            return
        with self._failure_policy(trainer), preserved_rng():
            scores = SplitScores.cat(self._buffer)
            self._buffer = []
            if trainer.world_size > 1:  # every rank scored its shard; rank zero gets them all
                scores = scores.map(lambda t: self._gather(pl_module, t))
            log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
            if trainer.is_global_zero:
                self._monitor_epoch(trainer, pl_module, scores.unique(), Path(log_dir))

    def _fold_training_steps(self, trainer: Trainer) -> None:
        """Add the training steps' scores since the last validation to the evidence; keep
        their per-sample mean as this epoch's view of the training set."""
        found = self._train.collect(trainer)
        if found is None and self._train.active:
            self._warn_once(
                "train-none",
                "SensitivityMonitor scored no training step since the last validation (no "
                "batch of the training loader reached it with its sample ids); the training "
                "curves come from the probe.",
            )
        if found is None or not trainer.is_global_zero:
            return
        ids, labels, scores = found
        window = LabelEvidence.empty(scores.shape[-1]).update(ids, labels, scores)
        self._train_epoch = label_scores(window.ids, window.labels, window.mean)
        counterfactual = self.config.flag_rule in ("counterfactual", "counterfactual_pairs")
        if counterfactual and self._folds > 0:  # the first epoch mixes in the untrained network
            pairs = self.config.flag_rule == "counterfactual_pairs"
            estimated = estimate_noise(window.mean, window.labels, pairs=pairs).per_cell
            floor = self.noise_floor
            self.noise_floor = estimated if floor is None else torch.maximum(floor, estimated)
        self._folds += 1
        self.evidence = (self.evidence or LabelEvidence.empty(scores.shape[-1])).update(
            ids, labels, scores
        )

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
            "evidence": None if self.evidence is None else self.evidence.state_dict(),
            "noise_floor": self.noise_floor,
            "folds": self._folds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes = {
            k: torch.tensor(v, dtype=torch.long) for k, v in state_dict["probes"].items()
        }
        self.history = list(state_dict["history"])
        self.flags = FlagHistory.from_state_dict(state_dict["flags"])
        evidence = state_dict.get("evidence")
        self.evidence = None if evidence is None else LabelEvidence.from_state_dict(evidence)
        self.noise_floor = state_dict.get("noise_floor")
        self._folds = int(state_dict.get("folds", 0))

    # -- failures: per epoch where nothing can be scored, per part otherwise -------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @contextmanager
    def _failure_policy(self, trainer: Trainer) -> Iterator[None]:
        """Reading the batches or their logits failed: nothing of this epoch can be scored."""
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

    @contextmanager
    def _part(self, what: str) -> Iterator[None]:
        """One part of an epoch's monitoring: on failure it is left out, the rest goes on."""
        try:
            yield
        except Exception as error:
            if self.config.strict or isinstance(error, MonitorSetupError):
                raise
            self._warn_once(
                f"part:{what}:{type(error).__name__}",
                f"SensitivityMonitor left out {what} ({type(error).__name__}: {error}); the "
                "scores, curves, flags and tables are still written. This warning is not "
                "repeated for later epochs (pass strict=True to raise instead).",
            )

    @contextmanager
    def _engine_warnings(self) -> Iterator[None]:
        """The engine's warnings (e.g. no embedding for token inputs), once per run each."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            self._warn_once(f"engine:{warning.message}", str(warning.message))

    # -- reading batches and outputs ---------------------------------------------------------

    def _logits(self, outputs: Any, module: LightningModule, inputs: Inputs, size: int) -> Tensor:
        """The validation step's logits where it returned them; otherwise one more forward."""
        found = logits_of(outputs) if outputs is not None else None
        if isinstance(found, Tensor) and found.dim() == 2 and found.shape[0] == size:
            return found
        return self._forward(module, inputs)

    def _forward(self, module: LightningModule, inputs: Inputs) -> Tensor:
        with torch.no_grad():
            output = (self.forward_fn or default_forward)(module, inputs)
        logits = logits_of(output)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise MonitorSetupError(
                f"The module's forward returned {shape_of(logits)}, not (B, K) logits or an "
                "output with a `logits` attribute. Pass SensitivityMonitor(forward_fn=lambda "
                "module, x: ...) that returns the logits."
            )
        return logits

    def _probe_indices(self, split: str, dataset_size: int, size: int) -> Tensor:
        if split not in self.probes:
            generator = torch.Generator().manual_seed(self.config.seed + (split == "val"))
            self.probes[split] = torch.randperm(dataset_size, generator=generator)[:size]
        return self.probes[split]

    def _fetch(
        self, loader: DataLoader, indices: Tensor, device: torch.device
    ) -> tuple[Inputs, Tensor, Tensor]:
        samples = [loader.dataset[i] for i in indices.tolist()]
        batch = self._convert_input((loader.collate_fn or default_collate)(samples))
        inputs, labels, _ = self.batch_fn(batch)
        return to_device(inputs, device), labels.to(device), indices

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
            inputs, labels, ids = self.batch_fn(self._convert_input(batch))
            if ids is None:
                ids = torch.arange(seen, seen + len(labels))
            seen += len(labels)
            inputs = to_device(inputs, module.device)
            parts.append(split_scores(ids, labels, self._forward(module, inputs)))
        return SplitScores.cat(parts)

    def _exact(self, module: LightningModule, inputs: Inputs, labels: Tensor) -> SensitivityResult:
        """Input maps with the predicted label (Setup 4), layers with the true label (Setup 2),
        from one forward pass and one set of backward products (``input_target``). A layer the
        engine cannot measure is left out, with one warning per run."""
        with self._engine_warnings():
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
                forward_fn=self.forward_fn,
                chunk_size=self.config.chunk_size,
            )
        if result.parameters is not None:
            for layer, reason in result.parameters.skipped.items():
                self._warn_once(
                    f"layer:{layer}",
                    f"SensitivityMonitor leaves layer {layer!r} out of the per-layer FI: {reason}",
                )
        return result

    # -- the time budget -----------------------------------------------------------------------

    def _fit(self, part: str, wanted: int, minimum: int = 1, prior: float | None = None) -> Fit:
        """How much of an optional part to run now: everything outside fit or without budget."""
        if not self._budgeted:
            return Fit(wanted, wanted)
        reserve = 0.0  # the flags and tables still to come in this epoch
        if part != "figures":
            reserve = self.budget.unit_cost.get("flags", _SECONDS_PER_ROW * self._rows)
        return self.budget.fit(part, wanted, minimum, prior, reserve)

    def _notice(self, part: str, fit: Fit, what: str, epoch: int) -> None:
        """One line per run and part, the first time the budget scales the part down."""
        key = f"budget:{part}"
        if not fit.reduced or key in self._warned:
            return
        self._warned.add(key)
        rank_zero_info(
            f"SensitivityMonitor (budget={self.config.budget:g} of the training time) {what} "
            f"at epoch {epoch}: {fit.reason}. It measures its own cost as it runs and does more "
            "as training time accrues; SensitivityMonitor(budget=None) keeps the fixed schedule."
        )

    def _prior(self, forwards: float) -> float | None:
        return None if self._forward_cost is None else forwards * self._forward_cost

    # -- the work of one monitored epoch ------------------------------------------------------

    def _loaders(self, trainer: Trainer) -> dict[str, DataLoader]:
        loaders = {}
        train = trainer.train_dataloader
        train = self.train_dataloader if train is None else train
        for split, found in (("train", train), ("val", trainer.val_dataloaders)):
            loader = found[0] if isinstance(found, list | tuple) and found else found
            if isinstance(loader, DataLoader):
                loaders[split] = loader
        return loaders

    def _probes(
        self,
        module: LightningModule,
        loaders: dict[str, DataLoader],
        scores: dict[str, SplitScores],
        epoch: int,
    ) -> tuple[dict[str, SensitivityResult], dict[str, Tensor]]:
        """The training probe's closed form (where the training steps were not scored), then
        the exact engine on the first samples of both probes, as many as the budget allows."""
        c = self.config
        sizes = {"train": max(c.train_probe_size, c.exact_probe_size), "val": c.exact_probe_size}
        indices = {
            split: self._probe_indices(split, len(loader.dataset), sizes[split])  # type: ignore[arg-type]
            for split, loader in loaders.items()
            if split in sizes and sizes[split] > 0
        }
        if "train" in indices and "train" not in scores:
            wanted = min(c.train_probe_size, len(indices["train"]))
            fit = self._fit("train probe", wanted, min(64, wanted), self._prior(1.0))
            self._notice("train probe", fit, f"scored {fit.units} of {wanted} probe samples", epoch)
            if fit.units:
                with self._part("the train probe"), self.budget.timed("train probe", fit.units):
                    inputs, labels, ids = self._fetch(
                        loaders["train"], indices["train"][: fit.units], module.device
                    )
                    logits = self._logits(None, module, inputs, len(labels))
                    scores["train"] = split_scores(ids, labels, logits)

        probes: dict[str, SensitivityResult] = {}
        probe_ids: dict[str, Tensor] = {}
        wanted = min([c.exact_probe_size, *(len(i) for i in indices.values())]) if indices else 0
        per_sample = self._prior(_EXACT_FORWARDS_PER_CLASS * self._num_classes * len(indices))
        fit = self._fit("exact probes", wanted, _MIN_EXACT, per_sample)
        what = (
            f"ran the exact probes on {fit.units} of {wanted} samples per split"
            if fit.units
            else "skipped the exact probes"
        )
        self._notice("exact probes", fit, what, epoch)
        if fit.units:
            with (
                self._part("the exact engine on the probes"),
                self.budget.timed("exact probes", fit.units),
            ):
                for split, chosen in indices.items():
                    inputs, labels, ids = self._fetch(
                        loaders[split], chosen[: fit.units], module.device
                    )
                    probes[split] = self._exact(module, inputs, labels)
                    probe_ids[split] = ids
        return probes, probe_ids

    def _monitor_epoch(
        self, trainer: Trainer, module: LightningModule, val: SplitScores, log_dir: Path
    ) -> None:
        """Rank zero: probes, flags, logging and tables of one monitored epoch."""
        epoch, step = self.position or (trainer.current_epoch, trainer.global_step)
        scores = {"val": val}
        if self._train_epoch is not None:  # scored in the training steps: no probe pass needed
            scores["train"], self._train_epoch = self._train_epoch, None
        error = self._drawing.failure()  # an earlier epoch's figures failed
        if error is not None:
            with self._part("the figures"):
                raise error
        loaders = self._loaders(trainer)
        self._rows = sum(len(s.ids) for s in scores.values())
        probes, probe_ids = self._probes(module, loaders, scores, epoch)
        self._scan_pending = self._scan_pending or self._scan_due()
        if "train" in loaders and self._scan_pending:
            size = len(loaders["train"].dataset)  # type: ignore[arg-type]
            fit = self._fit("scan", 1, prior=self._prior(float(size)))
            self._notice("scan", fit, "postponed the training-set scan", epoch)
            if fit.units:
                self._scan_pending = False
                with self._part("the training-set scan"), self.budget.timed("scan"):
                    scores["train_all"] = self._scan(trainer, loaders["train"], module)
                    loaders["train_all"] = loaders["train"]

        metrics = epoch_metrics(scores)
        c = self.config
        damage: dict[str, dict[str, LayerDamage]] = {}
        for split, result in probes.items():
            if result.parameters is not None:
                with self._part("the per-layer damage"), self._engine_warnings():
                    damage[split] = predict_damage(
                        module, result.parameters, (c.damage_noise,), (c.damage_bits,), (_SCALE,)
                    )
        layers: list[LayerRow] = []
        for split, result in probes.items():
            found = damage.get(split)
            metrics.update(
                probe_metrics(
                    split, result, self._num_classes, found, c.damage_noise, c.damage_bits
                )
            )
            if found:
                layers += layer_rows(
                    split, epoch, result, found, c.damage_noise, c.damage_bits, _SCALE
                )
        began = time.perf_counter()  # flags, scalars and tables: the part the budget reserves
        table: dict[str, list[Any]] = {}
        decisions = {}
        pictured = dict(scores)  # what the figures show: the score each split's flags rank by
        for split, s in scores.items():
            decision, evidence = self._decide(split, s)
            decisions[split] = decision
            if evidence is not None:
                pictured[split] = dataclasses.replace(s, log_fi_true=evidence[0])
            self.flags.update(split, epoch, s.ids[decision.flagged].tolist())
            ranks: dict[int, int] = {}
            if split in probes and probes[split].input is not None:
                whole = probes[split].input.whole.effective_rank  # type: ignore[union-attr]
                ranks = dict(zip(probe_ids[split].tolist(), whole.tolist(), strict=True))
            recent = self.flags.counts(split)
            columns = flag_columns(split, epoch, s, decision, recent, ranks, evidence)
            for name, values in columns.items():
                table.setdefault(name, []).extend(values)
            metrics[keys.flag_count(split)] = float(decision.flagged.sum())
            persistent = sum(m * 2 > self.config.persistence for m in columns["flagged_recent"])
            metrics[keys.persistent_count(split)] = float(persistent)
            if decision.estimated is not None:
                metrics[keys.estimated_wrong(split)] = decision.estimated_share

        if self._budgeted:
            metrics[keys.cost_share()] = self.budget.cost_share
            metrics[keys.exact_probe_size()] = float(len(next(iter(probe_ids.values()), ())))
        self.history.append({"epoch": epoch, "step": step, **metrics})
        writer = self._writer = self._writer or self._new_writer(trainer, step)
        writer.scalars(metrics, step)
        for split, s in scores.items():
            writer.histogram(keys.histogram("true", split), s.log_fi_true, step)
            writer.histogram(keys.histogram("pred", split), s.log_fi_pred, step)
        writer.flush()
        write_table(table, paths.flag_table(log_dir, epoch))
        if layers:
            write_table(layers, paths.layer_table(log_dir, epoch), LAYER_COLUMNS)
        self.budget.learn("flags", time.perf_counter() - began)
        if self._budgeted and self.budget.allowance < 0 and "budget:flags" not in self._warned:
            self._warned.add("budget:flags")
            rank_zero_info(
                f"SensitivityMonitor (budget={self.config.budget:g}) spent "
                f"{100 * self.budget.cost_share:.1f} % of the training time by epoch {epoch}, "
                "more than its budget, with what it never skips (the scores, flags and tables; "
                f"{time.perf_counter() - began:.2g} s for the flags and tables of this epoch). "
                "On models this fast, pass a larger budget or every_n_epochs > 1."
            )
        if self.config.log_images and (writer.tensorboard is not None or self.config.save_figures):
            with self._part("the figures"):
                self._figures(
                    module, loaders, pictured, decisions, probes, probe_ids, writer, step, epoch,
                    log_dir, damage, {k for k in scores if pictured[k] is not scores[k]},
                )  # fmt: skip
        if self.config.log_images and writer.tensorboard is None:
            writer.skip_images()

    def _decide(
        self, split: str, scores: SplitScores
    ) -> tuple[FlagDecision, tuple[Tensor, Tensor] | None]:
        """Flags of one split: the training split by its evidence over all training steps so
        far (when they were scored), every other split by this epoch's scores."""
        c = self.config
        evidence = self.evidence if split == "train" and self._train.started else None
        if evidence is None or evidence.ids.numel() == 0:
            decision = flag(
                scores.log_fi_true,
                c.flag_rule,
                c.flag_threshold,
                c.top_k,
                label_scores=scores.label_log_fi,
                labels=scores.labels,
            )
            return decision, None
        mean = evidence.mean
        own = mean.gather(-1, evidence.labels.unsqueeze(-1)).squeeze(-1)
        decision = flag(
            own,
            c.flag_rule,
            c.flag_threshold,
            c.top_k,
            label_scores=mean,
            labels=evidence.labels,
            at_least=self.noise_floor,
        )
        where = torch.searchsorted(evidence.ids, scores.ids)
        return decision.take(where), (own[where], evidence.seen[where])

    def _figures(
        self,
        module: LightningModule,
        loaders: dict[str, DataLoader],
        scores: dict[str, SplitScores],
        decisions: dict[str, Any],
        probes: dict[str, SensitivityResult],
        probe_ids: dict[str, Tensor],
        writer: Writer,
        step: int,
        epoch: int,
        log_dir: Path,
        damage: dict[str, dict[str, LayerDamage]],
        evidence: set[str],
    ) -> None:
        """Fetch the pictured samples here, draw and log on the figure thread. ``scores`` hold
        the score each split's flags rank by: for the splits in ``evidence``, the mean log FI
        over the training steps so far."""
        count = 2 * len(scores) + 2 * len(probes)  # about this many figures
        fit = self._fit("figures", count, count, _SECONDS_PER_FIGURE)
        if fit.units and self._budgeted and self._drawing.busy:
            fit = Fit(0, count, "the figures of an earlier epoch are still being drawn")
        self._notice("figures", fit, f"skipped the {count} figures", epoch)
        if not fit.units:
            return
        wanted = pictured_samples(scores, decisions, probes, probe_ids, self.config.num_images)
        pictures = {
            (kind, split): self._fetch(loaders[split], ids, module.device)[0]
            for (kind, split), ids in wanted.items()
        }
        history = [dict(row) for row in self.history]
        config, describe = self.config, self.describe_fn
        num_classes, names = self._num_classes, self._names()

        def draw() -> int:  # on the figure thread: nothing here may touch the training state
            images = epoch_images(
                scores,
                decisions,
                probes,
                probe_ids,
                history,
                num_classes,
                config.num_images,
                pictures,
                describe,
                damage,
                config.damage_noise,
                class_names=names,
                evidence_splits=evidence,
            )
            for key, image in images.items():
                writer.image(key, image, step)
                if config.save_figures:
                    split, tag = keys.route(key)
                    name = tag.rsplit("/", 1)[-1]
                    save_png(image, paths.figure(log_dir, name, str(split), epoch))
            writer.flush()
            return len(images)

        self._drawing.submit(draw)

    def _names(self) -> tuple[str, ...] | None:
        """Class names where they fit the model's classes (else the figures show numbers)."""
        names = self.class_names
        if names is not None and len(names) != self._num_classes:
            self._warn_once(
                "class-names",
                f"SensitivityMonitor got {len(names)} class names for a model with "
                f"{self._num_classes} classes; the figures show class numbers instead.",
            )
            return None
        return names

    def _new_writer(self, trainer: Trainer, step: int) -> Writer:
        """The loggers' router; the configuration once: as hparams where a logger keeps them
        (CSV, W&B, ...), as a text table in TensorBoard (whose hparams would add a constant
        ``hp_metric`` chart)."""
        writer = Writer(trainer.loggers)
        config = self.config.to_dict()
        for logger in trainer.loggers:
            if logger is not writer.tensorboard_logger:
                logger.log_hyperparams({f"{keys.PREFIX}/{k}": v for k, v in config.items()})
        rows = "\n".join(f"| {k} | {v} |" for k, v in config.items())
        writer.text(keys.config(), f"| option | value |\n|---|---|\n{rows}", step)
        return writer
