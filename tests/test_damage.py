"""Predicted damage from the metric against measured damage, quantisation, and the invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_sens import sensitivity
from lightning_sens.damage import (
    Perturbation,
    damage_table,
    measure_damage,
    predict_damage,
    quantization_error,
    quantize,
)


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).double()
    model[3].running_mean.normal_()
    model[3].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(16, 1, 12, 12, dtype=torch.float64)


def test_quantize_uses_symmetric_levels_per_tensor_and_per_channel() -> None:
    w = torch.randn(6, 5, dtype=torch.float64)
    w[2] *= 10  # one channel with a larger range
    for per_channel in (False, True):
        q = quantize(w, 4, per_channel)
        top = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax()
        step = top / 7  # 4 bits: levels -7 … 7
        levels = q / step
        assert torch.allclose(levels, levels.round(), atol=1e-9)
        assert levels.abs().max() <= 7 + 1e-9
        assert (q - w).abs().le(step / 2 + 1e-12).all()  # rounding to the nearest level
        assert torch.equal(quantize(torch.zeros(3, 2), 4, per_channel), torch.zeros(3, 2))
    per_tensor = quantization_error(w, 4, False)
    per_channel = quantization_error(w, 4, True)
    assert per_channel.sum() < per_tensor.sum()  # finer steps on the small channels
    with pytest.raises(ValueError, match="bits must be at least 2"):
        quantize(w, 1, False)


def test_predicted_kl_is_the_second_order_term_of_the_measured_kl() -> None:
    """Small noise and scaling: measured E[KL] → ½ σ² tr(G_l) and ½ δ² uᵀHu (float64)."""
    model, x = _model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = sensitivity(model, x, "pred", inputs=False, channel_metric=True)
    assert result.parameters is not None
    predicted = predict_damage(model, result.parameters, noise=(1e-3,), bits=(8,), scale=(1e-3,))
    assert set(predicted) == {"0", "2", "3", "6"}
    for name, layer in predicted.items():
        noise = Perturbation("noise", 1e-3)
        measured = measure_damage(model, x, name, noise, draws=2000, seed=1)
        # the KL of one draw is a quadratic form in Gaussian noise: its mean over 2000 draws
        # is within a few percent of the expectation
        assert measured == pytest.approx(layer.noise[1e-3], rel=0.06), name
        scale = Perturbation("scale", 1e-3)
        assert measure_damage(model, x, name, scale) == pytest.approx(
            layer.scale[1e-3], rel=5e-3
        ), name
    assert set(predicted["3"].quant) == set()  # BatchNorm: not a quantised weight
    assert set(predicted["6"].quant) == {(8, False), (8, True)}
    for name, tensor in model.state_dict().items():  # the model is left untouched
        assert torch.equal(tensor, before[name]), name


def test_weight_channel_metric_adds_up_to_the_layer_metric_without_bias() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4, bias=False)
    ).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    result = sensitivity(model, x, "pred", inputs=False, channel_metric=True)
    assert result.parameters is not None
    for name in ("0", "3"):
        layer = result.parameters.layers[name]
        assert layer.weight_channel_metric is not None
        torch.testing.assert_close(layer.weight_channel_metric.sum(-1), layer.metric)


def test_quantisation_needs_the_channel_metric_and_a_weight() -> None:
    model, x = _model()
    plain = sensitivity(model, x, "pred", inputs=False)
    assert plain.parameters is not None
    assert all(layer.weight_channel_metric is None for layer in plain.parameters.layers.values())
    with pytest.raises(ValueError, match=r"channel_metric=True"):
        predict_damage(model, plain.parameters, bits=(4,))
    assert predict_damage(model, plain.parameters, bits=())["6"].quant == {}
    with pytest.raises(ValueError, match="quantises the weight of a Linear or convolution"):
        measure_damage(model, x, "3", Perturbation("quant", 4))


def test_damage_table_has_a_row_per_layer_and_perturbation() -> None:
    model, x = _model()
    result = sensitivity(model, x, "pred", inputs=False, channel_metric=True)
    assert result.parameters is not None
    predicted = predict_damage(model, result.parameters, noise=(0.1,), bits=(4,), scale=(0.1,))
    rows = damage_table(predicted, lambda layer, p: measure_damage(model, x, layer, p, draws=2))
    labels = {(r["layer"], r["perturbation"]) for r in rows}
    assert ("6", "4-bit weights (per channel)") in labels
    assert ("3", "noise 0.1 x rms") in labels
    assert all(float(r["measured_kl"]) >= 0 for r in rows)  # type: ignore[arg-type]
    assert len(rows) == 4 * 2 + 3 * 2  # noise and scale everywhere, 2 quant rows on 3 layers


def test_a_layer_that_does_not_reach_the_logits_predicts_no_damage() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(6, 4)
            self.spare = nn.Linear(6, 3)  # never called: its parameters cannot change anything

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    model = WithSpare().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    result = sensitivity(model, x, "pred", inputs=False, channel_metric=True)
    assert result.parameters is not None
    spare = result.parameters.layers["spare"]
    assert spare.method == "unused"
    assert spare.weight_channel_metric is not None
    assert torch.equal(spare.weight_channel_metric, torch.zeros(5, 3, dtype=torch.float64))
    predicted = predict_damage(model, result.parameters, noise=(0.1,), bits=(4,))
    assert predicted["spare"].noise[0.1] == 0.0
    assert predicted["spare"].quant == {(4, False): 0.0, (4, True): 0.0}
    assert measure_damage(model, x, "spare", Perturbation("quant", 4, True)) == 0.0
    assert predicted["used"].quant[4, True] > 0


def test_a_conv1d_is_damaged_as_the_linear_layer_it_stores_transposed() -> None:
    """Hugging Face's ``Conv1D`` and an ``nn.Linear`` with the transposed weight: the same
    predicted and measured damage, quantisation per output channel included (its columns)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 4).double()  # nf = 5 outputs, nx = 4 inputs; W is (4, 5)
    scales = torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)  # per output column
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 5, dtype=torch.float64) * scales)
    linear = nn.Linear(4, 5).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    head = nn.Linear(5, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    damage, measured = {}, {}
    for name, layer in (("conv1d", conv), ("linear", linear)):
        model = nn.Sequential(layer, nn.Tanh(), copy.deepcopy(head))
        scores = sensitivity(model, x, "pred", inputs=False, channel_metric=True)
        assert scores.parameters is not None
        damage[name] = predict_damage(model, scores.parameters, bits=(2, 4))["0"].predicted
        measured[name] = [
            measure_damage(model, x, "0", Perturbation("quant", 2, per)) for per in (False, True)
        ]
    assert set(damage["conv1d"]) == set(damage["linear"])
    for key, value in damage["linear"].items():
        assert damage["conv1d"][key] == pytest.approx(value, rel=1e-10), key
    assert measured["conv1d"] == pytest.approx(measured["linear"], rel=1e-10)
    # per channel is not per tensor here: the columns' scales differ
    per_tensor, per_channel = (damage["conv1d"][Perturbation("quant", 2, p)] for p in (0, 1))
    assert per_channel < 0.5 * per_tensor
