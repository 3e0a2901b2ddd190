"""What every picture of :mod:`lightning_sens.reporting` shares: figures on the Agg canvas,
their sizes and titles, tick labels, input checks, deterministic jitter, and the rendering of a
figure into an image tensor.

Object API and the Agg canvas only (no ``pyplot``: no global state, no GUI backend). Inputs are
torch tensors of any dtype and device, copied to CPU float64. Jitter comes from a fixed
``torch.Generator`` seed, so the same inputs always give the same picture.

Example:
    >>> fig = _figure(2.0, 1.0)
    >>> figure_to_image(fig, dpi=50).shape
    torch.Size([3, 50, 100])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from numpy.typing import NDArray

from lightning_sens.reporting.layout import PAD, extent, title_pad

__all__ = ["figure_to_image"]

_DPI = 100  # what figure_to_image draws at by default: texts are measured at it
_JITTER_SEED = 0
_NAME_CHARS = 30
_MAX_FIG_INCHES = 16.0
_OVERLAY_DECADES = 4


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
    """A figure of at most 16 × 16 inches, drawn at 100 dpi; no layout engine: each picture
    places its axes itself (:mod:`lightning_sens.reporting.layout`)."""
    size = (min(width, _MAX_FIG_INCHES), min(height, _MAX_FIG_INCHES))
    return Figure(figsize=size, dpi=_DPI)


def _suptitle(fig: Figure, title: str) -> float:
    """Sets the figure's title, wrapped at the figure's edges, and returns the inches it takes
    at the top of the figure (the room above the first row of axes); 0 without a title."""
    if not title:
        return 0.0
    top = 1.0 - PAD / fig.get_size_inches()[1]
    text = fig.suptitle(title, wrap=True, y=top, verticalalignment="top")
    return PAD + extent(fig, text)[1]


def _log_norm(values: NDArray[np.float64]) -> LogNorm:
    """A log colour scale for FI ``values``: from their largest down at most
    ``_OVERLAY_DECADES`` decades (smaller FI takes the lowest colour, so that peaks stand out);
    FI ≤ 0 and non-finite FI are left out. Without any positive FI: 1 to 10."""
    shown = (values > 0) & np.isfinite(values)
    high = float(values[shown].max()) if shown.any() else 10.0
    low = max(float(values[shown].min()), high * 10.0**-_OVERLAY_DECADES) if shown.any() else 1.0
    return LogNorm(vmin=low, vmax=high if high > low else low * 10.0)


def _bar_ticks(norm: LogNorm) -> list[float]:
    """Three ticks for the colour bar of a log scale, geometrically spaced (its ends and their
    middle): readable for narrow and wide ranges alike."""
    low, high = float(norm.vmin), float(norm.vmax)  # type: ignore[arg-type]
    return [low, (low * high) ** 0.5, high]


def _label_ticks(ax: Axes, axis: str, names: Sequence[str], max_labels: int, **text: Any) -> None:
    """Labels every k-th tick of ``axis`` ("x" or "y") with ``names`` (at most ``max_labels``)."""
    ticks = list(range(0, len(names), max(1, math.ceil(len(names) / max(1, max_labels)))))
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_ticks(ticks, [names[i] for i in ticks], **text)


def _decorate(ax: Axes, title: str, xlabel: str, ylabel: str, finite: NDArray[np.bool_]) -> None:
    ax.set_title(title, wrap=True, pad=title_pad())
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
