"""Every architecture of the zoo against the float64 brute-force reference.

For each model: whole-input FI and rank, the 1×1 and 3×3 maps (pixels, or tokens of the
embedded sequence) and the position map; then one layer of every kind it contains (by module
type and route) for parameter, layer-scaling and channel-scaling FI, and all those layers
jointly. Low-precision models are compared with the reference on a float64 copy of the same
weights.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_sens import default_rtol, reference, sensitivity
from lightning_sens.core.capture import unwrap_compiled
from tests.checks import RTOL, assert_close, assert_equal
from tests.zoo import CLASSES, ZOO, ZooCase, build


def _float64(model: nn.Module, inputs: Any, case: ZooCase) -> tuple[nn.Module, Any]:
    """The model the reference differentiates: the uncompiled module, in float64."""
    model = unwrap_compiled(model)
    if case.dtype == torch.float64:
        return model, inputs
    model = copy.deepcopy(model).double()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    inputs = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else cast(inputs)
    return model, inputs


def _one_layer_per_kind(model: nn.Module, layers: dict[str, Any]) -> list[str]:
    kinds: dict[tuple[str, str], str] = {}
    for name, layer in layers.items():
        kinds.setdefault((type(model.get_submodule(name)).__name__, layer.method), name)
    return list(kinds.values())


# (batch, classes): the zoo's sizes, and a batch of K − 1 samples, where the sample and cotangent
# dimensions of the Jacobian route's vmap have the same size (tests/test_vmap_sizes.py)
SIZES = {"K=5": (2, CLASSES), "batch=K-1": (2, 3)}


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_matches_reference(case: ZooCase, sizes: tuple[int, int]) -> None:
    if case.requires:
        pytest.importorskip(case.requires)
    batch, classes = sizes
    model, x, labels = build(case, batch, classes=classes)
    got = sensitivity(model, x, labels, windows=case.windows)
    ref_model, ref_x = _float64(model, x, case)
    # A low-precision model is computed in float32 (the same rank rule; FI to float32 accuracy).
    low = case.dtype != torch.float64
    rtol = default_rtol(torch.float64)
    tolerance = 1e-4 if low else RTOL

    key = "pixel_values" if isinstance(x, dict) and "pixel_values" in x else None
    want = reference.input_fi(
        ref_model,
        ref_x,
        labels,
        case.windows,
        rtol=rtol,
        input_key=key,
        input_module=case.input_module,
    )
    assert got.input is not None
    if case.input_module is not None:  # found without being told
        assert got.input.source == f"output of {case.input_module!r}"
    assert_close("whole-input fi", got.input.whole.fi, want.whole.fi, tolerance)
    assert_equal("whole-input rank", got.input.whole.effective_rank, want.whole.effective_rank)
    for w in case.windows:
        assert_close(f"map w={w}", got.input.maps[w].fi, want.maps[w].fi, tolerance)
        assert_equal(
            f"map rank w={w}", got.input.maps[w].effective_rank, want.maps[w].effective_rank
        )
    assert got.input.position_map is not None
    assert want.position_map is not None
    assert_close("position map", got.input.position_map.fi, want.position_map.fi, tolerance)

    assert got.parameters is not None
    chosen = _one_layer_per_kind(ref_model, got.parameters.layers)
    want_parameters = reference.parameter_fi(ref_model, ref_x, labels, layers=chosen, rtol=rtol)
    for name in chosen:
        mine, ref = got.parameters.layers[name], want_parameters.layers[name]
        assert_close(f"{name} fi", mine.parameters.fi, ref.parameters.fi, tolerance)
        assert_equal(f"{name} rank", mine.parameters.effective_rank, ref.parameters.effective_rank)
        assert_close(f"{name} scale fi", mine.scale.fi, ref.scale.fi, tolerance)
        if ref.channel_scale is None:
            assert mine.channel_scale is None, name
        else:
            assert mine.channel_scale is not None, name
            assert_close(
                f"{name} channel fi", mine.channel_scale.fi, ref.channel_scale.fi, tolerance
            )
            assert_equal(
                f"{name} channel rank",
                mine.channel_scale.effective_rank,
                ref.channel_scale.effective_rank,
            )
    subset = sensitivity(model, x, labels, inputs=False, layers=chosen)
    assert subset.parameters is not None
    assert_close(
        "all parameters fi", subset.parameters.whole.fi, want_parameters.whole.fi, tolerance
    )
    for name in chosen:  # a layer's numbers do not depend on which others are monitored
        assert torch.equal(
            subset.parameters.layers[name].parameters.fi, got.parameters.layers[name].parameters.fi
        ), name


def _methods(case: ZooCase) -> dict[str, str]:
    model, x, labels = build(case)
    result = sensitivity(model, x, labels, inputs=False)
    assert result.parameters is not None
    return {name: layer.method for name, layer in result.parameters.layers.items()}


def test_attention_takes_the_jacobian_route_and_recurrent_layers_their_own() -> None:
    text = _methods(next(c for c in ZOO if c.name == "text_transformer"))
    attention = "encoder.layers.0.self_attn"
    assert text[attention] == text[f"{attention}.out_proj"] == "jacobian"
    assert text["encoder.layers.0.linear1"] in ("direct", "ghost")
    assert text["embed"] == "embedding"
    for name in ("lstm", "gru", "bilstm_projected", "birnn_relu"):
        assert _methods(next(c for c in ZOO if c.name == name))["rnn"] == "recurrent", name


def test_a_subclass_that_changes_forward_does_not_take_its_parents_route() -> None:
    methods = _methods(next(c for c in ZOO if c.name == "layernorm2d"))
    assert methods["1"] == "jacobian"  # ChannelsLastNorm(nn.LayerNorm) permutes channels
    assert methods["0"] in ("direct", "ghost")


def test_shared_weights_are_one_family_named_in_the_result() -> None:
    case = next(c for c in ZOO if c.name == "tied_module")
    model, x, labels = build(case)
    result = sensitivity(model, x, labels, inputs=False)
    assert result.parameters is not None
    assert result.parameters.layers["embed"].shared_with == ("head",)
    assert result.parameters.layers["head"].shared_with == ("embed",)
    twice = _methods(next(c for c in ZOO if c.name == "used_twice"))
    assert twice["shared"] in ("direct", "ghost")  # both calls on the fast route


def test_a_weight_also_used_outside_its_layer_is_caught_by_the_certificate() -> None:
    """GPT-style tying (``F.linear(h, self.embed.weight)``): the embedding's own calls miss the
    head's use; the certificate sends it through the whole model (exact, see the zoo test)."""
    methods = _methods(next(c for c in ZOO if c.name == "tied_functional"))
    assert methods["embed"] == "jacobian"
    assert methods["mix"] in ("direct", "ghost")


def test_float32_shufflenet_keeps_every_real_direction() -> None:
    """ShuffleNet's whole-input Gram has eigenvalue ratios down to ~1e-5 that are real. A rank
    tolerance tied to float32 (1e-5·K) dropped them: rank 6-7 instead of 9 and FI up to 74 %
    low. The engine forms Grams in float64, so float32 models use the float64 rule."""
    from torchvision.models import shufflenet_v2_x0_5

    torch.manual_seed(0)
    model = shufflenet_v2_x0_5(num_classes=10)
    x, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    result = sensitivity(model, x, labels, windows=(), parameters=False)
    assert result.input is not None
    assert result.input.whole.effective_rank.tolist() == [9] * 8
    torch.testing.assert_close(result.input.whole.fi, result.log_fi_max.exp(), rtol=1e-12, atol=0)
    assert default_rtol(torch.float32) == 1e-5  # what the engine no longer uses
    dropped = sensitivity(model, x, labels, windows=(), parameters=False, rtol=1e-5)
    assert dropped.input is not None
    assert (dropped.input.whole.effective_rank < 9).any()


class Bypass(nn.Module):
    """A Linear called once through ``__call__`` (hooks fire) and once through ``.forward``
    (they do not): its recorded calls miss a use, which only the certificate can see."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared.forward(torch.tanh(self.shared(x)))))


def test_a_call_that_bypasses_the_hooks_is_caught_by_the_certificate() -> None:
    torch.manual_seed(0)
    model = Bypass().double()
    x, labels = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2])
    got = sensitivity(model, x, labels, inputs=False)
    want = reference.parameter_fi(model, x, labels)
    assert got.parameters is not None
    assert got.parameters.layers["shared"].method == "jacobian"  # demoted, then exact
    assert got.parameters.layers["head"].method == "linear"
    for name in ("shared", "head"):
        layer = got.parameters.layers[name]
        assert_close(f"{name} fi", layer.parameters.fi, want.layers[name].parameters.fi)
        assert_close(f"{name} scale", layer.scale.fi, want.layers[name].scale.fi)


def test_a_model_handed_over_in_training_mode_is_measured_in_eval_mode() -> None:
    """Dropout off and the attention computed as in evaluation, whatever mode the user left the
    model in; each module's own mode is restored."""
    case = next(c for c in ZOO if c.name == "text_transformer")
    model, x, labels = build(case)
    model.encoder.layers[0].train(False)  # mixed modes, restored module by module
    modes = [m.training for m in model.modules()]
    in_training = sensitivity(model, x, labels, windows=(1,))
    assert [m.training for m in model.modules()] == modes
    in_eval = sensitivity(model.eval(), x, labels, windows=(1,))
    assert in_training.input is not None
    assert in_eval.input is not None
    assert torch.equal(in_training.input.whole.fi, in_eval.input.whole.fi)
    assert torch.equal(in_training.input.maps[1].fi, in_eval.input.maps[1].fi)
    assert in_training.parameters is not None
    assert in_eval.parameters is not None
    for name, layer in in_eval.parameters.layers.items():
        assert torch.equal(in_training.parameters.layers[name].parameters.fi, layer.parameters.fi)


def test_hugging_face_conv1d_takes_the_linear_routes_with_its_columns_as_channels() -> None:
    """GPT-2's ``Conv1D`` (x @ W + b, W stored (in, out)) is on a fast route, and its
    per-channel weight metric and channel-scaling FI, taken over W's columns, equal the
    float64 brute force."""
    pytest.importorskip("transformers")
    case = next(c for c in ZOO if c.name == "hf_gpt2")
    model, x, labels = build(case)
    got = sensitivity(model, x, labels, inputs=False, channel_metric=True)
    assert got.parameters is not None
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 4  # attention in and out, MLP in and out
    for name in conv1d:
        assert got.parameters.layers[name].method in ("linear", "direct", "ghost"), name
    chosen = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    ref_model, ref_x = _float64(model, x, case)
    want = reference.parameter_fi(ref_model, ref_x, labels, layers=chosen)
    for name in chosen:
        mine, ref = got.parameters.layers[name], want.layers[name]
        assert mine.weight_channel_metric is not None
        assert ref.weight_channel_metric is not None
        width = model.get_submodule(name).weight.shape[1]
        assert mine.weight_channel_metric.shape[-1] == width  # one per column
        assert_close(
            f"{name} channel metric", mine.weight_channel_metric, ref.weight_channel_metric
        )
        assert mine.channel_scale is not None
        assert ref.channel_scale is not None
        assert_close(f"{name} channel fi", mine.channel_scale.fi, ref.channel_scale.fi)
