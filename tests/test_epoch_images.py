"""epoch_images end to end on real engine results: every figure of an epoch has its texts whole
(inside the figure, tick labels apart), says what its marks are, and draws only what informs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import pytest
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_sens.core import BlockFI, InputFI, SensitivityResult, sensitivity
from lightning_sens.damage import predict_damage
from lightning_sens.flagging import FlagDecision
from lightning_sens.reporting import figures, keys
from lightning_sens.reporting.images import epoch_images, pictured_samples
from lightning_sens.reporting.summary import SplitScores, split_scores
from tests.test_figures import assert_apart, assert_texts_whole, drawn_texts

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")  # fmt: skip
CLOSED_FORM = "at the closed form (FI = (1 − p)/p everywhere), not drawn"
SPLITS = ("train", "val")


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[int, Figure]:
    """id of each rendered image → its figure (figure_to_image still renders it)."""
    seen: dict[int, Figure] = {}
    render = figures.figure_to_image

    def keep(fig: Figure, dpi: int = 100) -> Tensor:
        image = render(fig, dpi)
        seen[id(image)] = fig
        return image

    monkeypatch.setattr(figures, "figure_to_image", keep)
    return seen


def _model(shape: Sequence[int], k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(shape[0], 6, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, k),
    ).double()


def _scores(k: int, n: int, flagged: int) -> tuple[SplitScores, FlagDecision]:
    g = torch.Generator().manual_seed(k)
    logits = 3.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    scores = split_scores(torch.arange(n), torch.arange(n) % k, logits)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[scores.log_fi_true.argsort(descending=True)[:flagged]] = True
    rule = f"top_k={flagged}"
    return scores, FlagDecision(mask, torch.zeros(n), rule, torch.full((n,), float("nan")))


def _epoch(
    k: int,
    shape: Sequence[int],
    flagged: int,
    drawn: dict[int, Figure],
    names: Sequence[str] | None = None,
    probe: SensitivityResult | None = None,
    epochs: int = 1,
    splits: Sequence[str] = ("val",),
    evidence: Sequence[str] = (),
) -> dict[str, Figure]:
    """One epoch's figures of the splits, keyed by tag, each checked for whole texts."""
    n = max(4 * k, 40)
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(shape, k)
    if probe is None:
        probe = sensitivity(model, x[:4], torch.arange(4) % k, windows=(1, 3), input_target="pred")
    assert probe.parameters is not None
    damage = predict_damage(model, probe.parameters, bits=())
    scored = {split: _scores(k, n, flagged) for split in splits}
    scores = {split: s for split, (s, _) in scored.items()}
    decisions = {split: d for split, (_, d) in scored.items()}
    probes = {split: probe for split in splits}
    probe_ids = {split: torch.arange(4) for split in splits}
    wanted = pictured_samples(scores, decisions, probes, probe_ids, 8)
    pictures = {kind: x[ids] for kind, ids in wanted.items()}
    history = [
        {
            "epoch": float(epoch),
            keys.layer_kl_quant("val", "0", 4): 1.0,  # another family: not a row
            **{
                keys.layer_kl_noise(split, name): 0.1 * (epoch + 1) * (i + 1)
                for split in splits
                for i, name in enumerate(damage)
            },
        }
        for epoch in range(epochs)
    ]
    out = epoch_images(scores, decisions, probes, probe_ids, history, k, 8, pictures,
                       damage=dict.fromkeys(splits, damage), class_names=names,
                       evidence_splits=evidence)  # fmt: skip
    figs = {key: drawn[id(image)] for key, image in out.items()}
    for key, fig in figs.items():
        try:
            assert_texts_whole(fig)
        except AssertionError as error:
            raise AssertionError(f"{key}: {error}") from None
    return figs


def _ticks(fig: Figure, axis: str = "x") -> list[str]:
    labels = fig.axes[0].get_xticklabels() if axis == "x" else fig.axes[0].get_yticklabels()
    return [text.get_text() for text in labels]


@pytest.mark.parametrize(
    ("k", "shape", "flagged", "names"),
    [
        (2, (1, 12, 20), 0, None),
        (10, (1, 10, 10), 1, FASHION),
        (10, (3, 12, 20), 1, None),
        (100, (3, 8, 8), 25, [f"{name}_{i}" for i in range(50) for name in ("maple_tree", "ray")]),
        (100, (1, 20, 12), 60, [f"American Staffordshire terrier {i}" for i in range(100)]),
    ],
    ids=["2-none-nonsquare", "10-one-names", "10-one-rgb-wide", "100-many-names", "100-long"],
)
def test_every_figure_keeps_its_texts_whole(
    k: int,
    shape: tuple[int, ...],
    flagged: int,
    names: Sequence[str] | None,
    drawn: dict[int, Figure],
) -> None:
    splits = SPLITS if k == 2 else ("val",)  # both splits once: the tags
    figs = _epoch(k, shape, flagged, drawn, names, splits=splits)
    kinds = ("manhattan", "flagged", "layer_heatmap", "layer_strip", "fi_maps")
    assert set(figs) == {keys.image(kind, split) for kind in kinds for split in splits}
    manhattan = figs[keys.image("manhattan", "val")]
    ticks = _ticks(manhattan)
    assert len(ticks) <= 40  # 100 classes: every k-th
    expected = [str(c) for c in range(k)] if names is None else [str(n) for n in names]
    assert ticks[0] == figures._shorten(expected[0], 20)
    assert manhattan.axes[0].get_xlabel() == "class"
    samples = figs[keys.image("flagged", "val")]
    if flagged:
        assert len(samples.axes) == min(flagged, 8)
        _assert_captions_apart(samples)
    else:
        assert "no samples" in [text.get_text() for text in samples.axes[0].texts]


def test_manhattan_says_when_none_is_flagged(drawn: dict[int, Figure]) -> None:
    legend = _epoch(2, (1, 12, 20), 0, drawn)[keys.image("manhattan", "val")].axes[0].get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == []  # no red mark, no entry
    assert legend.get_title().get_text() == "none flagged (top_k=0)"
    legend = _epoch(4, (1, 8, 8), 3, drawn)[keys.image("manhattan", "val")].axes[0].get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == ["flagged (top_k=3)"]


@pytest.mark.parametrize("names", [None, FASHION])
def test_captions_name_the_classes(names: Sequence[str] | None, drawn: dict[int, Figure]) -> None:
    grid = _epoch(10, (1, 10, 10), 3, drawn, names)[keys.image("flagged", "val")]
    captions = [ax.get_xlabel() for ax in grid.axes]
    assert len(captions) == 3
    for caption in captions:
        if names is None:  # the class numbers, as before
            assert re.fullmatch(r"#\d+ y=\d ŷ=\d\nlog FI -?\d+\.\d\d", caption), caption
        else:  # e.g. "#12 log FI 2.31\ny=Shirt ŷ=T-shirt/top"
            found = re.fullmatch(r"#\d+ log FI -?\d+\.\d\d\ny=(.+) ŷ=(.+)", caption)
            assert found is not None, caption
            assert {found[1], found[2]} <= set(names), caption


def _assert_captions_apart(grid: Figure) -> None:
    """Neighbouring captions under the images do not overlap."""
    labels = {id(ax.xaxis.label) for ax in grid.axes}
    assert_apart([(t, e) for t, e in drawn_texts(grid) if id(t) in labels], "captions")


def test_long_class_names_fit_under_the_images(drawn: dict[int, Figure]) -> None:
    names = [f"American Staffordshire terrier {i}" for i in range(10)]
    grid = _epoch(10, (1, 10, 10), 8, drawn, names)[keys.image("flagged", "val")]
    assert len(grid.axes) == 8
    assert all(len(line) <= 26 for ax in grid.axes for line in ax.get_xlabel().splitlines())
    _assert_captions_apart(grid)


def test_maps_leave_out_windows_at_the_closed_form(drawn: dict[int, Figure]) -> None:
    fig = _epoch(4, (1, 12, 20), 1, drawn)[keys.image("fi_maps", "val")]  # K = 4: w = 3 is full
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "edit damage J'HJ", "FI, w = 1"]
    assert f"w = 3: {CLOSED_FORM}" in fig.get_suptitle()
    legend_text = fig.legends[0].get_texts()[0].get_text()  # the cross, explained
    assert "one-pixel-attack candidate" in legend_text


def _without(result: SensitivityResult, k: int, windows: Sequence[int]) -> SensitivityResult:
    """The result with the given windows at rank K − 1 everywhere, and no lead map."""
    assert result.input is not None
    maps = dict(result.input.maps)
    for w in windows:
        block = maps[w]
        full = torch.full_like(block.effective_rank, k - 1)
        maps[w] = BlockFI(block.fi, torch.ones_like(block.relative_fi), full)
    inputs = dataclasses.replace(result.input, maps=maps, metric_map=None)
    return dataclasses.replace(result, input=inputs)


def test_maps_with_no_informative_window_still_draw_the_images(
    drawn: dict[int, Figure],
) -> None:
    shape, k = (1, 12, 20), 4
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real = sensitivity(_model(shape, k), x, torch.arange(4) % k, windows=(1, 3))
    fig = _epoch(k, shape, 1, drawn, probe=_without(real, k, (1, 3)))[keys.image("fi_maps", "val")]
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["image"]
    assert sum(bool(ax.images) for ax in fig.axes) == 4  # the four probe samples
    assert f"w = 1, 3: {CLOSED_FORM}" in fig.get_suptitle()


def test_layer_heatmap_of_a_single_epoch(drawn: dict[int, Figure]) -> None:
    figs = _epoch(4, (1, 8, 8), 1, drawn, epochs=1)
    heat = figs[keys.image("layer_heatmap", "val")]
    assert _ticks(heat) == ["0"]
    assert _ticks(heat, "y") == ["0", "4"]  # the kl_noise layers, not the 4-bit family
    assert (heat.axes[0].get_xlabel(), heat.axes[0].get_ylabel()) == ("epoch", "layer")
    assert len(heat.axes[0].texts) == 2  # one colour alone says little: the values are printed
    heat = _epoch(4, (1, 8, 8), 1, drawn, epochs=3)[keys.image("layer_heatmap", "val")]
    assert _ticks(heat) == ["0", "1", "2"]


def _token_probe(k: int, closed: Sequence[int]) -> tuple[SensitivityResult, Tensor]:
    """A probe of 3 token sequences (T = 6, d = 4) with windows 1 and 3 (hand-built)."""
    g = torch.Generator().manual_seed(2)
    maps = {}
    for w in (1, 3):
        fi = torch.rand(3, 6, 4, generator=g, dtype=torch.float64)
        rank = torch.full((3, 6, 4), k - 1 if w in closed else 1)
        maps[w] = BlockFI(fi, fi / fi.max(), rank)
    whole = BlockFI(torch.rand(3, dtype=torch.float64), torch.ones(3), torch.full((3,), k - 1))
    inputs = InputFI(whole, maps, None, source="output of 'embed'")
    p = torch.full((3,), 0.5, dtype=torch.float64)
    result = SensitivityResult(torch.zeros(3, dtype=torch.long), p, p.log(), inputs, None)
    return result, torch.randint(5, 100, (3, 6), generator=g)


@pytest.mark.parametrize("closed", [(3,), (1, 3)])
def test_token_figure_names_the_closed_form_windows(
    closed: tuple[int, ...], drawn: dict[int, Figure]
) -> None:
    k = 4
    result, tokens = _token_probe(k, closed)
    scores, decision = _scores(k, 40, 0)
    out = epoch_images({"val": scores}, {"val": decision}, {"val": result},
                       {"val": torch.arange(3)}, [{"epoch": 0.0}], k, 8,
                       {("maps", "val"): tokens})  # fmt: skip
    assert set(out) == {keys.image(name, "val") for name in ("manhattan", "flagged", "fi_maps")}
    fig = drawn[id(out[keys.image("fi_maps", "val")])]
    assert_texts_whole(fig)
    assert f"w = {', '.join(map(str, closed))}: {CLOSED_FORM}" in fig.get_suptitle()
    if closed == (3,):  # the strips of w = 1 only
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["w = 1"]
    else:  # no strip at all: the tokens as text
        text = [t.get_text() for t in fig.axes[0].texts]
        assert any(line.startswith("tokens: ") for line in text)


def test_class_names_must_name_every_class(drawn: dict[int, Figure]) -> None:
    with pytest.raises(ValueError, match="class_names must hold 10 names"):
        _epoch(10, (1, 8, 8), 0, drawn, FASHION[:3])


def test_training_flags_are_pictured_by_their_evidence(drawn: dict[int, Figure]) -> None:
    """A split flagged by its evidence over the training steps says so in the Manhattan title
    and the captions; other splits show this epoch's log FI."""
    figs = _epoch(4, (1, 8, 8), 3, drawn, splits=SPLITS, evidence=("train",))
    titles = {split: figs[keys.image("manhattan", split)].axes[0].get_title() for split in SPLITS}
    assert "mean log FI with the true label over the training steps" in titles["train"]
    assert "mean log FI" not in titles["val"]
    captions = [ax.get_xlabel() for ax in figs[keys.image("flagged", "train")].axes]
    assert captions
    assert all("mean log FI" in caption for caption in captions), captions
    assert not any("mean" in ax.get_xlabel() for ax in figs[keys.image("flagged", "val")].axes)


def test_grey_maps_do_not_claim_a_maximum_over_channels(drawn: dict[int, Figure]) -> None:
    grey = _epoch(4, (1, 8, 8), 3, drawn)[keys.image("fi_maps", "val")]
    rgb = _epoch(4, (3, 8, 8), 3, drawn)[keys.image("fi_maps", "val")]
    assert not any("max over channels" in ax.get_xlabel() for ax in grey.axes)
    assert any("max over channels" in ax.get_xlabel() for ax in rgb.axes)
