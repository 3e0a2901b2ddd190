"""Fixed layouts of the reporting figures: axes placed in inches, with margins computed from what
a figure holds (its titles, captions, tick labels, legends and colour bars).

matplotlib's constrained layout finds the room each axes needs by measuring the tight bounding
box of every axes, with all its ticks, at every draw and twice over: a fifth to a quarter of
the CPU time of the monitor's figures (docs/performance.md,
"Drawing the figures (`benchmarks/bench_figures.py`)"). Here only the texts that vary are
measured, once, with the text metrics that draw them (wrapping included) at the dpi the figure
is drawn at (``figure_to_image`` draws at 100 dpi unless told otherwise).

Example:
    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(4.0, 3.0), dpi=100)
    >>> ax = fig.add_subplot(1, 1, 1)
    >>> _ = ax.set_title("a title", pad=title_pad()), ax.set_ylabel("log FI")
    >>> frame(fig, ax)
    >>> left = ax.get_position().x0 * 4.0  # inches: the y label and the tick labels fit
    >>> bool(0.3 < left < 1.0)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import matplotlib as mpl
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.gridspec import GridSpec
from matplotlib.legend import Legend
from matplotlib.text import Text

__all__ = [
    "PAD", "extent", "frame", "grid", "place", "points", "text_size", "tick_room", "title_pad"
]  # fmt: skip

PAD = 0.06  # inches between a text and the figure's edge
_BAR = (0.15, 0.15)  # inches: gap between a heat map and its colour bar, the bar's width
_ROUNDS = 4  # title wraps and tick labels depend on the axes' place: a few rounds settle them


@functools.lru_cache(maxsize=4)
def _renderer(dpi: float) -> RendererAgg:
    """A one-pixel Agg renderer: the text metrics of a figure drawn at ``dpi``."""
    return RendererAgg(1, 1, dpi)


def points(size: float | str) -> float:
    """A font size (points or a name such as "large") in points."""
    return FontProperties(size=size).get_size_in_points()


def extent(fig: Figure, artist: Artist | None) -> tuple[float, float]:
    """(width, height) in inches of ``artist`` as drawn in ``fig`` (a text wrapped and turned as
    it will be): (0, 0) for None, a hidden artist or an empty text."""
    if artist is None or not artist.get_visible():
        return 0.0, 0.0
    if isinstance(artist, Text) and not artist.get_text().strip():
        return 0.0, 0.0
    box = artist.get_window_extent(_renderer(fig.dpi))
    return box.width / fig.dpi, box.height / fig.dpi


def text_size(fig: Figure, text: str, **props: object) -> tuple[float, float]:
    """(width, height) in inches of ``text`` in ``fig`` with the text properties ``props``
    (e.g. ``fontsize=7``), before anything draws it."""
    probe = Text(0.0, 0.0, text, **props)  # type: ignore[arg-type]
    probe.set_figure(fig)
    return extent(fig, probe)


def tick_room(axis: str) -> float:
    """Inches from an axis line to its tick labels (tick length and pad), for "x" or "y"."""
    rc = mpl.rcParams
    if axis == "x":
        return (rc["xtick.major.size"] + rc["xtick.major.pad"]) / 72.0
    return (rc["ytick.major.size"] + rc["ytick.major.pad"]) / 72.0


def title_pad() -> float:
    """Points between a plot and its title's baseline: ``axes.titlepad``, or more where half a
    y tick label (one at the plot's top edge, or a colour bar's beside it) would reach the
    title's descenders."""
    rc = mpl.rcParams
    reach = 0.6 * points(rc["ytick.labelsize"]) + 0.25 * points(rc["axes.titlesize"])
    return max(rc["axes.titlepad"], reach + 0.5)


def place(fig: Figure, ax: Axes, left: float, bottom: float, width: float, height: float) -> None:
    """Puts ``ax`` at ``left``, ``bottom`` (inches from the figure's lower left corner), of
    ``width`` × ``height`` inches (an image axes keeps its aspect inside that box, centred)."""
    fig_width, fig_height = fig.get_size_inches()
    ax.set_position(
        (left / fig_width, bottom / fig_height, max(width, 0.01) / fig_width,
         max(height, 0.01) / fig_height)
    )  # fmt: skip


def grid(
    fig: Figure,
    heights: Sequence[float | None],
    columns: int,
    margins: tuple[float, float, float, float],
    gaps: tuple[float, float],
) -> GridSpec:
    """A grid of ``len(heights)`` rows and ``columns`` equal columns inside ``margins`` (left,
    bottom, right, top; inches from the figure's edges), ``gaps`` (across, down) inches apart.

    A row's height is its entry of ``heights`` in inches; None rows share what is left equally.

    Returns:
        The GridSpec; ``fig.add_subplot(spec[row, column])`` adds an axes in a cell.
    """
    width, height = fig.get_size_inches()
    left, bottom, right, top = margins
    gap_x, gap_y = gaps
    free = height - bottom - top - gap_y * (len(heights) - 1)
    shared = sum(h is None for h in heights)
    share = max(free - sum(h for h in heights if h is not None), 0.01) / max(shared, 1)
    rows = [share if h is None else h for h in heights]
    cell_x = max(width - left - right - gap_x * (columns - 1), 0.01) / columns
    return fig.add_gridspec(
        len(rows), columns, height_ratios=rows, left=left / width, right=1.0 - right / width,
        bottom=bottom / height, top=1.0 - top / height, wspace=gap_x / cell_x,
        hspace=gap_y / (sum(rows) / len(rows)),
    )  # fmt: skip


def _labels(axis: Axis) -> list[Text]:
    return [text for text in axis.get_ticklabels() if text.get_visible() and text.get_text()]


def _overhang(fig: Figure, ax: Axes) -> tuple[float, float]:
    """Inches by which the x tick labels reach past the axes' left and right edges."""
    low, high = ax.get_xlim()
    width = ax.get_position().width * fig.get_size_inches()[0]
    left = right = 0.0
    for text in _labels(ax.xaxis):
        at = (text.get_position()[0] - low) / (high - low) * width
        w = extent(fig, text)[0]
        share = {"right": 1.0, "left": 0.0}.get(text.get_horizontalalignment(), 0.5)
        left, right = max(left, share * w - at), max(right, (1.0 - share) * w - (width - at))
    return left, right


def _widest(fig: Figure, texts: Iterable[Text], index: int) -> float:
    return max((extent(fig, text)[index] for text in texts), default=0.0)


def _offset(fig: Figure, axis: Axis) -> float:
    """Height in inches of the axis' offset text (e.g. "1e−5" above a y axis), 0 without one."""
    formatter = axis.get_major_formatter()
    offset = formatter.get_offset() if hasattr(formatter, "get_offset") else ""
    size = mpl.rcParams["ytick.labelsize"]
    return text_size(fig, offset, fontsize=size)[1] + tick_room("y") if offset else 0.0


def _margins(
    fig: Figure, ax: Axes, colorbar: Axes | None, legend: Legend | None, pad: float
) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in inches that the texts around ``ax`` need."""
    x, y = ax.xaxis, ax.yaxis
    ticks_x, ticks_y = _labels(x), _labels(y)
    tall = ax.get_position().height * fig.get_size_inches()[1]
    # y labels are centred on the plot: a label longer than the plot is tall reaches past it
    reach = (extent(fig, y.label)[1] - tall) / 2
    reach_left, reach_right = _overhang(fig, ax)
    left = extent(fig, y.label)[0] + (y.labelpad / 72.0 if y.label.get_text() else 0.0)
    left += _widest(fig, ticks_y, 0) + (tick_room("y") if ticks_y else 0.0)
    bottom = extent(fig, x.label)[1] + (x.labelpad / 72.0 if x.label.get_text() else 0.0)
    bottom += _widest(fig, ticks_x, 1) + (tick_room("x") if ticks_x else 0.0)
    title = extent(fig, ax.title)[1]
    top = max(title + pad / 72.0 if title else 0.0, _offset(fig, y))
    right = 0.0
    if legend is not None:
        right = extent(fig, legend)[0] + legend.borderaxespad * points(legend.prop.get_size()) / 72
    if colorbar is not None:
        bar_y = colorbar.yaxis
        right = sum(_BAR) + tick_room("y") + _widest(fig, _labels(bar_y), 0)
        right += extent(fig, bar_y.label)[0] + bar_y.labelpad / 72.0
        top = max(top, _offset(fig, bar_y))
        reach = max(reach, (extent(fig, bar_y.label)[1] - tall) / 2)
    return (
        PAD + max(left, reach_left),
        PAD + max(bottom, reach),
        PAD + max(right, reach_right),
        PAD + max(top, reach),
    )


def frame(
    fig: Figure,
    ax: Axes,
    colorbar: Axes | None = None,
    legend: Legend | None = None,
) -> None:
    """Places the one plot of ``fig`` so that everything around it fits inside the figure: its
    title (wrapped at the figure's edges), axis labels, tick labels (turned ones too), a
    ``legend`` outside its upper right corner, or a vertical ``colorbar`` axes at its right
    (placed here too, as tall as the plot). The title must be set with ``pad=title_pad()``.

    Args:
        fig, ax: the figure and its plot, with all texts set.
        colorbar: the colour bar's axes, or None.
        legend: a legend anchored at the plot's upper right corner, outside, or None.
    """
    pad = title_pad()
    width, height = fig.get_size_inches()

    def put(margins: tuple[float, float, float, float]) -> None:
        left, bottom, right, top = margins
        place(fig, ax, left, bottom, width - left - right, height - bottom - top)
        if colorbar is not None:
            place(fig, colorbar, width - right + _BAR[0], bottom, _BAR[1], height - bottom - top)

    side = colorbar is not None or legend is not None
    margins = (0.8, 0.6, 1.3 if side else 0.3, 0.5)  # a first guess
    for _ in range(_ROUNDS):
        put(margins)
        found = _margins(fig, ax, colorbar, legend, pad)
        if all(abs(a - b) < 0.005 for a, b in zip(found, margins, strict=True)):
            return
        margins = found
    put(margins)
