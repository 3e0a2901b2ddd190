"""Matplotlib pictures of the influence measure FI (docs/paper.md: the four analyses), for
TensorBoard or files: per-sample FI by class (the Manhattan plot), per-layer values across epochs
(a heat map) and per sample (a strip plot). Pictures of the samples themselves (grids of images,
FI maps over them) are in :mod:`lightning_sens.reporting.pictures`, of samples that are not
images in :mod:`lightning_sens.reporting.sequences`; what they all share (the Agg canvas, checks,
:func:`figure_to_image`) in :mod:`lightning_sens.reporting.canvas`. This module names them all.

Example:
    >>> import torch
    >>> fig = manhattan_plot(torch.randn(20), torch.arange(20) % 4, num_classes=4)
    >>> image = figure_to_image(fig)
    >>> image.dtype, image.shape[0]
    (torch.uint8, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from lightning_sens.reporting.canvas import (
    _MAX_FIG_INCHES,
    _check_length,
    _check_shape,
    _decorate,
    _figure,
    _jitter,
    _label_ticks,
    _numpy,
    _shorten,
    figure_to_image,
)
from lightning_sens.reporting.layout import frame, title_pad
from lightning_sens.reporting.pictures import fi_overlays, sample_grid

__all__ = [
    "fi_overlays",
    "figure_to_image",
    "layer_heatmap",
    "layer_strip_plot",
    "manhattan_plot",
    "sample_grid",
]


def manhattan_plot(
    log_fi: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    flagged: torch.Tensor | None = None,
    title: str = "",
    class_names: Sequence[str] | None = None,
    flag_label: str = "flagged",
) -> Figure:
    """The paper's Manhattan plot of per-sample FI (Setup 1 of docs/paper.md).

    x axis: class 0..num_classes-1 (tick labels ``class_names``, shortened to 20 characters and
    upright when long, or the integers; only every k-th with many classes), each sample jittered
    within its class's column; y axis: log FI (natural log). Classes alternate between two
    shades; flagged samples are drawn on top in red with the legend entry ``flag_label``. When
    ``flagged`` is given but no flagged sample is drawn, the legend has no entry and its title
    says so (``none flagged``). Non-finite log FI (e.g. -inf for FI = 0) is not drawn; the count
    is noted in the corner.

    Args:
        log_fi: (N,) natural log of FI per sample.
        labels: (N,) integer class of each sample, in [0, num_classes).
        num_classes: number of classes (columns).
        flagged: optional (N,) bool, True for samples to highlight.
        title: axes title.
        class_names: optional num_classes tick labels.
        flag_label: the legend entry of the flagged samples, e.g. ``"flagged (mad>3.5)"``.

    Returns:
        The figure (one axes).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    _check_shape("log_fi", log_fi, ["N"])
    n = log_fi.shape[0]
    _check_shape("labels", labels, [n])
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {labels.dtype}")
    label_values = labels.detach().cpu().long().numpy()
    if n and (label_values.min() < 0 or label_values.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{label_values.min()}, {label_values.max()}]"
        )
    flag_values = np.zeros(n, dtype=bool)
    if flagged is not None:
        _check_shape("flagged", flagged, [n])
        if flagged.dtype != torch.bool:
            raise ValueError(f"flagged must be a bool tensor of shape ({n},), got {flagged.dtype}")
        flag_values = flagged.detach().cpu().numpy()
    if class_names is not None:
        _check_length("class_names", class_names, num_classes, "one name per class")
    y = _numpy(log_fi)
    x = label_values + _jitter(n, 0.7)
    finite = np.isfinite(y)
    shade = np.where(label_values % 2 == 0, "#1f4e79", "#7fa7c9")

    fig = _figure(max(6.0, 0.45 * num_classes + 2.5), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    plain, hit = finite & ~flag_values, finite & flag_values
    ax.scatter(x[plain], y[plain], s=8, c=shade[plain], alpha=0.7, linewidths=0)
    legend = None
    if flagged is not None and hit.any():
        ax.scatter(x[hit], y[hit], s=30, c="#d62728", edgecolors="k", zorder=3, label=flag_label)
        legend = ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: hides no point
    elif flagged is not None:  # no red mark drawn: no entry, the legend's title says why
        unseen = int(flag_values.sum())
        note = f"{flag_label}: {unseen} with non-finite log FI" if unseen else f"none {flag_label}"
        legend = ax.legend(handles=[], title=note, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    names = [_shorten(str(name), 20) for name in names]
    upright = max(len(name) for name in names) > 3  # upright: long names cannot overlap
    _label_ticks(ax, "x", names, 40, rotation=90 if upright else 0, fontsize=8 if upright else 10)
    ax.set_xlim(-0.6, num_classes - 0.4)
    _decorate(ax, title or "FI per sample, by class", "class", "log FI (natural log)", finite)
    frame(fig, ax, legend=legend)
    return fig


def layer_heatmap(
    values: torch.Tensor,
    layer_names: Sequence[str],
    epochs: Sequence[int],
    title: str = "",
    value_label: str = "median log FI",
    xlabel: str = "epoch",
    ylabel: str = "layer",
) -> Figure:
    """Heat map of a per-layer statistic across epochs (or any rows × columns: ``xlabel``,
    ``ylabel`` name them).

    Rows (y axis): layers, top to bottom in the given order, labelled with their names (shortened to
    30 characters; only every k-th label when there are many layers). Columns (x axis): epochs.
    Colour: the value, explained by a colorbar labelled ``value_label``; NaN (and ±inf) cells are
    blank. Small maps (at most 40 cells, 20 rows) also print each value in its cell. The figure
    grows with the number of layers up to 12 inches.

    Args:
        values: (L, E) one value per layer and epoch.
        layer_names: L row labels.
        epochs: E column labels.
        title: axes title.
        value_label: colorbar label.
        xlabel, ylabel: the axis labels: what the columns and the rows are.

    Returns:
        The figure (the heat-map axes and the colorbar axes).
    """
    _check_shape("values", values, ["L", "E"])
    n_layers, n_epochs = values.shape
    if n_layers == 0 or n_epochs == 0:
        raise ValueError(f"values must have shape (L, E) with L, E >= 1, got {tuple(values.shape)}")
    _check_length("layer_names", layer_names, n_layers, "one per row of values")
    _check_length("epochs", epochs, n_epochs, "one per column of values")
    data = _numpy(values)
    masked = np.ma.masked_invalid(data)
    height = min(max(3.0, 0.22 * n_layers + 1.6), 12.0)
    width = min(max(5.0, 0.35 * n_epochs + 4.5), _MAX_FIG_INCHES)
    fig = _figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    empty = masked.count() == 0  # all blank: a fixed scale keeps the colorbar well defined
    cmap = colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    image = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest",
                      vmin=0.0 if empty else None, vmax=1.0 if empty else None)  # fmt: skip
    bar = fig.colorbar(image, cax=fig.add_axes((0.9, 0.1, 0.03, 0.8)), label=value_label)
    names = [_shorten(str(name)) for name in layer_names]
    _label_ticks(ax, "y", names, int((height - 1.4) / 0.16), fontsize=7)
    _label_ticks(ax, "x", [str(epoch) for epoch in epochs], int(width * 3))
    if n_layers * n_epochs <= 40 and n_layers <= 20:  # few cells: print the values too
        for (row, col), value in np.ndenumerate(data):
            if np.isfinite(value):
                red, green, blue, _ = image.to_rgba(value)  # white on dark cells, else black
                dark = 0.3 * red + 0.6 * green + 0.1 * blue < 0.5
                ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    # title_pad: the title may reach over the colour bar, whose top label sticks up
    ax.set_title(title or f"{value_label} per {ylabel} and {xlabel}", wrap=True, pad=title_pad())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    frame(fig, ax, colorbar=bar.ax)
    return fig


def layer_strip_plot(
    values: torch.Tensor,
    layer_names: Sequence[str],
    title: str = "",
    value_label: str = "log FI",
) -> Figure:
    """The paper's per-layer view (Setup 2 of docs/paper.md): one value per layer per sample.

    x axis: layer index (tick labels = layer names shortened to 30 characters, rotated, only every
    k-th when there are many), each sample jittered horizontally; y axis: ``value_label``. A black
    line joins the per-layer medians. Non-finite values (e.g. -inf for FI = 0) are not drawn and do
    not enter the medians.

    Args:
        values: (L, N) value of layer l for sample n.
        layer_names: L names.
        title: axes title.
        value_label: y-axis label.

    Returns:
        The figure (one axes).
    """
    _check_shape("values", values, ["L", "N"])
    n_layers, n_samples = values.shape
    if n_layers == 0:
        raise ValueError(f"values must have shape (L, N) with L >= 1, got {tuple(values.shape)}")
    _check_length("layer_names", layer_names, n_layers, "one per row of values")
    data = _numpy(values)
    finite = np.isfinite(data)
    layer_index = np.arange(n_layers, dtype=np.float64)
    x = layer_index[:, None] + _jitter(n_layers * n_samples, 0.6).reshape(n_layers, n_samples)
    rows = zip(data, finite, strict=True)
    medians = np.array([np.median(row[ok]) if ok.any() else np.nan for row, ok in rows])

    width = max(6.0, 0.3 * n_layers + 2.5)
    fig = _figure(width, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x[finite], data[finite], s=6, alpha=0.4, linewidths=0, label="samples")
    ax.plot(layer_index, medians, color="black", marker="o", markersize=3, label="median")
    names = [_shorten(str(name)) for name in layer_names]
    _label_ticks(ax, "x", names, int(min(width, _MAX_FIG_INCHES) * 2.5), rotation=60, ha="right",
                 fontsize=7)  # fmt: skip
    ax.set_xlim(-0.6, n_layers - 0.4)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _decorate(ax, title or f"{value_label} per layer", "layer", value_label, finite)
    frame(fig, ax, legend=legend)
    return fig
