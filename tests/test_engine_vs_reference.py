"""The fast engine against the float64 brute-force reference, over a table of architectures."""

from __future__ import annotations

import pytest
import torch

from lightning_sens import reference, sensitivity
from tests.checks import assert_close as _assert_close
from tests.checks import assert_equal as _assert_equal
from tests.models import CASES, Case, build


def _windows(case: Case) -> tuple[int, ...]:
    x = case.inputs(1)
    if not x.is_floating_point():  # token ids: windows of consecutive tokens
        return tuple(w for w in (1, 3, 5) if w <= x.shape[1])
    return tuple(w for w in (1, 3, 5, 7) if x.dim() == 4 and w <= min(x.shape[-2:]))


@pytest.mark.parametrize("target_kind", ["label", "pred"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_matches_reference(case: Case, target_kind: str) -> None:
    model, x, labels = build(case)
    target = labels if target_kind == "label" else "pred"
    windows = _windows(case)
    got = sensitivity(model, x, target, windows=windows, channel_metric=True)

    # token ids are perturbed at the output of the embedding that reads them
    embedding = None if x.is_floating_point() else "embed"
    want = reference.input_fi(model, x, target, windows=windows, input_module=embedding)
    if True:
        assert got.input is not None
        _assert_close("whole-input fi", got.input.whole.fi, want["fi"])
        _assert_equal("whole-input rank", got.input.whole.effective_rank, want["rank"])
        _assert_close("whole-input relative fi", got.input.whole.relative_fi, want["relative_fi"])
        _assert_close("p_target", got.p_target, want["p_target"])
        assert got.input.metric_map is not None
        assert got.input.gradient is not None
        _assert_close("input metric diagonal", got.input.metric_map, want["metric_map"])
        _assert_close("input gradient", got.input.gradient, want["gradient"])
        assert set(got.input.maps) == set(windows)
        for w in windows:
            _assert_close(f"map w={w}", got.input.maps[w].fi, want["maps"][w])
            _assert_equal(f"map rank w={w}", got.input.maps[w].effective_rank, want["map_ranks"][w])
        if windows:
            assert got.input.position_map is not None
            _assert_close("position map", got.input.position_map.fi, want["position_map"])
            _assert_equal(
                "position map rank",
                got.input.position_map.effective_rank,
                want["position_map_rank"],
            )

    want_layers = reference.parameter_fi(model, x, target)
    assert got.parameters is not None
    assert set(got.parameters.layers) == set(want_layers) - {"__all__"}
    for name, layer in got.parameters.layers.items():
        want = want_layers[name]
        _assert_close(f"{name} fi", layer.parameters.fi, want["fi"])
        _assert_equal(f"{name} rank", layer.parameters.effective_rank, want["rank"])
        _assert_close(f"{name} scale fi", layer.scale.fi, want["scale_fi"])
        _assert_close(f"{name} metric", layer.metric, want["metric"])
        _assert_close(f"{name} scale metric", layer.scale_metric, want["scale_metric"])
        if want["weight_channel_metric"] is None:
            assert layer.weight_channel_metric is None, name
        else:
            assert layer.weight_channel_metric is not None, name
            _assert_close(
                f"{name} weight channel metric",
                layer.weight_channel_metric,
                want["weight_channel_metric"],
            )
        if want["channel_scale_fi"] is None:
            assert layer.channel_scale is None, name
        else:
            assert layer.channel_scale is not None, name
            _assert_close(
                f"{name} channel scale fi", layer.channel_scale.fi, want["channel_scale_fi"]
            )
            _assert_equal(
                f"{name} channel rank",
                layer.channel_scale.effective_rank,
                want["channel_scale_rank"],
            )
    _assert_close(
        "all parameters fi", got.parameters.all_parameters.fi, want_layers["__all__"]["fi"]
    )
    _assert_equal(
        "all parameters rank",
        got.parameters.all_parameters.effective_rank,
        want_layers["__all__"]["rank"],
    )


def test_every_supported_layer_avoids_the_fallback() -> None:
    """Linear, Conv1d/2d (grouped, depthwise), norms and Embedding use their Gram formulas."""
    methods = {}
    for case in CASES:
        model, x, labels = build(case)
        result = sensitivity(model, x, labels, input_maps=False)
        assert result.parameters is not None
        for name, layer in result.parameters.layers.items():
            module = model.get_submodule(name)
            methods[(case.name, type(module).__name__)] = layer.method
    fallback = {key for key, method in methods.items() if method == "jacobian"}
    assert fallback == {("custom", "Affine"), ("custom", "PReLU")}, methods


def test_ghost_and_direct_routes_agree_with_reference() -> None:
    """A conv layer on a small image takes the ghost route (2T² ≤ p·d); it must stay exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 9, 5),
    ).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    got = sensitivity(model, x, "pred", input_maps=False)
    assert got.parameters is not None
    assert got.parameters.layers["0"].method == "ghost"
    want = reference.parameter_fi(model, x, "pred")
    _assert_close("ghost conv fi", got.parameters.layers["0"].parameters.fi, want["0"]["fi"])
    _assert_close("ghost conv scale fi", got.parameters.layers["0"].scale.fi, want["0"]["scale_fi"])


def test_partially_frozen_layer_matches_reference() -> None:
    """A layer whose bias is frozen: the block is the weight alone; scaling goes the generic way."""
    model, x, labels = build(CASES[1])
    model[0].bias.requires_grad_(False)
    got = sensitivity(model, x, labels, input_maps=False)
    want = reference.parameter_fi(model, x, labels)
    assert got.parameters is not None
    layer = got.parameters.layers["0"]
    _assert_close("frozen-bias fi", layer.parameters.fi, want["0"]["fi"])
    _assert_close("frozen-bias scale fi", layer.scale.fi, want["0"]["scale_fi"])


@pytest.mark.parametrize("backward", ["batched", "loop"])
def test_backward_methods_agree(backward: str) -> None:
    model, x, labels = build(CASES[2])
    got = sensitivity(model, x, labels, windows=(1, 3), backward=backward)  # type: ignore[arg-type]
    want = reference.input_fi(model, x, labels, windows=(1, 3))
    assert got.input is not None
    _assert_close(f"{backward} whole", got.input.whole.fi, want["fi"])
    _assert_close(f"{backward} map", got.input.maps[3].fi, want["maps"][3])
