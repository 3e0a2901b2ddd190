"""The metric's trace from sampled labels against the exact engine (classifiers of the zoo) and
against its definition by brute force (a language model, segmentation, multi-label), in
float64: every layer's estimate within five of its standard errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_sens import read_layout, sensitivity
from lightning_sens.core.trace import sampled_metric_trace
from lightning_sens.damage import Perturbation, measure_damage, output_divergence, predict_damage
from lightning_sens.quantization import quantization_report, trace_method
from lightning_sens.reference import metric_trace
from tests.models import CASES, build

DRAWS = 1500


def _within(estimate: Tensor, error: Tensor, exact: Tensor, what: str) -> None:
    """Within five standard errors (and float64 rounding where the draws agree exactly)."""
    bound = 5 * error + 1e-9 * exact.abs().clamp(min=1)
    z = (estimate - exact) / error.clamp(min=1e-300)
    assert bool(((estimate - exact).abs() <= bound).all()), f"{what}: z-scores {z.tolist()}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_sampled_trace_matches_the_exact_engine_on_every_fast_route(case: object) -> None:
    model, x, _ = build(case)  # type: ignore[arg-type]
    exact = sensitivity(model, x, "pred", inputs=False, channel_metric=True).parameters
    assert exact is not None
    # one backward per draw through nn.MultiheadAttention takes 20 ms on CPU: batch them there
    backward = "batched" if case.name == "sequence" else "auto"  # type: ignore[attr-defined]
    found = sampled_metric_trace(model, x, draws=DRAWS, channel_metric=True, backward=backward)
    assert set(found.layers) | set(found.skipped) == set(exact.layers)
    assert found.layers, "no layer was estimated"
    for name, layer in found.layers.items():
        truth = exact.layers[name]
        assert truth.method != "jacobian", name  # the ghost or direct choice depends on S
        _within(layer.metric, layer.standard_error, truth.metric, name)
        if layer.weight_channel_metric is not None:
            assert truth.weight_channel_metric is not None
            relative = layer.weight_channel_metric.sum(-1) / truth.weight_channel_metric.sum(-1)
            # the channels add up to the weight's share of the layer's trace
            assert torch.allclose(relative, torch.ones_like(relative), atol=0.1), (name, relative)
    for name, why in found.skipped.items():
        assert exact.layers[name].method == "jacobian", (name, exact.layers[name].method)
        assert "Jacobian route" in why


class TinyLM(nn.Module):
    """Embedding, a GRU and a Linear head: ``(B, T, V)`` logits."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 5)
        self.rnn = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


class TinySegmenter(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))


def test_the_sampled_trace_of_a_language_model_matches_its_definition() -> None:
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, 7, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    layout = read_layout(torch.zeros(3, 4, 7), torch.zeros(3, 4).long())
    found = sampled_metric_trace(model, ids, layout=layout, mask=mask, draws=DRAWS)
    assert set(found.layers) == {"embed", "rnn", "head"}
    for name, layer in found.layers.items():
        truth = metric_trace(model, ids, name, mask=mask)
        _within(layer.metric, layer.standard_error, truth, name)


def test_the_sampled_trace_of_gpt2_covers_its_conv1d_layers() -> None:
    """GPT-2's attention and MLP layers are Hugging Face's ``Conv1D``: on the fast route, so
    the trace estimates them (within five standard errors of the brute force) instead of
    leaving them out."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    config = GPT2Config(vocab_size=9, n_positions=8, n_embd=6, n_layer=1, n_head=2, n_inner=8)
    model = GPT2LMHeadModel(config).double().eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = model

        def forward(self, ids: Tensor) -> Tensor:
            return self.gpt(input_ids=ids).logits

    wrapped = Logits()
    ids = torch.randint(0, 9, (2, 4))
    layout = read_layout(torch.zeros(2, 4, 9), torch.zeros(2, 4).long())
    found = sampled_metric_trace(wrapped, ids, layout=layout, draws=DRAWS)
    conv1d = [f"gpt.transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
    for name in conv1d:
        assert name in found.layers, (name, found.skipped.get(name))
        truth = metric_trace(wrapped, ids, name)
        _within(found.layers[name].metric, found.layers[name].standard_error, truth, name)


def test_the_sampled_trace_of_a_segmentation_model_matches_its_definition() -> None:
    torch.manual_seed(1)
    model = TinySegmenter().double().eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    layout = read_layout(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4).long())
    found = sampled_metric_trace(model, x, layout=layout, draws=DRAWS)
    for name in ("conv", "norm", "head"):
        truth = metric_trace(model, x, name, class_dim=1)
        layer = found.layers[name]
        _within(layer.metric, layer.standard_error, truth, name)


def test_the_sampled_trace_of_sigmoids_matches_its_definition() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    targets = (torch.rand(3, 5) > 0.5).double()
    targets[:, :2] = 1.0
    layout = read_layout(torch.zeros(3, 5), targets)
    assert layout.task == "multilabel"
    found = sampled_metric_trace(model, x, layout=layout, draws=DRAWS)
    for name in ("0", "2"):
        truth = metric_trace(model, x, name, sigmoid=True)
        layer = found.layers[name]
        _within(layer.metric, layer.standard_error, truth, name)


def test_a_causal_language_model_leaves_out_the_last_position() -> None:
    torch.manual_seed(3)
    model = TinyLM().double().eval()
    ids = torch.randint(0, 7, (2, 5))
    layout = read_layout(torch.zeros(2, 5, 7), ids, ids)
    assert layout.shift
    found = sampled_metric_trace(model, ids, layout=layout, draws=DRAWS)
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    truth = metric_trace(model, ids, "head", mask=mask)
    _within(found.layers["head"].metric, found.layers["head"].standard_error, truth, "head")


def test_draws_are_checked_and_seeded() -> None:
    model = nn.Linear(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        sampled_metric_trace(model, x, draws=1)
    first = sampled_metric_trace(model, x, draws=4, seed=5).layers[""].metric
    again = sampled_metric_trace(model, x, draws=4, seed=5).layers[""].metric
    other = sampled_metric_trace(model, x, draws=4, seed=6).layers[""].metric
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_damage_predicted_from_the_sampled_trace_matches_measured_noise_damage() -> None:
    """½ σ² tr(G_l) of a language model's layers against the KL that noise of 1 % of their
    rms measurably does, summed over the positions that count."""
    torch.manual_seed(4)
    model = TinyLM().double().eval()
    ids = torch.randint(0, 7, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[::2, -2:] = 0
    layout = read_layout(torch.zeros(6, 5, 7), ids, ids)
    trace = sampled_metric_trace(model, ids, layout=layout, mask=mask, draws=DRAWS)
    predicted = predict_damage(model, trace, noise=(0.01,), bits=(), scale=(0.1,))
    for name, layer in predicted.items():
        assert not layer.scale  # no scaling metric from sampled labels
        measured = measure_damage(
            model, ids, name, Perturbation("noise", 0.01), draws=400, layout=layout, mask=mask
        )
        assert layer.noise[0.01] == pytest.approx(measured, rel=0.15), name


def test_the_divergence_sums_over_the_positions_that_count() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    moved = clean + 0.3 * torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    layout = read_layout(clean, torch.zeros(2, 4).long())
    p, q = torch.softmax(clean, -1), torch.softmax(moved, -1)
    per_position = (p * (p.log() - q.log())).sum(-1)
    expected = (per_position * mask).sum(-1).mean()
    assert output_divergence(clean, moved, layout, mask) == pytest.approx(float(expected))
    # segmentation: the class axis is axis 1
    seg = read_layout(clean.movedim(-1, 1), torch.zeros(2, 4).long())
    assert seg.class_dim == 1
    found = output_divergence(clean.movedim(-1, 1), moved.movedim(-1, 1), seg, mask)
    assert found == pytest.approx(float(expected))
    # sigmoids: one Bernoulli per entry
    targets = torch.ones(2, 3, dtype=torch.float64)
    targets[0, 0] = 0
    multi = read_layout(clean[:, 0], targets)
    s, t = torch.sigmoid(clean[:, 0]), torch.sigmoid(moved[:, 0])
    bernoulli = s * (s / t).log() + (1 - s) * ((1 - s) / (1 - t)).log()
    found = output_divergence(clean[:, 0], moved[:, 0], multi)
    assert found == pytest.approx(float(bernoulli.sum(-1).mean()))


def test_the_quantization_report_switches_to_sampled_labels_where_they_cost_less() -> None:
    torch.manual_seed(5)
    small = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(4, 4)
    assert trace_method(small, x, None, None, "auto", draws=16) == "exact"
    wide = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 40))
    assert trace_method(wide, x, None, None, "auto", draws=16) == "sampled"
    model = TinyLM().eval()
    ids = torch.randint(0, 7, (4, 5))
    layout = read_layout(torch.zeros(4, 5, 7), ids, ids)
    with pytest.raises(ValueError, match="method='exact' needs one prediction per sample"):
        quantization_report(model, ids, layout=layout, method="exact")
    rows = quantization_report(model, ids, (4,), measure=True, layout=layout, draws=8)
    assert {row["estimator"] for row in rows} == {"sampled (8 draws)"}
    assert {row["layer"] for row in rows} == {"head"}  # the one Linear layer
    assert all(float(row["measured_kl"]) > 0 for row in rows)  # type: ignore[arg-type]
