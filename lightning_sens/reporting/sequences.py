"""Pictures of samples that are not images: text tables and per-token FI strips.

The same conventions as :mod:`lightning_sens.reporting.figures` (object API, Agg canvas, tensors
copied to CPU float64, log colour scales spanning at most four decades).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lightning_sens.reporting.canvas import (
    _MAX_FIG_INCHES,
    _OVERLAY_DECADES,
    _check_length,
    _check_shape,
    _figure,
    _label_ticks,
    _numpy,
    _shorten,
    _suptitle,
)

__all__ = ["sample_text", "token_strips"]


def sample_text(lines: Sequence[str], captions: Sequence[str], title: str = "") -> Figure:
    """Samples that are not images (token sequences, tables), one per row: caption and text.

    Args:
        lines: n descriptions (e.g. the decoded text, or the token ids); long ones are cut.
        captions: n strings shown before each description (id, labels, FI).
        title: figure title.

    Returns:
        The figure (one axes holding the text).
    """
    _check_length("captions", captions, len(lines), "one per sample")
    n = len(lines)
    fig = _figure(9.0, 0.45 * max(n, 1) + 0.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    if n == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=12)
    for i, (caption, line) in enumerate(zip(captions, lines, strict=True)):
        shown = line if len(line) <= 110 else line[:109] + "…"
        y = 1.0 - (i + 0.5) / max(n, 1)
        ax.text(0.0, y, caption.replace("\n", "  "), fontsize=8, va="center", weight="bold")
        ax.text(0.0, y - 0.35 / max(n, 1), shown, fontsize=8, va="center", family="monospace")
    _suptitle(fig, title)
    return fig


def token_strips(
    maps: Mapping[int, torch.Tensor],
    tokens: Sequence[Sequence[str]],
    captions: Sequence[str],
    title: str = "",
) -> Figure:
    """Per-token FI of token sequences (Setup 4 on the embedded input), one panel per sample.

    Each panel has one row per window size w (a window of w consecutive tokens, centred on the
    token) and one column per token (every k-th labelled in long sequences), on a log colour
    scale shared by all panels; tokens with FI ≤ 0 (padding) are blank.

    Args:
        maps: window size w → (n, T) FI per token (e.g. the maximum over embedding coordinates).
        tokens: n sequences of T token labels (ids or decoded pieces).
        captions: n strings.
        title: figure title.
    """
    windows = sorted(maps)
    if not windows:
        raise ValueError("maps must hold at least one window size")
    n, T = maps[windows[0]].shape
    for w in windows:
        _check_shape(f"maps[{w}]", maps[w], [n, T])
    _check_length("tokens", tokens, n, "one sequence per sample")
    _check_length("captions", captions, n, "one per sample")
    values = np.stack([_numpy(maps[w]) for w in windows], axis=1)  # (n, W, T)
    shown = (values > 0) & np.isfinite(values)
    high = float(values[shown].max()) if shown.any() else 10.0
    low = max(float(values[shown].min()), high * 10.0**-_OVERLAY_DECADES) if shown.any() else 1.0
    norm = LogNorm(vmin=low, vmax=high if high > low else low * 10.0)
    cmap = colormaps["inferno"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    width = max(7.0, 0.35 * T + 2.0)
    fig = _figure(width, (0.32 * len(windows) + 0.75) * max(n, 1) + 1.2)
    if n == 0:
        fig.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=12)
    axes = [fig.add_subplot(n, 1, r + 1) for r in range(n)]
    for r, ax in enumerate(axes):
        layer = np.ma.masked_array(np.where(shown[r], values[r], 1.0), mask=~shown[r])
        ax.imshow(layer, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(windows)), [f"w = {w}" for w in windows], fontsize=7)
        labels = [_shorten(str(t), 8) for t in tokens[r]]
        # Long sequences: every k-th token labelled (about 8 per inch), never overlapping.
        _label_ticks(ax, "x", labels, int(min(width, _MAX_FIG_INCHES) * 8), fontsize=6, rotation=90)
        ax.set_title(captions[r].replace("\n", "  "), fontsize=8, loc="left")
    if axes:
        bar = fig.colorbar(axes[-1].images[-1], ax=axes, location="bottom", shrink=0.6)
        bar.set_label("FI (log scale); blank: FI 0")
        bottom, top = float(norm.vmin), float(norm.vmax)  # type: ignore[arg-type]
        bar.set_ticks([bottom, (bottom * top) ** 0.5, top], labels=None)
        bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        bar.ax.xaxis.set_minor_formatter(NullFormatter())
    _suptitle(fig, title)
    return fig
