"""Where a sample's labels look wrong: every position's log FI drawn over the sample, for models
with many positions (docs/tasks.md, "The position maps").

A segmentation sample is a row of panels (the image, its label mask, log FI per pixel); text and
multi-label samples share one heat map, a row per sample and a cell per token or class.

Example:
    >>> import torch
    >>> fig = position_maps(torch.randn(2, 4, 4), ["a", "b"])
    >>> figure_to_image(fig).shape[0]
    3
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_sens.reporting.canvas import _figure, _normalise, _numpy, _shorten, figure_to_image

__all__ = ["figure_to_image", "position_maps"]

_CMAP = "magma"
_LABEL_CMAP = "tab20"


def position_maps(
    log_fi: torch.Tensor,
    captions: Sequence[str],
    images: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    title: str = "log FI of every position with its label",
    classes: int | None = None,
) -> Figure:
    """log FI per position of ``n`` samples.

    Args:
        log_fi: ``(n, H, W)`` for pixels or ``(n, P)`` for tokens and outputs; NaN at positions
            that were skipped (drawn blank).
        captions: one line per sample.
        images: ``(n, C, H, W)`` inputs drawn beside pixel maps (C = 1 or 3), or None.
        masks: ``(n, H, W)`` label masks drawn beside pixel maps, or None; labels outside
            ``[0, classes)`` (ignored positions) are drawn blank.
        title: the figure's title.
        classes: the number of classes the mask colours span (default: its largest label + 1).
    """
    if len(captions) != len(log_fi):
        raise ValueError(f"captions: {len(captions)} lines for {len(log_fi)} samples")
    values = _numpy(log_fi)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if values.ndim == 3:
        return _pixel_maps(values, captions, images, masks, title, (low, high), classes)
    n, positions = values.shape
    width = min(14.0, 2.0 + 0.25 * positions)
    fig = _figure(width, 1.2 + 0.35 * n)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(
        values, aspect="auto", cmap=_CMAP, vmin=low, vmax=high, interpolation="nearest"
    )
    ax.set_yticks(range(n), [_shorten(c, 40) for c in captions], fontsize=7)
    ax.set_xlabel("position")
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, label="log FI")
    return fig


def _pixel_maps(
    values: np.ndarray,
    captions: Sequence[str],
    images: torch.Tensor | None,
    masks: torch.Tensor | None,
    title: str,
    limits: tuple[float, float],
    classes: int | None,
) -> Figure:
    n = len(values)
    columns = 1 + (images is not None) + (masks is not None)
    fig = _figure(2.2 * columns + 0.8, 2.2 * n + 0.5)
    fig.suptitle(title, fontsize=9)
    for row in range(n):
        column = 1
        if images is not None:
            ax = fig.add_subplot(n, columns, row * columns + column)
            picture = _numpy(images[row])
            if picture.shape[0] == 1:
                ax.imshow(_normalise(picture[0]), cmap="gray")
            else:
                ax.imshow(_normalise(np.moveaxis(picture[:3], 0, -1)))
            ax.set_title(_shorten(captions[row], 30), fontsize=7)
            ax.axis("off")
            column += 1
        if masks is not None:
            ax = fig.add_subplot(n, columns, row * columns + column)
            labels = _numpy(masks[row])
            top = classes if classes is not None else int(labels[labels < 255].max(initial=0)) + 1
            shown_labels = np.where((labels >= 0) & (labels < top), labels, np.nan)
            ax.imshow(
                shown_labels,
                cmap=_LABEL_CMAP,
                vmin=0,
                vmax=max(top - 1, 1),
                interpolation="nearest",
            )
            ax.set_title("labels", fontsize=7)
            ax.axis("off")
            column += 1
        ax = fig.add_subplot(n, columns, row * columns + column)
        shown = ax.imshow(values[row], cmap=_CMAP, vmin=limits[0], vmax=limits[1])
        ax.set_title("log FI" if images is not None else _shorten(captions[row], 30), fontsize=7)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return fig
