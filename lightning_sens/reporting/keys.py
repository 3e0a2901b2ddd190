"""Every key the monitor logs, built in one place (listed in SensitivityMonitor's docstring)."""

from __future__ import annotations

__all__ = [
    "PREFIX",
    "QUANTILES",
    "SPLITS",
    "STATS",
    "TARGETS",
    "closed_form_holds",
    "cost_share",
    "curve",
    "custom_scalars_layout",
    "estimated_wrong",
    "exact_probe_size",
    "flag_count",
    "gap",
    "histogram",
    "image",
    "layer_kl_noise",
    "layer_kl_quant",
    "map_relative",
    "persistent_count",
]

PREFIX = "sensitivity"
QUANTILES = (75, 80, 85, 90, 95, 98, 99, 100)  # the paper's Setup 3 table
STATS = ("median", "mean", *(f"q{q}" for q in QUANTILES))
TARGETS = ("pred", "true")  # predicted label (Setups 3, 4) and true label (Setups 1, 2)
SPLITS = ("train", "val")


def curve(target: str, split: str, stat: str) -> str:
    """A statistic of log FI (whole input, closed form) over a split's samples."""
    return f"{PREFIX}/{target}_label/{split}/log_fi_{stat}"


def gap(target: str, stat: str) -> str:
    """Train minus validation value of a statistic of log FI."""
    return f"{PREFIX}/{target}_label/gap/log_fi_{stat}"


def histogram(target: str, split: str) -> str:
    return f"{PREFIX}/{target}_label/{split}/log_fi"


def closed_form_holds(split: str) -> str:
    """Fraction of exact-probe samples whose whole-input FI has rank K − 1 (= the closed form)."""
    return f"{PREFIX}/probe/{split}/closed_form_holds"


def map_relative(split: str, window: int) -> str:
    """Median over probe samples and pixels of the relative FI of w × w single-channel windows."""
    return f"{PREFIX}/probe/{split}/map_w{window}_relative_fi_median"


def layer_kl_noise(split: str, layer: str) -> str:
    """Expected KL (nats per sample, mean over probe samples) of Gaussian noise of
    ``damage_noise`` × the layer's rms on its parameters, from tr(G_l) (docs/damage.md)."""
    return f"{PREFIX}/layer_kl_noise/{split}/{layer}"


def layer_kl_quant(split: str, layer: str, bits: int) -> str:
    """Expected KL (nats per sample) of rounding the layer's weights to ``bits`` bits, one step
    per output channel (Linear and convolution layers; docs/damage.md)."""
    return f"{PREFIX}/layer_kl_{bits}bit/{split}/{layer}"


def flag_count(split: str) -> str:
    return f"{PREFIX}/flags/{split}/flagged"


def estimated_wrong(split: str) -> str:
    """The share of the split's labels the "counterfactual" rule estimates to be wrong."""
    return f"{PREFIX}/flags/{split}/estimated_wrong"


def persistent_count(split: str) -> str:
    """Samples flagged in more than half of the last ``persistence`` monitored epochs."""
    return f"{PREFIX}/flags/{split}/persistent"


def cost_share() -> str:
    """The monitor's seconds per second of the rest of training, since training started."""
    return f"{PREFIX}/monitor/cost_share"


def exact_probe_size() -> str:
    """Samples per split the exact engine ran on this epoch (the time budget may lower it)."""
    return f"{PREFIX}/monitor/exact_probe_size"


def image(name: str) -> str:
    return f"{PREFIX}/images/{name}"


def custom_scalars_layout() -> dict[str, dict[str, list[object]]]:
    """TensorBoard custom-scalars layout: train and validation curves overlaid on one chart."""
    charts: dict[str, list[object]] = {}
    for target in TARGETS:
        for stat in ("median", "q90", "q99", "mean"):
            title = f"{target} label: log FI {stat}, train vs val"
            charts[title] = ["Multiline", [curve(target, split, stat) for split in SPLITS]]
        charts[f"{target} label: train - val gap"] = [
            "Multiline",
            [gap(target, stat) for stat in ("median", "q90", "q99")],
        ]
    return {"sensitivity": charts}
