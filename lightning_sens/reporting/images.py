"""The monitor's pictures for one epoch, rendered to (3, H, W) uint8 tensors (no Lightning here)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_sens.core import SensitivityResult
from lightning_sens.flagging import FlagDecision
from lightning_sens.reporting import figures, keys
from lightning_sens.reporting.summary import SplitScores

__all__ = ["epoch_images"]

FetchImages = Callable[[str, Tensor], Tensor]  # (split, sample ids) -> (n, C, H, W) inputs


def _caption(sample: int, label: int, pred: int, log_fi: float) -> str:
    return f"#{sample} y={label} ŷ={pred}\nlog FI {log_fi:.2f}"


def _layer_heatmap(history: Sequence[Mapping[str, float]], split: str) -> Tensor | None:
    prefix = keys.layer_scale(split, "")
    names = sorted({k[len(prefix) :] for h in history for k in h if k.startswith(prefix)})
    if not names or not history:
        return None
    values = torch.tensor(
        [[h.get(keys.layer_scale(split, n), float("nan")) for h in history] for n in names]
    )
    epochs = [int(h["epoch"]) for h in history]
    title = f"{split}: median log FI of scaling each layer, by epoch"
    return figures.figure_to_image(figures.layer_heatmap(values, names, epochs, title))


def epoch_images(
    scores: Mapping[str, SplitScores],
    decisions: Mapping[str, FlagDecision],
    probes: Mapping[str, SensitivityResult],
    probe_ids: Mapping[str, Tensor],
    history: Sequence[Mapping[str, float]],
    num_classes: int,
    num_images: int,
    fetch: FetchImages,
) -> dict[str, Tensor]:
    """Manhattan plots, per-layer views, flagged samples and FI-map overlays, keyed by tag.

    Args:
        scores: closed-form scores per split; ``decisions``: the flags of each split.
        probes: exact-engine results of the probes (predicted label for the input maps, true
            label for the per-layer families) and ``probe_ids`` their sample ids. Overlays show
            the probe samples with the largest whole-input FI (the least confident ones).
        history: the monitor's per-epoch metrics, this epoch included.
        fetch: gives the input tensors of samples by split and id, for pictures of them.
    """
    out: dict[str, Tensor] = {}
    for split, s in scores.items():
        flagged = decisions[split].flagged
        title = f"{split}: log FI with the true label ({decisions[split].rule} in red)"
        fig = figures.manhattan_plot(s.log_fi_true, s.labels, num_classes, flagged, title)
        out[keys.image(f"manhattan_{split}")] = figures.figure_to_image(fig)

        top = flagged.nonzero().flatten()
        top = top[s.log_fi_true[top].argsort(descending=True)][:num_images]
        captions = [
            _caption(int(s.ids[i]), int(s.labels[i]), int(s.preds[i]), float(s.log_fi_true[i]))
            for i in top.tolist()
        ]
        images = fetch(split, s.ids[top]) if len(top) else torch.zeros(0, 1, 1, 1)
        title = f"{split}: flagged samples, highest FI first"
        grid = figures.sample_grid(images.cpu(), captions, title)
        out[keys.image(f"flagged_{split}")] = figures.figure_to_image(grid)

        heatmap = _layer_heatmap(history, split)
        if heatmap is not None:
            out[keys.image(f"layer_heatmap_{split}")] = heatmap

    for split, result in probes.items():
        if result.parameters is not None and result.parameters.layers:
            names = list(result.parameters.layers)
            values = torch.stack([result.parameters.layers[n].scale.log_fi for n in names])
            title = f"{split} probe: log FI of scaling each layer (true label), per sample"
            strip = figures.layer_strip_plot(values.cpu(), names, title)
            out[keys.image(f"layer_strip_{split}")] = figures.figure_to_image(strip)
        if result.input is not None and result.input.maps:
            order = result.input.whole.fi.argsort(descending=True)[:num_images]
            ids = probe_ids[split][order.cpu()]
            maps = {w: block.fi[order].amax(dim=1).cpu() for w, block in result.input.maps.items()}
            captions = [f"#{int(i)}, max over channels" for i in ids]
            title = f"{split} probe: FI maps of the least confident samples, predicted label"
            overlay = figures.fi_overlays(fetch(split, ids).cpu(), maps, captions, title)
            out[keys.image(f"fi_maps_{split}")] = figures.figure_to_image(overlay)
    return out
