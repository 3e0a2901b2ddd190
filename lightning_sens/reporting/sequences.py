"""Pictures of samples that are not images: text tables and per-token FI strips.

The same conventions as :mod:`lightning_sens.reporting.figures` (object API, Agg canvas, tensors
copied to CPU float64, log colour scales spanning at most four decades).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lightning_sens.reporting.canvas import (
    _MAX_FIG_INCHES,
    _bar_ticks,
    _check_length,
    _check_shape,
    _figure,
    _label_ticks,
    _log_norm,
    _numpy,
    _shorten,
    _suptitle,
)
from lightning_sens.reporting.layout import PAD, grid, place, text_size, tick_room

__all__ = ["sample_text", "token_strips"]

_GAP = 0.08  # inches between a strip's tokens and the next caption, or a title and a strip
_BAR = 0.15  # inches: the height of the colour bar
_BAR_LABEL = "FI (log scale); blank: FI 0"


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
    top = max(_suptitle(fig, title), PAD)
    ax = fig.add_subplot(1, 1, 1)
    width, height = fig.get_size_inches()
    place(fig, ax, PAD, PAD, width - 2 * PAD, height - PAD - top)
    ax.axis("off")
    if n == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=12)
    for i, (caption, line) in enumerate(zip(captions, lines, strict=True)):
        shown = line if len(line) <= 110 else line[:109] + "…"
        y = 1.0 - (i + 0.5) / max(n, 1)
        ax.text(0.0, y, caption.replace("\n", "  "), fontsize=8, va="center", weight="bold")
        ax.text(0.0, y - 0.35 / max(n, 1), shown, fontsize=8, va="center", family="monospace")
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
    norm = _log_norm(values)  # one scale for all panels
    cmap = colormaps["inferno"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    width = max(7.0, 0.35 * T + 2.0)
    fig = _figure(width, (0.32 * len(windows) + 0.75) * max(n, 1) + 1.2)
    top = _suptitle(fig, title) + _GAP
    if n == 0:
        fig.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=12)
        return fig
    bottom, tall = _bar_room(fig, norm)
    # Above each strip its caption, below it the tokens (turned): the room between two strips.
    caption = max(text_size(fig, c.replace("\n", "  "), fontsize=8)[1] for c in captions)
    caption += mpl.rcParams["axes.titlepad"] / 72.0
    shown_tokens = [_shorten(str(t), 8) for row in tokens for t in row] or [""]
    under = max(text_size(fig, t, fontsize=6, rotation=90)[1] for t in set(shown_tokens))
    under += tick_room("x") + _GAP
    left = max(text_size(fig, f"w = {w}", fontsize=7)[0] for w in windows) + tick_room("y")
    margins = (PAD + left, bottom + under, PAD, top + caption)
    spec = grid(fig, [None] * n, 1, margins, (0.0, under + caption))
    axes = [fig.add_subplot(spec[r, 0]) for r in range(n)]
    for r, ax in enumerate(axes):
        layer = np.ma.masked_array(np.where(shown[r], values[r], 1.0), mask=~shown[r])
        ax.imshow(layer, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(windows)), [f"w = {w}" for w in windows], fontsize=7)
        labels = [_shorten(str(t), 8) for t in tokens[r]]
        # Long sequences: every k-th token labelled (about 8 per inch), never overlapping.
        _label_ticks(ax, "x", labels, int(min(width, _MAX_FIG_INCHES) * 8), fontsize=6, rotation=90)
        ax.set_title(captions[r].replace("\n", "  "), fontsize=8, loc="left")
    strip = axes[-1].get_position()  # the colour bar: 60 % of the strips' width, centred
    cax = fig.add_axes((strip.x0 + 0.2 * strip.width, tall / fig.get_size_inches()[1],
                        0.6 * strip.width, _BAR / fig.get_size_inches()[1]))  # fmt: skip
    bar = fig.colorbar(axes[-1].images[-1], cax=cax, orientation="horizontal")
    bar.set_label(_BAR_LABEL)
    bar.set_ticks(_bar_ticks(norm), labels=None)
    bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    bar.ax.xaxis.set_minor_formatter(NullFormatter())
    return fig


def _bar_room(fig: Figure, norm: LogNorm) -> tuple[float, float]:
    """(inches from the figure's bottom to the top of the colour bar, to its bottom): below the
    bar its tick labels and its label."""
    rc = mpl.rcParams
    labels = max(text_size(fig, f"{v:.2g}", fontsize=rc["xtick.labelsize"])[1]
                 for v in _bar_ticks(norm))  # fmt: skip
    label = text_size(fig, _BAR_LABEL, fontsize=rc["axes.labelsize"])[1]
    below = PAD + label + rc["axes.labelpad"] / 72.0 + labels + tick_room("x")
    return below + _BAR, below
