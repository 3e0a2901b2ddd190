"""The fast engine against the float64 brute-force reference, over a table of architectures."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from lightning_sens import (
    BlockFI,
    InputFI,
    LayerFI,
    ParameterFI,
    SensitivityResult,
    closed_form_fi,
    reference,
    sensitivity,
)
from tests.checks import NOT_IN_REFERENCE, assert_same_fields
from tests.checks import assert_close as _assert_close
from tests.checks import assert_equal as _assert_equal
from tests.models import CASES, Case, build


def _windows(case: Case) -> tuple[int, ...]:
    x = case.inputs(1)
    if not x.is_floating_point():  # token ids: windows of consecutive tokens
        return tuple(w for w in (1, 3, 5) if w <= x.shape[1])
    return tuple(w for w in (1, 3, 5, 7) if x.dim() == 4 and w <= min(x.shape[-2:]))


@functools.cache
def _both(case_name: str, target_kind: str) -> tuple[SensitivityResult, SensitivityResult]:
    """The engine's and the reference's results for one case (shared by the tests below)."""
    case = next(c for c in CASES if c.name == case_name)
    model, x, labels = build(case)
    target = labels if target_kind == "label" else "pred"
    windows = _windows(case)
    got = sensitivity(model, x, target, windows=windows, channel_metric=True)
    # token ids are perturbed at the output of the embedding that reads them
    embedding = None if x.is_floating_point() else "embed"
    want = reference.sensitivity(model, x, target, windows=windows, input_module=embedding)
    return got, want


@pytest.mark.parametrize("target_kind", ["label", "pred"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_matches_reference(case: Case, target_kind: str) -> None:
    got, ref = _both(case.name, target_kind)
    windows = _windows(case)
    assert got.input is not None
    assert ref.input is not None
    want = ref.input
    _assert_close("whole-input fi", got.input.whole.fi, want.whole.fi)
    _assert_equal("whole-input rank", got.input.whole.effective_rank, want.whole.effective_rank)
    _assert_close("whole-input relative fi", got.input.whole.relative_fi, want.whole.relative_fi)
    _assert_close("p_target", got.p_target, ref.p_target)
    assert got.input.metric_map is not None
    assert got.input.gradient is not None
    assert want.metric_map is not None
    assert want.gradient is not None
    _assert_close("input metric diagonal", got.input.metric_map, want.metric_map)
    _assert_close("input gradient", got.input.gradient, want.gradient)
    assert set(got.input.maps) == set(windows)
    for w in windows:
        _assert_close(f"map w={w}", got.input.maps[w].fi, want.maps[w].fi)
        _assert_equal(
            f"map rank w={w}", got.input.maps[w].effective_rank, want.maps[w].effective_rank
        )
    if windows:
        assert got.input.position_map is not None
        assert want.position_map is not None
        _assert_close("position map", got.input.position_map.fi, want.position_map.fi)
        _assert_equal(
            "position map rank",
            got.input.position_map.effective_rank,
            want.position_map.effective_rank,
        )

    assert got.parameters is not None
    assert ref.parameters is not None
    want_layers = ref.parameters.layers
    assert set(got.parameters.layers) == set(want_layers)
    for name, layer in got.parameters.layers.items():
        want_layer = want_layers[name]
        _assert_close(f"{name} fi", layer.parameters.fi, want_layer.parameters.fi)
        _assert_equal(
            f"{name} rank", layer.parameters.effective_rank, want_layer.parameters.effective_rank
        )
        _assert_close(f"{name} scale fi", layer.scale.fi, want_layer.scale.fi)
        _assert_close(f"{name} metric", layer.metric, want_layer.metric)
        _assert_close(f"{name} scale metric", layer.scale_metric, want_layer.scale_metric)
        if want_layer.weight_channel_metric is None:
            assert layer.weight_channel_metric is None, name
        else:
            assert layer.weight_channel_metric is not None, name
            _assert_close(
                f"{name} weight channel metric",
                layer.weight_channel_metric,
                want_layer.weight_channel_metric,
            )
        if want_layer.channel_scale is None:
            assert layer.channel_scale is None, name
        else:
            assert layer.channel_scale is not None, name
            _assert_close(
                f"{name} channel scale fi", layer.channel_scale.fi, want_layer.channel_scale.fi
            )
            _assert_equal(
                f"{name} channel rank",
                layer.channel_scale.effective_rank,
                want_layer.channel_scale.effective_rank,
            )
    _assert_close("all parameters fi", got.parameters.whole.fi, ref.parameters.whole.fi)
    _assert_equal(
        "all parameters rank",
        got.parameters.whole.effective_rank,
        ref.parameters.whole.effective_rank,
    )


@pytest.mark.parametrize("target_kind", ["label", "pred"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_matches_reference_field_by_field(case: Case, target_kind: str) -> None:
    """Every field of every result type, walked with dataclasses.fields(): a field added to
    SensitivityResult, InputFI, ParameterFI, LayerFI or BlockFI is compared as soon as it exists,
    and fails until the reference computes it or it joins tests.checks.NOT_IN_REFERENCE."""
    got, want = _both(case.name, target_kind)
    assert_same_fields("result", got, want)
    # the closed forms from the logits carry the same quantities under the same names
    model, x, labels = build(case)
    closed = closed_form_fi(model.eval()(x), labels if target_kind == "label" else "pred")
    for field in dataclasses.fields(closed):
        assert_same_fields(
            f"closed.{field.name}", getattr(closed, field.name), getattr(want, field.name)
        )


def test_the_exempt_fields_exist_and_every_result_type_is_walked() -> None:
    """NOT_IN_REFERENCE names real fields, and the walk above reaches every result type."""
    types = {t.__name__: t for t in (SensitivityResult, InputFI, ParameterFI, LayerFI, BlockFI)}
    for kind, name in NOT_IN_REFERENCE:
        assert name in {f.name for f in dataclasses.fields(types[kind])}, (kind, name)
    got, _ = _both(CASES[0].name, "label")
    seen: set[str] = set()

    def walk(value: object) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            seen.add(type(value).__name__)
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(got)
    assert seen == set(types), seen


def test_every_supported_layer_avoids_the_fallback() -> None:
    """Linear, Conv1d/2d (grouped, depthwise), norms and Embedding use their Gram formulas."""
    methods = {}
    for case in CASES:
        model, x, labels = build(case)
        result = sensitivity(model, x, labels, inputs=False)
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
    got = sensitivity(model, x, "pred", inputs=False)
    assert got.parameters is not None
    assert got.parameters.layers["0"].method == "ghost"
    want = reference.parameter_fi(model, x, "pred").layers["0"]
    _assert_close("ghost conv fi", got.parameters.layers["0"].parameters.fi, want.parameters.fi)
    _assert_close("ghost conv scale fi", got.parameters.layers["0"].scale.fi, want.scale.fi)


def test_partially_frozen_layer_matches_reference() -> None:
    """A layer whose bias is frozen: the block is the weight alone; scaling goes the generic way."""
    model, x, labels = build(CASES[1])
    model[0].bias.requires_grad_(False)
    got = sensitivity(model, x, labels, inputs=False)
    want = reference.parameter_fi(model, x, labels).layers["0"]
    assert got.parameters is not None
    layer = got.parameters.layers["0"]
    _assert_close("frozen-bias fi", layer.parameters.fi, want.parameters.fi)
    _assert_close("frozen-bias scale fi", layer.scale.fi, want.scale.fi)


@pytest.mark.parametrize("backward", ["batched", "loop"])
def test_backward_methods_agree(backward: str) -> None:
    model, x, labels = build(CASES[2])
    got = sensitivity(model, x, labels, windows=(1, 3), backward=backward)  # type: ignore[arg-type]
    want = reference.input_fi(model, x, labels, windows=(1, 3))
    assert got.input is not None
    _assert_close(f"{backward} whole", got.input.whole.fi, want.whole.fi)
    _assert_close(f"{backward} map", got.input.maps[3].fi, want.maps[3].fi)
