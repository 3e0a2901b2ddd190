"""Binary classifiers with one logit: the two-class model (0, z), against the float64 reference.

A network whose head has one output z, returned as ``(B, 1)``, ``(B,)`` or a ``logits`` entry,
with 0/1 labels as int, float or bool, ``(B,)`` or ``(B, 1)``, must give exactly what the same
network gives with an explicit two-logit head ``(0, z)`` and integer labels: the engine against
the brute-force reference of the explicit model (which never sees one logit), field by field.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_sens import closed_form_fi, input_fi, parameter_fi, reference, sensitivity
from lightning_sens.core.inputs import logits_of
from tests import zoo
from tests.checks import assert_close, assert_same_fields
from tests.models import CASES, Affine, SequenceModel, _randomise_norm_stats, build


class OneLogit(nn.Module):
    """``body`` ends in one output z; the model returns it as ``layout`` says, or, with
    ``explicit``, the two logits (0, z) of the equivalent two-class model."""

    def __init__(self, body: nn.Module, layout: str) -> None:
        super().__init__()
        self.body = body
        self.layout = layout
        self.explicit = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        z = self.body(*args, **kwargs)  # (B, 1)
        if self.explicit:
            return torch.cat([torch.zeros_like(z), z], dim=-1)
        if self.layout == "flat":
            return z.squeeze(-1)
        if self.layout == "dict":
            return {"logits": z}
        return z


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))


def _cnn_bn() -> nn.Module:
    return _randomise_norm_stats(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 1),
        )
    )


def _custom() -> nn.Module:  # layers on the Jacobian route, and the whole-model route
    return nn.Sequential(nn.Conv2d(2, 3, 2), Affine(3), nn.PReLU(3), nn.Flatten(), nn.Linear(48, 1))


@dataclass(frozen=True)
class BinaryCase:
    """A one-logit network, how it returns z, and how its 0/1 labels are given."""

    name: str
    body: Callable[[], nn.Module]
    inputs: Callable[[int], Any]  # a batch of the given size
    layout: str  # "column" (B, 1), "flat" (B,), "dict" {"logits": (B, 1)}
    labels: Callable[[Tensor], Tensor]  # from the int64 labels (B,)
    input_module: str | None = None
    chunk_size: int | None = None


def _inputs_of(name: str) -> Callable[[int], Tensor]:
    """The inputs of the multi-class case ``name`` of tests.models."""
    return next(c for c in CASES if c.name == name).inputs


BINARY = [
    BinaryCase("mlp_flat_float", _mlp, _inputs_of("mlp"), "flat", lambda y: y.double()),
    BinaryCase(
        "cnn_bn_column_float_column",
        _cnn_bn,
        _inputs_of("cnn_bn"),
        "column",
        lambda y: y.double()[:, None],
        chunk_size=2,
    ),
    BinaryCase(
        "sequence_dict_bool",
        lambda: SequenceModel(classes=1),
        _inputs_of("sequence"),
        "dict",
        lambda y: y.bool(),
        "body.embed",
    ),
    BinaryCase(
        "custom_column_int_column", _custom, _inputs_of("custom"), "column", lambda y: y[:, None]
    ),
    # attention on the Jacobian route (dict batches with a padding mask), the recurrent route
    BinaryCase(
        "text_transformer_flat_float",
        lambda: zoo.TextTransformer(classes=1),
        zoo.tokens(20, 6, padded=True),
        "flat",
        lambda y: y.float(),
        "body.embed",
    ),
    BinaryCase(
        "lstm_column_float_column",
        lambda: zoo.Recurrent(nn.LSTM, classes=1),
        zoo.ids(20, 5),
        "column",
        lambda y: y.double()[:, None],
        "body.embed",
    ),
]

LABELS = torch.tensor([1, 0, 0, 1])


def _build(case: BinaryCase) -> tuple[nn.Module, nn.Module, Any]:
    """The one-logit model, the same weights with the explicit head (0, z), and the inputs."""
    torch.manual_seed(0)
    model = OneLogit(case.body(), case.layout).double().train()
    explicit = copy.deepcopy(model)
    explicit.explicit = True
    x = case.inputs(len(LABELS))
    if isinstance(x, Tensor) and x.is_floating_point():
        x = x.double()
    return model, explicit, x


def _windows(x: Any) -> tuple[int, ...]:
    if isinstance(x, dict) or not x.is_floating_point():  # token ids
        return (1, 3)
    return (1, 3) if x.dim() == 4 else ()


@pytest.mark.parametrize("target_kind", ["label", "pred"])
@pytest.mark.parametrize("case", BINARY, ids=[c.name for c in BINARY])
def test_one_logit_is_the_two_class_model(case: BinaryCase, target_kind: str) -> None:
    model, explicit, x = _build(case)
    given = case.labels(LABELS) if target_kind == "label" else "pred"
    labels = LABELS if target_kind == "label" else "pred"
    windows = _windows(x)
    options: dict[str, Any] = {"windows": windows, "channel_metric": True}
    got = sensitivity(model, x, given, chunk_size=case.chunk_size, **options)
    # the engine on the explicit head, with integer labels: the same numbers
    assert_same_fields("explicit", got, sensitivity(explicit, x, labels, **options))
    # the reference of the explicit model, which never sees one logit
    want = reference.sensitivity(
        explicit, x, labels, windows=windows, input_module=case.input_module
    )
    assert_same_fields("reference", got, want)
    # the reference reads one logit and these labels as the engine does
    ones = reference.sensitivity(model, x, given, windows=windows, input_module=case.input_module)
    assert_same_fields("reference of one logit", ones, want)
    if target_kind == "label":
        assert torch.equal(got.target, LABELS)
        assert got.target.dtype == torch.int64


def test_the_halves_take_binary_labels_too() -> None:
    model, explicit, x = _build(BINARY[1])
    labels = LABELS.double()[:, None]
    assert_same_fields(
        "input_fi", input_fi(model, x, labels, (1, 3)), input_fi(explicit, x, LABELS, (1, 3))
    )
    assert_same_fields(
        "parameter_fi", parameter_fi(model, x, labels), parameter_fi(explicit, x, LABELS)
    )
    assert_same_fields(
        "reference.input_fi",
        reference.input_fi(model, x, labels, (1,)),
        reference.input_fi(explicit, x, LABELS, (1,)),
    )


def test_one_logit_families_are_at_the_closed_form_or_null() -> None:
    """K − 1 = 1: a family moves the one contrast or not, so its FI is (1 − p_y)/p_y or 0."""
    model, _, x = _build(BINARY[1])
    with torch.no_grad():
        model.body[0].weight[:, 1] = 0.0  # the second input channel reaches nothing
    got = sensitivity(model, x, LABELS.double(), windows=(1, 3))
    assert got.input is not None
    assert got.parameters is not None
    blocks = [got.input.whole, *got.input.maps.values(), got.parameters.whole]
    blocks += [layer.parameters for layer in got.parameters.layers.values()]
    fi_max = torch.exp(got.log_fi_max)
    for block in blocks:
        rank = block.effective_rank
        assert set(rank.unique().tolist()) <= {0, 1}
        shaped = fi_max.reshape(-1, *[1] * (rank.dim() - 1)).expand_as(block.fi)
        assert_close("fi at rank 1", block.fi[rank == 1], shaped[rank == 1])
        assert torch.equal(block.fi[rank == 0], torch.zeros_like(block.fi[rank == 0]))
    for w in (1, 3):  # windows of one channel: the second channel's move nothing
        assert bool((got.input.maps[w].effective_rank[:, 1] == 0).all())
        assert bool((got.input.maps[w].effective_rank[:, 0] == 1).all())


def test_the_closed_form_is_the_logistic_one() -> None:
    """log FI = log((1 − p_y)/p_y) with p_1 = sigmoid(z): −z for y = 1, z for y = 0; exact
    at margins where sigmoid rounds to 0 or 1 in float64."""
    z = torch.tensor([-800, -60, -3, -1e-9, 0, 1e-9, 0.7, 2.5, 60, 800], dtype=torch.float64)
    for y in (torch.zeros(len(z), dtype=torch.long), torch.ones(len(z), dtype=torch.long)):
        for logits, labels in ((z, y.double()), (z[:, None], y.bool()[:, None]), (z, y)):
            closed = closed_form_fi(logits, labels)
            sign = 1 - 2 * y.double()
            assert torch.equal(closed.log_fi_max, sign * z)
            assert torch.equal(closed.target, y)
            assert_close("p_y", closed.p_target, torch.sigmoid(-sign * z), rtol=1e-15)
            # where log((1 − p)/p) from the sigmoid keeps its relative digits: not where p
            # rounds to 0 or 1, nor near z = 0, where the log of a ratio near 1 cancels
            moderate = (z.abs() > 1e-3) & (z.abs() < 30)
            p = torch.sigmoid(-sign * z)
            assert_close(
                "log((1 - p_y)/p_y)",
                closed.log_fi_max[moderate],
                torch.log((1 - p) / p)[moderate],
                rtol=1e-9,
            )
    predicted = closed_form_fi(z, "pred")
    assert torch.equal(predicted.target, (z > 0).long())
    assert torch.equal(predicted.log_fi_max, -z.abs())


def test_logits_of_reads_one_logit_as_two_inside_autograd() -> None:
    z = torch.tensor([[0.5], [-2.0]], dtype=torch.float64, requires_grad=True)
    for output in (z, z[:, 0], {"logits": z}):
        two = logits_of(output)
        assert torch.equal(two.detach(), torch.tensor([[0.0, 0.5], [0.0, -2.0]]).double())
        (grad,) = torch.autograd.grad((two * torch.tensor([[3.0, 5.0]]).double()).sum(), z)
        assert torch.equal(grad, torch.full_like(z, 5.0))
    multi = torch.randn(2, 3)
    assert logits_of(multi) is multi
    for other in (torch.tensor(1.0), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4, 1)):
        assert logits_of(other) is other  # refused later, with the reason


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m, x: sensitivity(m, x, torch.tensor([0.5, 1.0, 0.0, 2.0])),
            r"target holds the float values \[0\.5, 2\].*must be 0 or 1.*target\.long\(\)",
        ),
        (
            lambda m, x: sensitivity(
                m, x, LABELS, input_target=torch.tensor([[0.2], [1.0], [1.0], [0.0]])
            ),
            r"input_target holds the float values \[0\.2",
        ),
        (
            lambda m, x: sensitivity(m, x, torch.tensor([[0.0, 1.0]] * 4)),
            r"target has shape \(4, 2\).*multi-label.*one class per sample.*argmax",
        ),
        (
            lambda m, x: closed_form_fi(m(x), torch.tensor([0.0, 1.0, 0.9, 1.0])),
            r"target holds the float values \[0\.9",
        ),
        (
            lambda m, x: reference.sensitivity(m, x, torch.tensor([1.0, 0.0, 0.5, 1.0])),
            r"float values \[0\.5\].*must be 0 or 1",
        ),
    ],
)
def test_labels_that_are_not_0_or_1_are_refused(call: Callable[..., Any], match: str) -> None:
    model, _, x = _build(BINARY[0])
    with pytest.raises(ValueError, match=match):
        call(model.eval(), x)


def _graphs(value: object, path: str) -> list[str]:
    """The fields of a result that carry an autograd graph."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            found
            for field in dataclasses.fields(value)
            for found in _graphs(getattr(value, field.name), f"{path}.{field.name}")
        ]
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _graphs(v, f"{path}[{k!r}]")]
    if isinstance(value, Tensor) and (value.requires_grad or value.grad_fn is not None):
        return [path]
    return []


def test_the_graph_walk_finds_a_graph() -> None:
    leaf = torch.ones(2, requires_grad=True)
    assert _graphs({"a": {"b": leaf * 2}}, "r") == ["r['a']['b']"]


GRAPH_CASES = [c.name for c in CASES] + [c.name for c in BINARY] + ["bilstm_projected"]


@pytest.mark.parametrize("name", GRAPH_CASES)
def test_results_carry_no_autograd_graph(name: str) -> None:
    """Outside inference mode, with autograd on, no tensor of the result keeps a graph (the
    Jacobian and recurrent routes once kept the parameters' graphs)."""
    binary = next((c for c in BINARY if c.name == name), None)
    model: nn.Module
    if binary is not None:
        model, _, x = _build(binary)
        labels = binary.labels(LABELS)
    elif name in {c.name for c in CASES}:
        model, x, labels = build(next(c for c in CASES if c.name == name))
    else:
        model, x, labels = zoo.build(next(c for c in zoo.ZOO if c.name == name))
    assert torch.is_grad_enabled()
    result = sensitivity(model, x, labels, windows=_windows(x), channel_metric=True)
    assert _graphs(result, "result") == []
