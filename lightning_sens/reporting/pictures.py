"""Pictures of image samples: a grid of images with captions (e.g. the flagged samples), and
FI maps over their images (Setup 4 of docs/paper.md). The conventions of
:mod:`lightning_sens.reporting.canvas`.

Example:
    >>> import torch
    >>> fig = fi_overlays(torch.rand(2, 1, 8, 8), {1: torch.rand(2, 8, 8)}, ["a", "b"])
    >>> len(fig.axes)  # 2 rows of (image, map), one colour bar
    5
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lightning_sens.reporting.canvas import (
    _bar_ticks,
    _check_length,
    _check_shape,
    _figure,
    _log_norm,
    _numpy,
    _show,
    _suptitle,
)
from lightning_sens.reporting.layout import PAD, extent, grid, text_size, tick_room

__all__ = ["fi_overlays", "sample_grid"]

_CAPTION = 7  # points: the captions under the images
_GAP = 0.08  # inches between a caption and the next row, or the title and the first row
_BAR = 0.1  # inches: the height of the colour bars under the maps
# clip_on=False: a top pixel on the border keeps its whole cross
_CROSS: dict[str, Any] = {
    "marker": "x", "color": "cyan", "markersize": 8, "mew": 2, "clip_on": False
}  # fmt: skip


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
    top = _suptitle(fig, title) + _GAP
    wide, tall = _captions(fig, captions)
    across = _across(fig, n_columns, wide)
    spec = grid(fig, [None] * n_rows, n_columns, (PAD, PAD + tall, PAD, top), (across, tall + _GAP))
    for i in range(n):
        ax = fig.add_subplot(spec[i // n_columns, i % n_columns])
        _show(ax, data[i])
        ax.set_xlabel(str(captions[i]), fontsize=_CAPTION)
    return fig


def _captions(fig: Figure, captions: Sequence[str]) -> tuple[float, float]:
    """(widest, tallest) caption under an image, in inches, the label pad included."""
    sizes = [text_size(fig, str(caption), fontsize=_CAPTION) for caption in captions]
    pad = mpl.rcParams["axes.labelpad"] / 72.0
    return max(w for w, _ in sizes), max(h for _, h in sizes) + pad


def _across(fig: Figure, columns: int, wide: float, least: float = 0.1) -> float:
    """The gap between columns (inches, at least ``least``) that keeps captions ``wide`` inches
    wide, centred under their cells, apart from their neighbours'."""
    width = fig.get_size_inches()[0] - 2 * PAD
    # Neighbouring captions are one column pitch, (width + gap) / columns, apart.
    needed = columns * (wide + _GAP) - width if columns > 1 else 0.0
    return max(least, needed / max(columns - 1, 1))


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
    norms = {w: _log_norm(fi[w]) for w in columns}
    ticks = {w: _bar_ticks(norms[w]) for w in columns}
    targets = _top_pixels(fi[columns[0]]) if columns else [None] * n

    n_columns = 1 + len(columns)
    fig = _figure(1.9 * n_columns + 0.3, 1.9 * n + (1.7 if columns else 1.2))
    top = _suptitle(fig, title) + _GAP
    heads = ["image", *(titles[w][0] for w in columns)]
    top += max(text_size(fig, t, fontsize=9)[1] for t in heads)
    top += mpl.rcParams["axes.titlepad"] / 72.0
    wide, tall = _captions(fig, captions)
    bottom, right = PAD, PAD
    if any(target is not None for target in targets):  # explain the cross: what it marks, why
        cross = Line2D([], [], linestyle="none", **_CROSS)
        what = f"top pixel of “{titles[columns[0]][0]}”\n(the one-pixel-attack candidate)"
        at = (0.5, PAD / fig.get_size_inches()[1])  # the bottom centre, PAD above the edge
        legend = fig.legend([cross], [what], loc="lower center", bbox_to_anchor=at,
                            borderaxespad=0.0, fontsize=8, frameon=False)  # fmt: skip
        bottom += extent(fig, legend)[1] + _GAP
    across = _across(fig, n_columns, wide, least=0.2)
    if columns:  # below the bars: their tick labels, then their labels
        # The end labels of the bars stick out by half their width: neighbours keep apart.
        ends = [[text_size(fig, f"{v:.2g}", fontsize=8)[0] / 2 for v in ticks[w]] for w in columns]
        meet = [a[-1] + b[0] + _GAP for a, b in itertools.pairwise(ends)]
        across = max([across, *meet])
        right += ends[-1][-1]
        bottom += max(text_size(fig, titles[w][1], fontsize=9)[1] for w in columns)
        bottom += mpl.rcParams["axes.labelpad"] / 72.0 + tick_room("x")
        bottom += text_size(fig, "0.1", fontsize=8)[1]
    else:
        bottom += tall
    heights = [None] * n + ([_BAR] if columns else [])
    spec = grid(fig, heights, n_columns, (PAD, bottom, right, top), (across, tall + _GAP))
    axes = [[fig.add_subplot(spec[r, c]) for c in range(n_columns)] for r in range(n)]
    for r in range(n):
        _show(axes[r][0], data[r])
        axes[r][0].set_xlabel(str(captions[r]), fontsize=_CAPTION)
    axes[0][0].set_title("image", fontsize=9)
    for c, w in enumerate(columns, start=1):
        shown = (fi[w] > 0) & np.isfinite(fi[w])
        for r in range(n):
            grey = data[r].mean(axis=0) if data.shape[1] == 3 else data[r, 0]
            _show(axes[r][c], grey[None])
            layer = np.ma.masked_array(np.where(shown[r], fi[w][r], 1.0), mask=~shown[r])
            axes[r][c].imshow(layer, cmap=cmap, norm=norms[w], alpha=0.6, interpolation="nearest")
        axes[0][c].set_title(titles[w][0], fontsize=9)
        mappable = axes[n - 1][c].images[-1]
        bar = fig.colorbar(mappable, cax=fig.add_subplot(spec[n, c]), orientation="horizontal")
        bar.set_label(titles[w][1], fontsize=9)
        bar.set_ticks(ticks[w], labels=None)
        bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        bar.ax.xaxis.set_minor_formatter(NullFormatter())
        bar.ax.tick_params(labelsize=8)
    for r, target in enumerate(targets):
        if target is not None:
            for ax in (axes[r][0], axes[r][1]):
                ax.plot([target[1]], [target[0]], **_CROSS)
    return fig


def _top_pixels(fi: np.ndarray) -> list[tuple[int, int] | None]:
    """Per sample of (n, H, W) FI, the (row, column) of its largest FI; None where no FI is
    positive (no candidate pixel)."""
    found: list[tuple[int, int] | None] = []
    for sample in fi:
        scores = np.where(np.isfinite(sample), sample, -np.inf)
        if scores.max() <= 0:
            found.append(None)
            continue
        row, col = np.unravel_index(int(np.argmax(scores)), scores.shape)
        found.append((int(row), int(col)))
    return found
