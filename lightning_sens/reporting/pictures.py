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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lightning_sens.reporting.canvas import (
    _OVERLAY_DECADES,
    _check_length,
    _check_shape,
    _figure,
    _numpy,
    _show,
    _suptitle,
)

__all__ = ["fi_overlays", "sample_grid"]

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
