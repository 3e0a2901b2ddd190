"""Matplotlib pictures of the influence measure FI (docs/paper.md: the four analyses), for
TensorBoard or files.

Object API and the Agg canvas only (no ``pyplot``: no global state, no GUI backend). Inputs are
torch tensors of any dtype and device, copied to CPU float64. Jitter comes from a fixed
``torch.Generator`` seed, so the same inputs always give the same picture.

Example:
    >>> import torch
    >>> fig = manhattan_plot(torch.randn(20), torch.arange(20) % 4, num_classes=4)
    >>> image = figure_to_image(fig)
    >>> image.dtype, image.shape[0]
    (torch.uint8, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, NullFormatter
from numpy.typing import NDArray

__all__ = [
    "fi_overlays",
    "figure_to_image",
    "layer_heatmap",
    "layer_strip_plot",
    "manhattan_plot",
    "sample_grid",
]

_JITTER_SEED = 0
_NAME_CHARS = 30
_MAX_FIG_INCHES = 16.0
_OVERLAY_DECADES = 4
# clip_on=False: a top pixel on the border keeps its whole cross
_CROSS: dict[str, Any] = {
    "marker": "x", "color": "cyan", "markersize": 8, "mew": 2, "clip_on": False
}  # fmt: skip


def _numpy(tensor: torch.Tensor) -> NDArray[np.float64]:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def _check_shape(name: str, tensor: object, expected: Sequence[int | str]) -> torch.Tensor:
    """Checks ``tensor`` against ``expected`` (ints must match, strings are free dimensions)."""
    wanted = "(" + ", ".join(str(d) for d in expected) + ("," if len(expected) == 1 else "") + ")"
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {wanted}, got {type(tensor)}")
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(
        isinstance(e, int) and s != e for s, e in zip(shape, expected, strict=False)
    ):
        raise ValueError(f"{name} must have shape {wanted}, got {shape}")
    return tensor


def _check_length(name: str, items: Sequence[object], expected: int, of: str) -> None:
    if len(items) != expected:
        raise ValueError(f"{name} must have length {expected} ({of}), got length {len(items)}")


def _jitter(count: int, width: float) -> NDArray[np.float64]:
    """Uniform offsets in [-width/2, width/2] from a fixed seed (deterministic pictures)."""
    generator = torch.Generator().manual_seed(_JITTER_SEED)
    return _numpy((torch.rand(count, generator=generator, dtype=torch.float64) - 0.5) * width)


def _shorten(name: str, limit: int = _NAME_CHARS) -> str:
    """Middle ellipsis: keeps both ends of dotted layer names such as ``layer3.2.conv2``."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head) :]


def _normalise(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """Min-max to [0, 1] over the whole image; constant or non-finite images become 0."""
    image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _figure(width: float, height: float) -> Figure:
    size = (min(width, _MAX_FIG_INCHES), min(height, _MAX_FIG_INCHES))
    return Figure(figsize=size, layout="constrained")


def _suptitle(fig: Figure, title: str) -> None:
    """The figure's title, wrapped at the figure's edges (constrained layout makes room)."""
    if title:
        fig.suptitle(title, wrap=True)


def _label_ticks(ax: Axes, axis: str, names: Sequence[str], max_labels: int, **text: Any) -> None:
    """Labels every k-th tick of ``axis`` ("x" or "y") with ``names`` (at most ``max_labels``)."""
    ticks = list(range(0, len(names), max(1, math.ceil(len(names) / max(1, max_labels)))))
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_ticks(ticks, [names[i] for i in ticks], **text)


def _decorate(ax: Axes, title: str, xlabel: str, ylabel: str, finite: NDArray[np.bool_]) -> None:
    ax.set_title(title, wrap=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if (~finite).any():
        dropped = f"{int((~finite).sum())} non-finite values not shown"
        ax.text(0.01, 0.01, dropped, transform=ax.transAxes, fontsize=7, color="grey")


def _show(ax: Axes, image: NDArray[np.float64]) -> None:
    """Shows (C, H, W) as RGB if C = 3, else its first channel in grey, min-max normalised."""
    shown = _normalise(image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0])
    ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def figure_to_image(fig: Figure, dpi: int = 100) -> torch.Tensor:
    """Renders ``fig`` with the Agg canvas into an RGB image.

    Args:
        fig: the figure; its dpi is restored afterwards.
        dpi: dots per inch of the rendering (pixels = inches × dpi).

    Returns:
        uint8 tensor (3, H, W): RGB, channels first, as TensorBoard's
        ``add_image(..., dataformats="CHW")`` expects.
    """
    if not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    canvas = FigureCanvasAgg(fig)
    original_dpi = fig.dpi
    try:
        fig.set_dpi(dpi)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    finally:
        fig.set_dpi(original_dpi)
    return torch.from_numpy(rgba).permute(2, 0, 1).contiguous()


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
    if flagged is not None and hit.any():
        ax.scatter(x[hit], y[hit], s=30, c="#d62728", edgecolors="k", zorder=3, label=flag_label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a point
    elif flagged is not None:  # no red mark drawn: no entry, the legend's title says why
        unseen = int(flag_values.sum())
        note = f"{flag_label}: {unseen} with non-finite log FI" if unseen else f"none {flag_label}"
        ax.legend(handles=[], title=note, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    names = [_shorten(str(name), 20) for name in names]
    upright = max(len(name) for name in names) > 3  # upright: long names cannot overlap
    _label_ticks(ax, "x", names, 40, rotation=90 if upright else 0, fontsize=8 if upright else 10)
    ax.set_xlim(-0.6, num_classes - 0.4)
    _decorate(ax, title or "FI per sample, by class", "class", "log FI (natural log)", finite)
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
    fig.colorbar(image, ax=ax, label=value_label)
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
    ax.set_title(title or f"{value_label} per {ylabel} and {xlabel}", wrap=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _decorate(ax, title or f"{value_label} per layer", "layer", value_label, finite)
    return fig


def sample_grid(
    images: torch.Tensor, captions: Sequence[str], title: str = "", columns: int = 8
) -> Figure:
    """A grid of images with a small caption under each (e.g. the top-FI samples, §9.1).

    C = 3 is shown as RGB, any other C as grey (first channel); each image is min-max normalised on
    its own, so colours are comparable within an image only.

    Args:
        images: (n, C, H, W); n may be 0 (then the figure says "no samples").
        captions: n strings.
        title: figure title.
        columns: images per row.

    Returns:
        The figure (one axes per image).
    """
    if not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    _check_shape("images", images, ["n", "C", "H", "W"])
    n = images.shape[0]
    _check_length("captions", captions, n, "one per image")
    if n == 0:
        fig = _figure(4.0, 1.5)
        fig.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=12)
        _suptitle(fig, title)
        return fig
    data = _numpy(images)
    n_columns = min(columns, n)
    n_rows = math.ceil(n / n_columns)
    fig = _figure(max(1.6 * n_columns + 0.3, 4.0), 1.9 * n_rows + 0.5)  # 4 in: room for a title
    for i in range(n):
        ax = fig.add_subplot(n_rows, n_columns, i + 1)
        _show(ax, data[i])
        ax.set_xlabel(str(captions[i]), fontsize=7)
    _suptitle(fig, title)
    return fig


def fi_overlays(
    images: torch.Tensor,
    maps: Mapping[int, torch.Tensor],
    captions: Sequence[str],
    title: str = "",
    lead: tuple[str, str, torch.Tensor] | None = None,
) -> Figure:
    """FI maps over their images (Setup 4 of docs/paper.md): where the model is vulnerable.

    One row per sample. Column 0: the image (caption below). Then one column per window size w,
    ascending, titled ``w = 3`` etc.: the image in grey with the FI map on a log colour scale
    (alpha 0.6) spanning at most 4 decades below the column's maximum (smaller FI takes the lowest
    colour); pixels with FI ≤ 0 or non-finite are transparent. Each window column shares one
    colour scale across rows, explained by the colorbar below it. A cross marks the top-FI pixel of
    the smallest window (the one-pixel-attack candidate) on the image and on that window's column;
    a legend under the figure says so.

    With ``lead``, a first map column comes before the FI windows, and the cross marks its top
    pixel instead.

    Args:
        images: (n, C, H, W); C = 3 shown as RGB in column 0, else the first channel.
        maps: window size w → (n, H, W) FI (not log FI) per pixel.
        captions: n strings.
        title: figure title.
        lead: (column title, colour-bar label, (n, H, W) positive values), e.g. the input metric
            diagonal, the map the monitor reads as "where an edit changes the prediction most".

    Returns:
        The figure (n × (1 + len(maps)) image axes plus one colorbar per window size).
    """
    _check_shape("images", images, ["n", "C", "H", "W"])
    n, _, height, width = images.shape
    _check_length("captions", captions, n, "one per image")
    windows = sorted(maps)
    for w in windows:
        if not isinstance(w, int) or w < 1:
            raise ValueError(f"maps keys must be positive int window sizes, got {w!r}")
        _check_shape(f"maps[{w}]", maps[w], [n, height, width])
    if lead is not None:
        _check_shape("lead map", lead[2], [n, height, width])
    if n == 0:
        return sample_grid(images, captions, title=title)
    data = _numpy(images)
    fi: dict[Any, np.ndarray] = {w: _numpy(maps[w]) for w in windows}
    titles: dict[Any, tuple[str, str]] = {w: (f"FI, w = {w}", "FI (log scale)") for w in windows}
    if lead is not None:
        fi = {"lead": _numpy(lead[2]), **fi}
        titles["lead"] = (lead[0], lead[1])
    columns = list(fi)
    cmap = colormaps["inferno"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))

    n_columns = 1 + len(columns)
    fig = _figure(1.9 * n_columns + 0.3, 1.9 * n + (1.7 if columns else 1.2))
    # The colour bars get a row of their own: constrained layout then keeps their labels inside.
    ratios = [1.0] * n + ([0.06] if columns else [])
    grid = fig.add_gridspec(len(ratios), n_columns, height_ratios=ratios)
    axes = [[fig.add_subplot(grid[r, c]) for c in range(n_columns)] for r in range(n)]
    for r in range(n):
        _show(axes[r][0], data[r])
        axes[r][0].set_xlabel(str(captions[r]), fontsize=7)
    axes[0][0].set_title("image", fontsize=9)
    for c, w in enumerate(columns, start=1):
        shown = (fi[w] > 0) & np.isfinite(fi[w])
        high = float(fi[w][shown].max()) if shown.any() else 10.0
        # Lower FI than _OVERLAY_DECADES below the peak takes the lowest colour: peaks stand out.
        low = max(float(fi[w][shown].min()), high * 10.0**-_OVERLAY_DECADES) if shown.any() else 1.0
        norm = LogNorm(vmin=low, vmax=high if high > low else low * 10.0)
        for r in range(n):
            grey = data[r].mean(axis=0) if data.shape[1] == 3 else data[r, 0]
            _show(axes[r][c], grey[None])
            layer = np.ma.masked_array(np.where(shown[r], fi[w][r], 1.0), mask=~shown[r])
            axes[r][c].imshow(layer, cmap=cmap, norm=norm, alpha=0.6, interpolation="nearest")
        axes[0][c].set_title(titles[w][0], fontsize=9)
        mappable = axes[n - 1][c].images[-1]
        bar = fig.colorbar(mappable, cax=fig.add_subplot(grid[n, c]), orientation="horizontal")
        bar.set_label(titles[w][1], fontsize=9)
        # Three labelled ticks, geometrically spaced: readable for narrow and wide ranges alike.
        bottom, top = float(norm.vmin), float(norm.vmax)  # type: ignore[arg-type]
        bar.set_ticks([bottom, (bottom * top) ** 0.5, top], labels=None)
        bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        bar.ax.xaxis.set_minor_formatter(NullFormatter())
        bar.ax.tick_params(labelsize=8)
    marked = False
    if columns:
        smallest = fi[columns[0]]
        for r in range(n):
            scores = np.where(np.isfinite(smallest[r]), smallest[r], -np.inf)
            if scores.max() <= 0:
                continue  # no positive FI: no candidate pixel
            row, col = np.unravel_index(int(np.argmax(scores)), scores.shape)
            for ax in (axes[r][0], axes[r][1]):
                ax.plot([col], [row], **_CROSS)
            marked = True
    if marked:  # explain the cross: which map's top pixel, and what it is for
        cross = Line2D([], [], linestyle="none", **_CROSS)
        what = f"top pixel of “{titles[columns[0]][0]}”\n(the one-pixel-attack candidate)"
        fig.legend([cross], [what], loc="outside lower center", fontsize=8, frameon=False)
    _suptitle(fig, title)
    return fig
