"""Pictures of lightning_sens.reporting.figures: they render, are not blank, reject bad input,
and every text is whole (inside the figure) and readable (tick labels do not overlap)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from lightning_sens.reporting.figures import (
    fi_overlays,
    figure_to_image,
    layer_heatmap,
    layer_strip_plot,
    manhattan_plot,
    sample_grid,
)
from lightning_sens.reporting.sequences import sample_text, token_strips


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def drawn_texts(fig: Figure) -> list[tuple[Text, Bbox]]:
    """Every non-empty text the Agg canvas draws (titles, labels, tick labels of ticks in view,
    legends, colour bars, figure texts), with its extent in pixels."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    outside: set[int] = set()  # labels of ticks outside the view are not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * (abs(low) + abs(high) + 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - slack <= tick.get_loc() <= high + slack:
                    outside |= {id(tick.label1), id(tick.label2)}
    return [
        (text, text.get_window_extent(renderer))
        for text in fig.findobj(Text)
        if id(text) not in outside and text.get_visible() and text.get_text().strip()
    ]


def assert_texts_whole(fig: Figure) -> list[str]:
    """Every drawn text lies inside the figure (one pixel of slack), so that nothing is cut off,
    the drawn tick labels of each axis do not overlap one another, and no text overlaps another
    text or an axes it does not belong to (:func:`assert_nothing_overlaps`). Returns the texts."""
    texts = drawn_texts(fig)
    box = fig.bbox
    cut = [
        (text.get_text(), tuple(round(v) for v in extent.extents))
        for text, extent in texts
        if extent.x0 < box.x0 - 1
        or extent.y0 < box.y0 - 1
        or extent.x1 > box.x1 + 1
        or extent.y1 > box.y1 + 1
    ]
    assert not cut, (
        f"texts cut at the edges of the {box.width:.0f} × {box.height:.0f} figure: {cut}"
    )
    extents = {id(text): extent for text, extent in texts}
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if id(t) in extents]
            assert_apart([(t, extents[id(t)]) for t in labels], "tick labels")
    assert_nothing_overlaps(fig, texts)
    return [text.get_text() for text, _ in texts]


def assert_nothing_overlaps(fig: Figure, texts: list[tuple[Text, Bbox]]) -> None:
    """No two drawn texts overlap (by their extents, half a pixel of slack), and no text but an
    axes' own annotations (``ax.texts``, e.g. a heat map's cell values) overlaps a drawn axes:
    titles, captions, labels, legends and colour bars keep apart from one another and from
    the pictures. Tick labels of one axis are compared by :func:`assert_apart` instead (their
    extents overlap when they are turned, the texts need not)."""
    ticks: dict[int, int] = {}  # tick label -> its axis
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks.update((id(t), id(axis)) for t in axis.get_ticklabels(which="both"))
    boxes = np.array([extent.extents for _, extent in texts]).reshape(-1, 4)
    apart = np.maximum(
        np.maximum(boxes[:, None, 0], boxes[None, :, 0])
        - np.minimum(boxes[:, None, 2], boxes[None, :, 2]),
        np.maximum(boxes[:, None, 1], boxes[None, :, 1])
        - np.minimum(boxes[:, None, 3], boxes[None, :, 3]),
    )
    axis_of = [ticks.get(id(text)) for text, _ in texts]
    clashes = [
        (texts[i][0].get_text(), texts[j][0].get_text())
        for i, j in zip(*np.nonzero(np.triu(apart < -0.5, k=1)), strict=True)
        if axis_of[i] is None or axis_of[i] != axis_of[j]
    ]
    assert not clashes, f"texts overlap: {clashes[:5]}"
    annotations = {id(text) for ax in fig.axes for text in ax.texts}
    for ax in fig.axes:
        if not (ax.get_visible() and ax.axison):
            continue
        box = ax.get_window_extent()
        inside = [
            text.get_text()
            for text, extent in texts
            if id(text) not in annotations
            and min(extent.x1, box.x1) - max(extent.x0, box.x0) > 0.5
            and min(extent.y1, box.y1) - max(extent.y0, box.y0) > 0.5
        ]
        assert not inside, (
            f"texts over an axes at {tuple(round(v) for v in box.extents)}: {inside[:5]}"
        )


def assert_apart(texts: list[tuple[Text, Bbox]], what: str) -> None:
    """No two of the drawn texts overlap (they may touch). Texts turned by the same angle are
    compared in their own frame (centre of the extent, unturned size), not by their extents."""
    shapes = []
    for text, extent in texts:
        angle = text.get_rotation()
        text.set_rotation(0.0)
        flat = text.get_window_extent()  # the renderer of the last draw
        text.set_rotation(angle)
        shapes.append((text, extent, flat.width, flat.height, math.radians(angle)))
    for (a, box_a, w_a, h_a, t_a), (b, box_b, w_b, h_b, t_b) in itertools.combinations(shapes, 2):
        if t_a == t_b:  # the offset of the centres along and across the texts
            dx, dy = (
                (box_b.x0 + box_b.x1 - box_a.x0 - box_a.x1) / 2,
                (box_b.y0 + box_b.y1 - box_a.y0 - box_a.y1) / 2,
            )
            along = abs(dx * math.cos(t_a) + dy * math.sin(t_a))
            across = abs(-dx * math.sin(t_a) + dy * math.cos(t_a))
            gaps = (along - (w_a + w_b) / 2, across - (h_a + h_b) / 2)
        else:
            gaps = (max(box_a.x0, box_b.x0) - min(box_a.x1, box_b.x1),
                    max(box_a.y0, box_b.y0) - min(box_a.y1, box_b.y1))  # fmt: skip
        assert max(gaps) >= -0.5, f"{what} overlap: {a.get_text()!r}, {b.get_text()!r}"


def _assert_renders(fig: Figure) -> torch.Tensor:
    assert isinstance(fig, Figure)
    image = figure_to_image(fig)
    assert image.dtype == torch.uint8
    assert image.ndim == 3
    assert image.shape[0] == 3
    assert image.shape[1] > 100
    assert image.shape[2] > 100
    assert image.min() < image.max(), "the rendered image is constant"
    assert_texts_whole(fig)
    return image


def _manhattan_inputs(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator()
    return torch.randn(n, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_figure_to_image_follows_dpi() -> None:
    fig = Figure(figsize=(3.0, 2.0))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    assert tuple(figure_to_image(fig, dpi=50).shape) == (3, 100, 150)
    assert tuple(figure_to_image(fig, dpi=100).shape) == (3, 200, 300)
    assert fig.dpi == Figure(figsize=(3.0, 2.0)).dpi  # dpi restored


def test_figure_to_image_rejects_bad_dpi() -> None:
    with pytest.raises(ValueError, match="dpi"):
        figure_to_image(Figure(), dpi=0)


def test_the_text_check_finds_overlaps() -> None:
    """assert_texts_whole fails on two texts on top of each other and on a text over an axes it
    does not belong to; a plot's own annotations may lie on it."""
    fig = Figure(figsize=(4.0, 3.0))
    fig.subplots_adjust(left=0.2, bottom=0.2, top=0.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("a title")
    ax.text(0.5, 0.5, "a note on the plot", transform=ax.transAxes)
    assert "a note on the plot" in assert_texts_whole(fig)
    fig.text(0.5, 0.6, "a caption over the plot")
    with pytest.raises(AssertionError, match="texts over an axes"):
        assert_texts_whole(fig)
    fig.texts.clear()
    fig.text(0.05, 0.9, "one")
    fig.text(0.06, 0.9, "two")
    with pytest.raises(AssertionError, match="texts overlap"):
        assert_texts_whole(fig)


def test_manhattan_plot_renders_with_flagged_legend() -> None:
    log_fi, labels = _manhattan_inputs()
    log_fi[0] = float("-inf")  # FI = 0 is dropped, not an error
    flagged = log_fi > 1.0
    names = ["zero", "one", "two", "three", "four"]
    fig = manhattan_plot(log_fi, labels, 5, flagged=flagged, title="t", class_names=names)
    _assert_renders(fig)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert "flagged" in [text.get_text() for text in legend.get_texts()]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names


def test_manhattan_plot_accepts_any_dtype_and_is_deterministic() -> None:
    log_fi, labels = _manhattan_inputs()
    first = _assert_renders(manhattan_plot(log_fi.float(), labels.int(), 5))
    second = _assert_renders(manhattan_plot(log_fi.double(), labels, 5))
    assert torch.equal(first, second)
    assert manhattan_plot(log_fi, labels, 5).axes[0].get_legend() is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_fi": torch.zeros(4, 2)}, "log_fi"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(6)}, "labels"),
        ({"labels": torch.full((6,), 7)}, "labels"),
        ({"flagged": torch.zeros(5, dtype=torch.bool)}, "flagged"),
        ({"flagged": torch.zeros(6)}, "flagged"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_manhattan_plot_validates(kwargs: dict[str, object], name: str) -> None:
    arguments: dict[str, object] = {
        "log_fi": torch.zeros(6),
        "labels": torch.zeros(6, dtype=torch.long),
        "num_classes": 3,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        manhattan_plot(**arguments)  # type: ignore[arg-type]


def test_manhattan_plot_error_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\), got \(5,\)"):
        manhattan_plot(torch.zeros(6), torch.zeros(5, dtype=torch.long), 3)


def test_layer_heatmap_renders_with_nan_and_colorbar() -> None:
    values = torch.randn(4, 6, generator=_generator())
    values[1, 2] = float("nan")
    names = ["conv1", "layer1.0.conv1", "a" * 80, "fc"]
    fig = layer_heatmap(values, names, [0, 1, 2, 3, 4, 5], title="heat", value_label="v")
    _assert_renders(fig)
    assert len(fig.axes) == 2  # heat map and colorbar
    assert fig.axes[1].get_ylabel() == "v"
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert max(len(label) for label in labels) <= 30


def test_layer_heatmap_many_layers_caps_size_and_thins_labels() -> None:
    values = torch.randn(200, 3, generator=_generator(), dtype=torch.float32)
    fig = layer_heatmap(values, [f"layer{i}" for i in range(200)], [1, 2, 3])
    assert fig.get_size_inches()[1] <= 16.0
    assert len(fig.axes[0].get_yticks()) < 200
    _assert_renders(fig)


def test_layer_heatmap_all_nan_renders() -> None:
    _assert_renders(layer_heatmap(torch.full((2, 2), float("nan")), ["a", "b"], [0, 1]))


@pytest.mark.parametrize(
    ("values", "names", "epochs", "match"),
    [
        (torch.zeros(3), ["a", "b", "c"], [0], "values"),
        (torch.zeros(2, 3), ["a"], [0, 1, 2], "layer_names"),
        (torch.zeros(2, 3), ["a", "b"], [0, 1], "epochs"),
        (torch.zeros(0, 3), [], [0, 1, 2], "values"),
    ],
)
def test_layer_heatmap_validates(
    values: torch.Tensor, names: list[str], epochs: list[int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        layer_heatmap(values, names, epochs)


def test_layer_strip_plot_renders_with_non_finite_values() -> None:
    values = torch.randn(6, 30, generator=_generator())
    values[0, :3] = float("-inf")
    values[2, 5] = float("nan")
    values[5] = float("-inf")  # a layer with no finite value at all
    fig = layer_strip_plot(values, [f"block{i}.conv" for i in range(6)], title="strip")
    _assert_renders(fig)
    assert fig.axes[0].get_ylabel() == "log FI"


def test_layer_strip_plot_many_layers_thins_labels() -> None:
    values = torch.randn(150, 8, generator=_generator())
    fig = layer_strip_plot(values, [f"model.layer{i}.weight" for i in range(150)])
    assert len(fig.axes[0].get_xticks()) < 150
    _assert_renders(fig)


@pytest.mark.parametrize(
    ("values", "names", "match"),
    [
        (torch.zeros(4), ["a"] * 4, "values"),
        (torch.zeros(2, 4), ["a"], "layer_names"),
    ],
)
def test_layer_strip_plot_validates(values: torch.Tensor, names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer_strip_plot(values, names)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_sample_grid_renders(channels: int) -> None:
    images = torch.rand(5, channels, 12, 12, generator=_generator())
    images[1] = 0.5  # a constant image must not divide by zero
    fig = sample_grid(images, [f"#{i}" for i in range(5)], title="grid", columns=3)
    _assert_renders(fig)
    assert len(fig.axes) == 5


def test_sample_grid_empty() -> None:
    fig = sample_grid(torch.zeros(0, 3, 8, 8), [])
    _assert_renders(fig)
    assert "no samples" in [text.get_text() for text in fig.texts]


@pytest.mark.parametrize(
    ("images", "captions", "columns", "match"),
    [
        (torch.zeros(2, 8, 8), ["a", "b"], 8, "images"),
        (torch.zeros(2, 1, 8, 8), ["a"], 8, "captions"),
        (torch.zeros(2, 1, 8, 8), ["a", "b"], 0, "columns"),
    ],
)
def test_sample_grid_validates(
    images: torch.Tensor, captions: list[str], columns: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        sample_grid(images, captions, columns=columns)


def _overlay_inputs() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    g = _generator()
    images = torch.rand(2, 3, 10, 10, generator=g)
    maps = {w: torch.rand(2, 10, 10, generator=g) * w for w in (5, 1, 3)}
    maps[1][0, 4, 7] = 100.0  # the top pixel of the smallest window
    maps[3][1] = 0.0  # FI = 0 everywhere: transparent, no error
    return images, maps


def test_fi_overlays_renders_columns_sorted_and_marks_top_pixel() -> None:
    images, maps = _overlay_inputs()
    fig = fi_overlays(images, maps, ["first", "second"], title="maps")
    _assert_renders(fig)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "FI, w = 1", "FI, w = 3", "FI, w = 5"]
    assert any(ax.get_xlabel() == "FI (log scale)" for ax in fig.axes)  # colorbars
    cross = fig.axes[0].get_lines()[0]
    assert (np.asarray(cross.get_xdata()).item(), np.asarray(cross.get_ydata()).item()) == (7, 4)


def test_fi_overlays_lead_map_comes_first_and_carries_the_cross() -> None:
    images, maps = _overlay_inputs()
    metric = torch.rand(2, 10, 10, generator=_generator())
    metric[0, 2, 3] = 50.0
    fig = fi_overlays(images, maps, ["a", "b"], "t", ("edit damage", "KL per unit²", metric))
    _assert_renders(fig)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "edit damage", "FI, w = 1", "FI, w = 3", "FI, w = 5"]
    assert any(ax.get_xlabel() == "KL per unit²" for ax in fig.axes)
    cross = fig.axes[0].get_lines()[0]  # the lead map's top pixel, not the 1 × 1 FI map's
    assert (np.asarray(cross.get_xdata()).item(), np.asarray(cross.get_ydata()).item()) == (3, 2)
    assert fig.axes[1].get_lines()  # marked on the lead column too
    with pytest.raises(ValueError, match="lead map"):
        fi_overlays(images, maps, ["a", "b"], "t", ("x", "y", metric[:, :5]))


def test_fi_overlays_grey_images_and_no_maps() -> None:
    images = torch.rand(2, 1, 10, 10, generator=_generator())
    _assert_renders(fi_overlays(images, {}, ["a", "b"]))
    maps = {3: torch.full((2, 10, 10), float("-inf"))}
    _assert_renders(fi_overlays(images, maps, ["a", "b"]))


@pytest.mark.parametrize(
    ("maps", "captions", "match"),
    [
        ({1: torch.zeros(2, 9, 10)}, ["a", "b"], r"maps\[1\]"),
        ({1: torch.zeros(3, 10, 10)}, ["a", "b"], r"maps\[1\]"),
        ({1: torch.zeros(2, 10, 10)}, ["a"], "captions"),
        ({0: torch.zeros(2, 10, 10)}, ["a", "b"], "maps"),
    ],
)
def test_fi_overlays_validates(
    maps: dict[int, torch.Tensor], captions: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fi_overlays(torch.zeros(2, 3, 10, 10), maps, captions)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_sample_text_for_samples_that_are_not_images(n: int) -> None:
    lines = [f"token ids: {' '.join(str(t) for t in range(3 * i + 1))}" for i in range(n)]
    lines[-1:] = ["x" * 300] if n else []  # cut, not overflowing
    _assert_renders(sample_text(lines, [f"#{i} y=0 ŷ=1" for i in range(n)], title="flagged"))
    with pytest.raises(ValueError, match="captions must have length"):
        sample_text(["a"], [], title="t")


@pytest.mark.parametrize("n", [1, 3])
def test_token_strips_blank_where_fi_is_zero(n: int) -> None:
    g = _generator()
    maps = {w: torch.rand(n, 7, generator=g).exp() for w in (1, 3, 5)}
    maps[1][0, -2:] = 0.0  # padding
    tokens = [[str(t) for t in range(7)] for _ in range(n)]
    image = _assert_renders(token_strips(maps, tokens, [f"#{i}" for i in range(n)], title="t"))
    assert image.shape[2] >= 600  # wide enough for the title and the colour bar
    with pytest.raises(ValueError, match=r"maps\[3\] must have shape"):
        token_strips({1: maps[1], 3: maps[3][:, :5]}, tokens, ["#"] * n)
    with pytest.raises(ValueError, match="at least one window"):
        token_strips({}, tokens, ["#"] * n)


# -- whole texts and readable labels in the edge cases (issue 11) ------------------------------

_FLAGGED_TITLE = "val: flagged samples, highest FI first"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 40)])
def test_sample_grid_one_sample_keeps_the_whole_title(shape: tuple[int, int, int]) -> None:
    images = torch.rand(1, *shape, generator=_generator())
    fig = sample_grid(images, ["#7 log FI 2.00\ny=T-shirt/top ŷ=Shirt"], title=_FLAGGED_TITLE)
    _assert_renders(fig)  # the title used to be cut to "agged samples, highes"
    assert fig.get_suptitle() == _FLAGGED_TITLE


@pytest.mark.parametrize("n", [0, 1])
def test_sample_text_keeps_a_long_title_whole(n: int) -> None:
    title = "val: flagged samples, highest FI first; " * 3
    _assert_renders(sample_text(["token ids: 1 2 3"] * n, ["#1 y=0 ŷ=1"] * n, title=title))


def test_manhattan_plot_says_none_flagged_without_a_legend_entry() -> None:
    log_fi, labels = _manhattan_inputs()
    fig = manhattan_plot(log_fi, labels, 5, flagged=torch.zeros(60, dtype=torch.bool))
    _assert_renders(fig)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == []  # no mark, no entry
    assert legend.get_title().get_text() == "none flagged"
    assert fig.axes[0].get_xlabel() == "class"  # the shades alternate by class


def test_manhattan_plot_names_the_rule_and_flags_it_cannot_draw() -> None:
    log_fi, labels = _manhattan_inputs()
    flagged = log_fi > 1.0
    fig = manhattan_plot(log_fi, labels, 5, flagged, flag_label="flagged (mad>3.5)")
    _assert_renders(fig)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["flagged (mad>3.5)"]
    log_fi[flagged] = float("inf")  # flagged, but not drawable
    legend = manhattan_plot(log_fi, labels, 5, flagged, flag_label="flagged").axes[0].get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == []
    assert "non-finite" in legend.get_title().get_text()


@pytest.mark.parametrize(
    "names",
    [
        ["T-shirt/top", "Trouser"],
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"] * 2,
        [f"{name}_{i}" for i in range(40) for name in ("aquarium_fish", "sweet_pepper")],
        [f"American Staffordshire terrier {i}" for i in range(100)],
    ],
    ids=["2", "10", "80", "100-long"],
)
def test_manhattan_plot_class_names_fit_and_do_not_overlap(names: list[str]) -> None:
    k = len(names)
    g = _generator()
    log_fi, labels = torch.randn(4 * k, generator=g), torch.arange(4 * k) % k
    fig = manhattan_plot(log_fi, labels, k, log_fi > 1.5, "t", names)
    _assert_renders(fig)  # inside the figure, tick labels apart
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    first = names[0]  # long names are shortened in the middle
    assert shown[0] == first or (len(first) > 20 and shown[0] == first[:9] + "…" + first[-10:])
    assert len(shown) <= 40
    assert max(len(label) for label in shown) <= 20


def test_layer_heatmap_names_its_axes() -> None:
    values = torch.randn(2, 8, generator=_generator())
    fig = layer_heatmap(values, ["train", "test"], [75, 80, 85, 90, 95, 98, 99, 100], "Setup 3",
                        "log FI", xlabel="quantile (%)", ylabel="split")  # fmt: skip
    _assert_renders(fig)
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("quantile (%)", "split")
    default = layer_heatmap(values, ["a", "b"], list(range(8)))
    assert (default.axes[0].get_xlabel(), default.axes[0].get_ylabel()) == ("epoch", "layer")


@pytest.mark.parametrize("n_layers", [1, 3, 200])
def test_layer_heatmap_single_epoch(n_layers: int) -> None:
    values = torch.randn(n_layers, 1, generator=_generator())
    names = [f"layer{i}.conv" for i in range(n_layers)]
    title = "val: expected KL under weight noise 0.1 × rms, per layer and epoch"
    fig = layer_heatmap(values, names, [3], title, value_label="log10 expected KL (nats)")
    _assert_renders(fig)  # the monitor's long title used to be cut at 5 inches
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3"]
    cells = [text.get_text() for text in fig.axes[0].texts]
    if n_layers <= 20:  # one colour alone says little: the values are printed
        assert cells == [f"{v:.3g}" for v in values[:, 0].tolist()]


def test_fi_overlays_explain_the_cross() -> None:
    images, maps = _overlay_inputs()
    fig = fi_overlays(images, maps, ["first", "second"], title="maps")
    _assert_renders(fig)
    (legend,) = fig.legends
    text = legend.get_texts()[0].get_text()
    assert "FI, w = 1" in text
    assert "one-pixel-attack candidate" in text
    assert legend.legend_handles[0].get_marker() == "x"  # type: ignore[union-attr]
    assert not fi_overlays(images, {}, ["a", "b"]).legends  # no cross drawn: no legend


@pytest.mark.parametrize("n", [1, 8])
def test_fi_overlays_keep_colour_bar_labels_whole(n: int) -> None:
    g = _generator()
    images = torch.rand(n, 3, 28, 28, generator=g)
    maps = {w: torch.rand(n, 28, 28, generator=g) for w in (1, 3, 5, 7)}
    lead = ("edit damage J'HJ", "KL per unit² edit (log scale)", maps[3])
    fig = fi_overlays(images, maps, [f"#{i}" for i in range(n)], "val probe: maps", lead)
    texts = assert_texts_whole(fig)  # the colour-bar labels were cut from 8 rows on
    assert texts.count("FI (log scale)") == 4
    assert "KL per unit² edit (log scale)" in texts


def test_fi_overlays_non_square_images() -> None:
    g = _generator()
    images = torch.rand(2, 1, 28, 40, generator=g)
    maps = {w: torch.rand(2, 28, 40, generator=g) for w in (1, 3)}
    maps[1][0, 3, 30] = 50.0  # row 3, column 30
    fig = fi_overlays(images, maps, ["a", "b"], "a title as long as the monitor's, or longer " * 2)
    _assert_renders(fig)
    cross = fig.axes[0].get_lines()[0]
    assert (np.asarray(cross.get_xdata()).item(), np.asarray(cross.get_ydata()).item()) == (30, 3)
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown is not None
    assert shown.shape == (28, 40)


def test_token_strips_long_sequences_thin_their_labels() -> None:
    maps = {w: torch.rand(2, 200, generator=_generator()) + 0.1 for w in (1, 3)}
    tokens = [[f"tok{t}" for t in range(200)] for _ in range(2)]
    fig = token_strips(maps, tokens, ["#1", "#2"], title="val probe: FI per token")
    _assert_renders(fig)  # every token labelled in 16 inches: the labels overlapped
    assert len(fig.axes[0].get_xticklabels()) < 200
