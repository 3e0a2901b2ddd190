"""The monitor's configuration: a frozen, serialisable dataclass validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, get_args

from lightning_sens.core.layout import TASKS, TaskOption
from lightning_sens.flagging import FlagRule

__all__ = ["MonitorConfig"]


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}.")


@dataclass(frozen=True)
class MonitorConfig:
    """What :class:`~lightning_sens.SensitivityMonitor` measures, and how often.

    Attributes:
        every_n_epochs: monitor every n-th validation loop (the first one included); without a
            validation loop, decide at the end of every n-th training epoch.
        train_probe_size: training samples, chosen once with ``seed``, whose closed-form FI gives
            the training curves (one eval forward pass each).
        exact_probe_size: how many of the train probe, and of a validation probe of the same
            size, also go through the exact engine (input maps, per-layer FI, ranks).
        windows: window sizes of the input FI maps on the exact probes (odd, ≤ image size).
        layers: module names for per-layer FI; None for every module with trainable parameters.
        exclude_layers: module names or glob patterns (``"encoder.*.attn"``) left out of the
            per-layer FI.
        damage_noise: ρ of the per-layer curves "expected KL under Gaussian weight noise of
            ρ × the layer's rms" (docs/damage.md, "In the monitor and the command line").
        damage_bits: b of the per-layer curves "expected KL of rounding the layer's weights to
            b bits, one step per output channel" (Linear and convolution layers).
        flag_rule: "counterfactual" (estimates how many labels of each class are wrong and
            flags that many; docs/flags.md, "The rule: what a wrong label looks like to this
            model"), "counterfactual_pairs" (also class pair by class pair, on the margin between
            the two labels: finds wrong labels between similar classes, and flags some samples
            the model finds ambiguous; docs/flags.md, "Wrong labels between similar classes"),
            "mad" (robust z-score of log FI above ``flag_threshold``: a few
            outliers) or "top_k".
        flag_threshold: the robust z-score cut-off of the "mad" rule, and of a language model's
            documents (their loss against the others': docs/tasks.md, "Language models:
            documents unlike the rest").
        top_k: how many samples the "top_k" rule flags per split and epoch.
        persistence: n in "flagged in m of the last n decisions".
        score_training_steps: score every training sample from the logits its training step
            computes (no extra pass; train-mode logits) and flag training labels by the mean over
            the steps so far (from the second epoch on). Needs sample ids: batches
            ``(x, y, ids)``, or a loader with a batch sampler, whose order the monitor records.
        scan_train_set: every ``scan_every_n_epochs`` decisions, also compute the
            closed-form FI of every training sample (one eval forward pass per sample) so that
            outliers anywhere in the training set can be flagged.
        scan_every_n_epochs: see ``scan_train_set``.
        chunk_size: samples per pass of the exact engine (None: the engine's default).
        num_images: how many flagged samples / FI-map overlays to draw per image.
        class_names: one name per class for the figures and tables; None: the validation
            dataset's ``classes`` attribute (the torchvision convention) where it has one,
            else the class numbers.
        log_images: draw figures (to TensorBoard; with ``save_figures`` also without it).
        save_figures: also save every figure as PNG under ``<log_dir>/sensitivity/figures``.
        budget: the monitor's share of training time: 0.05 keeps a monitored run within
            1.05 × the same run without it. The monitor measures its own cost as it runs and
            runs the exact probes (on fewer samples if need be), the training probe, the scan
            and the figures only as often as they fit; the closed-form scores, flags and tables
            are always written. It logs ``sensitivity_monitor/cost_share`` and says in one line
            per part when it scaled one down. Applies during ``fit`` only (validate and
            post-hoc evaluation run everything). None: the fixed schedule above, every part
            every decision (docs/performance.md, "The monitor during training
            (`benchmarks/bench_callback.py`)").
        task: how the logits meet the labels: "auto" reads it from the first batch (one
            class per sample, a class per token or pixel, one sigmoid per output), or
            torchmetrics' "binary", "multiclass", "multilabel" where one batch cannot tell
            (docs/tasks.md, "How the monitor reads a task").
        ignore_index: the label of positions to skip in token and pixel labels; None: −100,
            and 255 where the model has at most 255 classes.
        position_quantile: the upper quantile of a sample's positions' log FI that is logged
            beside their mean (a few wrong pixels of a large mask move it, not the mean).
        position_flag_share: a sample with many positions (an image's pixels, a sentence's
            tokens) is flagged when an estimated share of at least this many of its positions
            carry wrong labels, over the training epochs the rule decides (docs/tasks.md,
            "Flags: which samples' labels look wrong").
        position_stride: score every n-th position of each sample (tokens, pixels), a
            different one each epoch (from the sample's id plus the epoch), so that n epochs
            score each position once; 1 scores every position. None: every position, unless
            scoring them all takes more than half the ``budget`` over the first training steps:
            then the smallest power of two that keeps them within it (at most 64, and leaving
            4 / ``position_flag_share`` positions of a sample where labels are judged), said in
            one line (docs/tasks.md, "What scoring costs, and every n-th position"). A language
            model's documents and multi-label outputs are always scored whole.
        strict: raise errors from monitoring instead of warning and skipping the epoch.
        seed: seed of the probe selection.
    """

    every_n_epochs: int = 1
    train_probe_size: int = 512
    exact_probe_size: int = 32
    windows: tuple[int, ...] = (1, 3, 5, 7)
    layers: tuple[str, ...] | None = None
    exclude_layers: tuple[str, ...] = ()
    damage_noise: float = 0.1
    damage_bits: int = 4
    flag_rule: FlagRule = "counterfactual"
    flag_threshold: float = 3.5
    top_k: int = 10
    persistence: int = 5
    score_training_steps: bool = True
    scan_train_set: bool = False
    scan_every_n_epochs: int = 1
    chunk_size: int | None = None
    num_images: int = 8
    class_names: tuple[str, ...] | None = None
    log_images: bool = True
    save_figures: bool = False
    budget: float | None = 0.05
    task: TaskOption = "auto"
    ignore_index: int | None = None
    position_quantile: float = 0.9
    position_flag_share: float = 0.02
    position_stride: int | None = None
    strict: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("every_n_epochs", "train_probe_size", "persistence", "scan_every_n_epochs"):
            _positive_int(name, getattr(self, name))
        for name in ("exact_probe_size", "top_k", "num_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        _positive_int("chunk_size", self.chunk_size, allow_none=True)
        _positive_int("position_stride", self.position_stride, allow_none=True)
        if (
            isinstance(self.damage_bits, bool)
            or not isinstance(self.damage_bits, int)
            or (self.damage_bits < 2)
        ):
            raise ValueError(
                f"damage_bits must be an integer >= 2 (symmetric levels), got {self.damage_bits!r}."
            )
        if isinstance(self.damage_noise, bool) or not (
            isinstance(self.damage_noise, int | float) and self.damage_noise > 0
        ):
            raise ValueError(
                "damage_noise must be a positive number (noise relative to each layer's rms), "
                f"got {self.damage_noise!r}."
            )
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, int | float)
            or not 0 < self.budget < float("inf")
        ):
            raise ValueError(
                "budget must be a positive number (the monitor's time as a share of the rest of "
                f"training, e.g. 0.05) or None for the fixed schedule, got {self.budget!r}."
            )
        if self.flag_rule not in get_args(FlagRule):
            raise ValueError(
                f"flag_rule must be one of {get_args(FlagRule)}, got {self.flag_rule!r}."
            )
        if not self.flag_threshold > 0:
            raise ValueError(
                f"flag_threshold must be > 0 (a robust z-score), got {self.flag_threshold!r}."
            )
        windows = tuple(self.windows)
        if any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0 for w in windows
        ):
            raise ValueError(
                f"windows must be odd positive integers such as (1, 3, 5, 7), got {self.windows!r}."
            )
        object.__setattr__(self, "windows", windows)
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ValueError(
                    f"layers must be a sequence of module names, got the string {self.layers!r}."
                )
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.exclude_layers, str):
            raise ValueError(
                "exclude_layers must be a sequence of module names or glob patterns, got the "
                f"string {self.exclude_layers!r}; write [{self.exclude_layers!r}]."
            )
        object.__setattr__(self, "exclude_layers", tuple(self.exclude_layers))
        if self.task not in TASKS:
            raise ValueError(
                f"task must be one of {', '.join(map(repr, TASKS))}, got {self.task!r}."
            )
        if self.ignore_index is not None and (
            isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int)
        ):
            raise ValueError(
                f"ignore_index must be an integer label (e.g. -100 or 255) or None, got "
                f"{self.ignore_index!r}."
            )
        q = self.position_quantile
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1:
            raise ValueError(f"position_quantile must be a number in [0, 1], got {q!r}.")
        share = self.position_flag_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValueError(
                "position_flag_share must be a number in (0, 1], the share of a sample's "
                f"positions whose labels must look wrong to flag it (e.g. 0.02), got {share!r}."
            )
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"class_names must be a sequence of strings, one per class, got {names!r}."
                )
            object.__setattr__(self, "class_names", tuple(names))

    @classmethod
    def with_options(cls, base: MonitorConfig | None, options: dict[str, Any]) -> MonitorConfig:
        """``base`` (default: the defaults) with ``options`` replacing its fields; a TypeError
        names the options that are not fields."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"SensitivityMonitor got unknown options {sorted(unknown)}; see MonitorConfig "
                "for the allowed ones."
            )
        return dataclasses.replace(base or cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for hparams, checkpoints and result files."""
        out = dataclasses.asdict(self)
        out["windows"] = list(self.windows)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["exclude_layers"] = list(self.exclude_layers)
        out["class_names"] = None if self.class_names is None else list(self.class_names)
        return out
