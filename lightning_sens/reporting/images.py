"""The monitor's pictures for one epoch, rendered to (3, H, W) uint8 tensors (no Lightning here)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_sens.core import SensitivityResult
from lightning_sens.core.inputs import Inputs, batch_size, perturbed_input, select
from lightning_sens.damage import LayerDamage
from lightning_sens.flagging import FlagDecision
from lightning_sens.reporting import figures, keys, sequences
from lightning_sens.reporting.summary import SplitScores, informative

__all__ = ["Describe", "describe_sample", "epoch_images", "pictured_samples"]

Pictures = Mapping[tuple[str, str], Inputs]  # ("flagged" or "maps", split) -> those samples
Describe = Callable[[Any], str]  # one sample's inputs (a batch of one) -> a line of text
_SHOWN_TOKENS = 40
_CLOSED_FORM = "at the closed form (FI = (1 − p)/p everywhere), not drawn"


def _images(inputs: Inputs) -> Tensor | None:
    """The inputs as (n, C, H, W) pictures, or None when they are not images."""
    if isinstance(inputs, Tensor):
        return inputs if inputs.dim() == 4 and inputs.is_floating_point() else None
    perturbed = perturbed_input(inputs, batch_size(inputs))
    found = inputs.get(perturbed.key) if perturbed.kind == "direct" else None
    return found if isinstance(found, Tensor) and found.dim() == 4 else None


def _token_ids(inputs: Inputs, drop_padding: bool = True) -> list[list[int]] | None:
    """Each sample's token ids (padding left out where an attention mask says so), or None."""
    if isinstance(inputs, Tensor):
        ids, mask = (inputs, None) if not inputs.is_floating_point() else (None, None)
    else:
        perturbed = perturbed_input(inputs, batch_size(inputs))
        ids = inputs[perturbed.key] if perturbed.kind == "tokens" else None
        mask = inputs.get("attention_mask")
    if ids is None or ids.dim() != 2:
        return None
    rows = ids.cpu().tolist()
    if drop_padding and isinstance(mask, Tensor) and mask.shape == ids.shape:
        keep = mask.cpu().bool().tolist()
        rows = [
            [t for t, k in zip(row, m, strict=True) if k] for row, m in zip(rows, keep, strict=True)
        ]
    return rows


def describe_sample(inputs: Inputs) -> str:
    """A line of text for one sample that is not an image: its token ids, or its values."""
    ids = _token_ids(inputs)
    if ids is not None:
        shown = " ".join(str(t) for t in ids[0][:_SHOWN_TOKENS])
        more = f" … ({len(ids[0])} tokens)" if len(ids[0]) > _SHOWN_TOKENS else ""
        return f"token ids: {shown}{more}"
    x = (
        inputs
        if isinstance(inputs, Tensor)
        else next(v for v in inputs.values() if isinstance(v, Tensor))
    )
    values = ", ".join(f"{v:.3g}" for v in x.flatten()[:12].tolist())
    return f"shape {tuple(x.shape[1:])}: {values}{', …' if x[0].numel() > 12 else ''}"


def _samples_figure(
    inputs: Inputs, captions: list[str], title: str, describe: Describe | None
) -> Figure:
    """The flagged samples: pictures of images, text lines of anything else."""
    images = _images(inputs) if describe is None else None
    if images is not None:
        return figures.sample_grid(images.cpu(), captions, title)
    n = len(captions)
    describe = describe or describe_sample
    lines = [describe(select(inputs, slice(i, i + 1), n)) for i in range(n)]
    return sequences.sample_text(lines, captions, title)


def _caption(
    sample: int,
    label: int,
    pred: int,
    log_fi: float,
    names: Sequence[str] | None = None,
    score: str = "log FI",
) -> str:
    """``#id y=… ŷ=…`` and log FI; class names (shortened) on lines that fit under an image."""
    if names is None:
        return f"#{sample} y={label} ŷ={pred}\n{score} {log_fi:.2f}"
    pair = f"y={figures._shorten(names[label], 22)} ŷ={figures._shorten(names[pred], 22)}"
    return f"#{sample} {score} {log_fi:.2f}\n" + (
        pair if len(pair) <= 26 else pair.replace(" ŷ", "\nŷ")
    )


def _layer_heatmap(
    history: Sequence[Mapping[str, float]], split: str, noise: float
) -> Tensor | None:
    prefix = keys.layer_kl_noise(split, "")
    names = sorted({k[len(prefix) :] for h in history for k in h if k.startswith(prefix)})
    if not names or not history:
        return None
    values = torch.tensor(
        [[h.get(keys.layer_kl_noise(split, n), float("nan")) for h in history] for n in names]
    ).log10()
    epochs = [int(h["epoch"]) for h in history]
    title = f"{split}: expected KL under weight noise {noise:g} × rms, per layer and epoch"
    label = "log10 expected KL (nats)"
    figure = figures.layer_heatmap(values, names, epochs, title, value_label=label)
    return figures.figure_to_image(figure)


def _flagged_rows(scores: SplitScores, decision: FlagDecision, count: int) -> Tensor:
    """Rows of the flagged samples a figure shows: the highest log FI first."""
    top = decision.flagged.nonzero().flatten()
    return top[scores.log_fi_true[top].argsort(descending=True)][:count]


def _least_confident(result: SensitivityResult, count: int) -> Tensor:
    """Probe rows of the FI-map overlays: the largest whole-input FI first."""
    assert result.input is not None
    return result.input.whole.fi.argsort(descending=True)[:count]


def pictured_samples(
    scores: Mapping[str, SplitScores],
    decisions: Mapping[str, FlagDecision],
    probes: Mapping[str, SensitivityResult],
    probe_ids: Mapping[str, Tensor],
    num_images: int,
) -> dict[tuple[str, str], Tensor]:
    """The sample ids :func:`epoch_images` pictures: ``("flagged", split)`` and ``("maps",
    split)``. The caller fetches their inputs (on the training thread) and passes them on."""
    out = {}
    for split, s in scores.items():
        top = _flagged_rows(s, decisions[split], num_images)
        if len(top):
            out[("flagged", split)] = s.ids[top]
    for split, result in probes.items():
        if result.input is not None and result.input.maps and num_images > 0:
            out[("maps", split)] = probe_ids[split][_least_confident(result, num_images).cpu()]
    return out


def epoch_images(
    scores: Mapping[str, SplitScores],
    decisions: Mapping[str, FlagDecision],
    probes: Mapping[str, SensitivityResult],
    probe_ids: Mapping[str, Tensor],
    history: Sequence[Mapping[str, float]],
    num_classes: int,
    num_images: int,
    pictures: Pictures,
    describe: Describe | None = None,
    damage: Mapping[str, Mapping[str, LayerDamage]] | None = None,
    noise: float = 0.1,
    *,
    class_names: Sequence[str] | None = None,
    evidence_splits: Collection[str] = (),
) -> dict[str, Tensor]:
    """Manhattan plots, per-layer views, flagged samples and FI-map overlays, keyed by tag.

    Args:
        scores: closed-form scores per split; ``decisions``: the flags of each split.
        probes: exact-engine results of the probes (predicted label for the input maps, true
            label for the per-layer families) and ``probe_ids`` their sample ids. Overlays show
            the probe samples with the largest whole-input FI (the least confident ones).
        history: the monitor's per-epoch metrics, this epoch included.
        pictures: the inputs of the samples :func:`pictured_samples` names.
        describe: one sample's inputs → a line of text, for samples that are not images (default:
            their token ids or values).
        damage: split → layer → predicted damage of the probe (the per-layer views);
            ``noise``: its noise level ρ.
        class_names: num_classes names (e.g. ``dataset.classes``) for the Manhattan plots' ticks
            and the flagged samples' captions; None: the class numbers.
        evidence_splits: splits whose ``log_fi_true`` holds the mean log FI over the training
            steps so far (what their flags rank), not this epoch's: titles and captions say so.

    FI-map windows at the closed form (rank K − 1 in most blocks of the probe samples,
    :func:`~lightning_sens.reporting.summary.informative`: FI is (1 − p_y)/p_y there, no
    spatial information) are not drawn; the title names them.
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names must hold {num_classes} names, got {len(class_names)}")
    names = None if class_names is None else [str(name) for name in class_names]
    out: dict[str, Tensor] = {}
    for split, s in scores.items():
        flagged, rule = decisions[split].flagged, decisions[split].rule
        count = int(flagged.sum())
        shown = f"{count} flagged by {rule}, in red" if count else f"none flagged by {rule}"
        what = (
            "mean log FI with the true label over the training steps, what the flags rank"
            if split in evidence_splits
            else "log FI with the true label"
        )
        title = f"{split}: {what} ({shown})"
        fig = figures.manhattan_plot(s.log_fi_true, s.labels, num_classes, flagged, title, names,
                                     flag_label=f"flagged ({rule})")  # fmt: skip
        out[keys.image("manhattan", split)] = figures.figure_to_image(fig)

        top = _flagged_rows(s, decisions[split], num_images)
        captions = [
            _caption(
                int(s.ids[i]),
                int(s.labels[i]),
                int(s.preds[i]),
                float(s.log_fi_true[i]),
                names,
                "mean log FI" if split in evidence_splits else "log FI",
            )
            for i in top.tolist()
        ]
        title = f"{split}: flagged samples, highest FI first"
        if len(top):
            grid = _samples_figure(pictures[("flagged", split)], captions, title, describe)
        else:
            grid = sequences.sample_text([], [], title)
        out[keys.image("flagged", split)] = figures.figure_to_image(grid)

        heatmap = _layer_heatmap(history, split, noise)
        if heatmap is not None:
            out[keys.image("layer_heatmap", split)] = heatmap

    for split, result in probes.items():
        found = (damage or {}).get(split, {})
        if result.parameters is not None and found:
            names = [n for n in result.parameters.layers if n in found]
            # per sample: tr(G_l) times the layer's factor ½ ρ² rms², i.e. expected KL
            values = torch.stack(
                [
                    result.parameters.layers[n].metric.cpu()
                    * (found[n].noise[noise] / found[n].metric if found[n].metric > 0 else 0.0)
                    for n in names
                ]
            ).log10()
            title = f"{split} probe: expected KL under weight noise {noise:g} × rms, per sample"
            strip = figures.layer_strip_plot(
                values, names, title, value_label="log10 expected KL (nats)"
            )
            out[keys.image("layer_strip", split)] = figures.figure_to_image(strip)
        if result.input is not None and result.input.maps and num_images > 0:
            order = _least_confident(result, num_images)
            ids = probe_ids[split][order.cpu()]
            title = f"{split} probe: FI maps of the least confident samples, predicted label"
            inputs = pictures[("maps", split)]
            closed = sorted(
                w for w, b in result.input.maps.items() if not informative(b, num_classes)
            )
            drawn = {w: b for w, b in result.input.maps.items() if w not in closed}
            note = f"\nw = {', '.join(str(w) for w in closed)}: {_CLOSED_FORM}" if closed else ""
            first = next(iter(result.input.maps.values())).fi
            if first.dim() == 3:  # token sequences (B, T, d): the maximum over coordinates
                maps = {w: b.fi[order].amax(dim=-1).cpu() for w, b in drawn.items()}
                T = first.shape[1]
                rows = _token_ids(inputs, drop_padding=False) or [[]] * len(ids)
                tokens = [[str(t) for t in row[:T]] + [""] * (T - len(row[:T])) for row in rows]
                if maps:
                    captions = [f"#{int(i)}, max over embedding coordinates" for i in ids]
                    fig = sequences.token_strips(maps, tokens, captions, title + note)
                else:  # no informative window: the tokens, and why there is no strip
                    lines = ["tokens: " + " ".join(t for t in row if t) for row in tokens]
                    fig = sequences.sample_text(lines, [f"#{int(i)}" for i in ids], title + note)
            else:
                images = _images(inputs)
                if images is None:
                    continue
                maps = {w: b.fi[order].amax(dim=1).cpu() for w, b in drawn.items()}
                several = images.shape[1] > 1  # FI maps: the largest over a pixel's channels
                captions = [f"#{int(i)}" + (", max over channels" if several else "") for i in ids]
                lead = None
                if result.input.metric_map is not None:  # KL of editing a pixel's channels
                    metric = result.input.metric_map[order].sum(dim=1).cpu()
                    lead = ("edit damage J'HJ", "KL per unit² edit (log scale)", metric)
                    title = (
                        f"{split} probe: where an edit changes the prediction most (× its top "
                        "pixel), and FI maps; least confident samples, predicted label"
                    )
                fig = figures.fi_overlays(images.cpu(), maps, captions, title + note, lead)
            out[keys.image("fi_maps", split)] = figures.figure_to_image(fig)
    return out
