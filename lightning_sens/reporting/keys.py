"""Every key the monitor logs, built in one place (listed in SensitivityMonitor's docstring).

A key names its split as its second component (``sensitivity/val/flagged``). Loggers other
than TensorBoard receive the keys as they are. TensorBoard receives one run per split, the
Keras convention: the split leaves the key and chooses the run (``<log_dir>/sensitivity/val``,
tag ``sensitivity/flagged``), so that Time Series draws train and validation under one tag in
two colours with a legend (:func:`route`). Keys without a split (the train − validation gap, the
monitor's own cost) go to the Trainer's run.

Tag groups, in the order TensorBoard sorts them: ``sensitivity`` (the headline: flags, loss,
accuracy, the gap), ``sensitivity_fi`` (log FI statistics), ``sensitivity_images``,
``sensitivity_layers``, ``sensitivity_monitor``, ``sensitivity_probe``.
"""

from __future__ import annotations

__all__ = [
    "FI",
    "HEADLINE",
    "IMAGES",
    "LAYERS",
    "MONITOR",
    "PREFIX",
    "PROBE",
    "QUANTILES",
    "RUNS",
    "SPLITS",
    "STATS",
    "TARGETS",
    "accuracy",
    "closed_form_holds",
    "config",
    "cost_share",
    "curve",
    "estimated_wrong",
    "exact_probe_size",
    "flag_count",
    "gap",
    "histogram",
    "image",
    "layer_kl_noise",
    "layer_kl_noise_se",
    "layer_kl_quant",
    "layer_log_fi",
    "layer_rank",
    "layer_relative_fi",
    "layers_at_closed_form",
    "loss",
    "map_relative",
    "persistent_count",
    "position_stride",
    "route",
    "undecided_classes",
    "unroute",
    "upper_curve",
]

PREFIX = "sensitivity"
HEADLINE = PREFIX
FI = f"{PREFIX}_fi"
IMAGES = f"{PREFIX}_images"
LAYERS = f"{PREFIX}_layers"
MONITOR = f"{PREFIX}_monitor"
PROBE = f"{PREFIX}_probe"
_GROUPS = (HEADLINE, FI, IMAGES, LAYERS, MONITOR, PROBE)

QUANTILES = (75, 80, 85, 90, 95, 98, 99, 100)  # the paper's Setup 3 table
STATS = ("median", "mean", *(f"q{q}" for q in QUANTILES))
TARGETS = ("pred", "true")  # predicted label (Setups 3, 4) and true label (Setups 1, 2)
SPLITS = ("train", "val")
RUNS = ("train", "val", "train_all")  # every split a key may name: one TensorBoard run each


# -- the headline --------------------------------------------------------------------------


def flag_count(split: str) -> str:
    """Samples of the split flagged this epoch."""
    return f"{HEADLINE}/{split}/flagged"


def persistent_count(split: str) -> str:
    """Samples flagged in more than half of the last ``persistence`` decisions."""
    return f"{HEADLINE}/{split}/persistent"


def estimated_wrong(split: str) -> str:
    """The share of the split's labels the "counterfactual" rule estimates to be wrong."""
    return f"{HEADLINE}/{split}/estimated_wrong"


def undecided_classes(split: str) -> str:
    """Classes the "counterfactual" rules could not decide at this decision: the model does
    not separate them from the others yet, so none of their samples is flagged (docs/flags.md,
    "When the rule declines to decide")."""
    return f"{HEADLINE}/{split}/undecided_classes"


def loss(split: str) -> str:
    """Mean cross-entropy −log p_label of the scored samples (training steps: train mode)."""
    return f"{HEADLINE}/{split}/loss"


def accuracy(split: str) -> str:
    """Share of the scored samples whose predicted class is their label."""
    return f"{HEADLINE}/{split}/accuracy"


def gap() -> str:
    """Train minus validation median log FI with the predicted label (the paper's Setup 3)."""
    return f"{HEADLINE}/train_val_gap"


# -- log FI of every sample ----------------------------------------------------------------


def curve(target: str, split: str, stat: str) -> str:
    """A statistic of log FI (whole input, closed form) over a split's samples."""
    return f"{FI}/{split}/{target}_label/log_fi_{stat}"


def upper_curve(split: str, stat: str) -> str:
    """A statistic over a split's samples of the upper quantile of their positions' log FI
    with the label (outputs with many positions: docs/tasks.md)."""
    return f"{FI}/{split}/true_label/upper_log_fi_{stat}"


def histogram(target: str, split: str) -> str:
    return f"{FI}/{split}/{target}_label/log_fi"


# -- the exact probes ----------------------------------------------------------------------


def closed_form_holds(split: str) -> str:
    """Fraction of exact-probe samples whose whole-input FI has rank K − 1 (= the closed form)."""
    return f"{PROBE}/{split}/closed_form_holds"


def map_relative(split: str, window: int) -> str:
    """Median over probe samples and pixels of the relative FI of w × w single-channel windows
    (logged for windows below rank K − 1 only: at rank K − 1 it is 1)."""
    return f"{PROBE}/{split}/map_w{window}_relative_fi_median"


def layer_kl_noise(split: str, layer: str) -> str:
    """Expected KL (nats per sample, mean over probe samples) of Gaussian noise of
    ``damage_noise`` × the layer's rms on its parameters, from tr(G_l) (docs/damage.md, "In the
    monitor and the command line")."""
    return f"{LAYERS}/{split}/kl_noise/{layer}"


def layer_kl_quant(split: str, layer: str, bits: int) -> str:
    """Expected KL (nats per sample) of rounding the layer's weights to ``bits`` bits, one step
    per output channel (Linear and convolution layers; docs/damage.md, "In the monitor and the
    command line")."""
    return f"{LAYERS}/{split}/kl_{bits}bit/{layer}"


def layer_kl_noise_se(split: str, layer: str) -> str:
    """The standard error of :func:`layer_kl_noise` where the metric comes from sampled labels
    (models with many positions: docs/tasks.md)."""
    return f"{LAYERS}/{split}/kl_noise_se/{layer}"


def layer_log_fi(split: str, layer: str) -> str:
    """Median over probe samples of the log FI of the layer's parameters (true label); logged
    for layers below rank K − 1 only (at rank K − 1 it is the whole input's closed form)."""
    return f"{LAYERS}/{split}/log_fi/{layer}"


def layer_relative_fi(split: str, layer: str) -> str:
    """Median relative FI of the layer's parameters (layers below rank K − 1 only)."""
    return f"{LAYERS}/{split}/relative_fi/{layer}"


def layer_rank(split: str, layer: str) -> str:
    """Mean effective rank of the layer's parameter family (layers below rank K − 1 only)."""
    return f"{LAYERS}/{split}/rank/{layer}"


def layers_at_closed_form(split: str) -> str:
    """Share of the measured layers whose parameter FI has rank K − 1 on every probe sample."""
    return f"{LAYERS}/{split}/at_closed_form"


# -- the monitor itself --------------------------------------------------------------------


def cost_share() -> str:
    """The monitor's seconds per second of the rest of training, since training started."""
    return f"{MONITOR}/cost_share"


def position_stride() -> str:
    """Every how many positions of a sample the monitor scores (models with many positions)."""
    return f"{MONITOR}/position_stride"


def exact_probe_size() -> str:
    """Samples per split the exact engine ran on this epoch (the time budget may lower it)."""
    return f"{MONITOR}/exact_probe_size"


def config() -> str:
    """The monitor's configuration, a Markdown table (TensorBoard's Text tab)."""
    return f"{MONITOR}/config"


def hparam(option: str) -> str:
    """One option of the configuration, as a hyperparameter of the loggers that keep them
    (CSV, W&B, ...; TensorBoard gets :func:`config` instead)."""
    return f"{PREFIX}/{option}"


def image(name: str, split: str) -> str:
    """A figure of one split: ``manhattan``, ``flagged``, ``layer_heatmap``, ``layer_strip``,
    ``fi_maps``."""
    return f"{IMAGES}/{split}/{name}"


# -- TensorBoard runs ----------------------------------------------------------------------


def route(key: str) -> tuple[str | None, str]:
    """(run, tag) of a key in TensorBoard: the split's run and the key without its split, or
    (None, key) for keys without a split (the Trainer's own run)."""
    group, _, rest = key.partition("/")
    split, _, name = rest.partition("/")
    if group in _GROUPS and split in RUNS and name:
        return split, f"{group}/{name}"
    return None, key


def unroute(run: str | None, tag: str) -> str:
    """The key that :func:`route` sends to ``run`` under ``tag``."""
    if run is None:
        return tag
    group, _, name = tag.partition("/")
    return f"{group}/{run}/{name}"
