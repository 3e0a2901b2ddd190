"""Invariances and bounds of FI (docs/method.md), chunking, and that the model is treated as a
function."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from lightning_sens import closed_form_fi, input_fi, parameter_fi, sensitivity
from tests.models import CASES, build

CNN = CASES[1]  # conv + BatchNorm, 6 classes, 2 × 6 × 6 images
WINDOWS = (1, 3, 5)


class Scaled(nn.Module):
    """model(x ⊙ base): the multiplicative perturbation family around ``base`` at ω = 1."""

    def __init__(self, model: nn.Module, base: Tensor) -> None:
        super().__init__()
        self.model, self.base = model, base

    def forward(self, omega: Tensor) -> Tensor:
        return self.model(omega * self.base)


def _close(a: Tensor, b: Tensor, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=0)


def test_additive_and_multiplicative_perturbations_agree() -> None:
    model, x, labels = build(CNN)
    additive = input_fi(model, x, labels, windows=WINDOWS)
    multiplicative = input_fi(Scaled(model, x), torch.ones_like(x), labels, windows=WINDOWS)
    _close(additive.whole.fi, multiplicative.whole.fi)
    for w in WINDOWS:
        _close(additive.maps[w].fi, multiplicative.maps[w].fi)


def test_input_scale_invariance_while_the_gradient_norm_changes() -> None:
    """Pixels ×255 with the first layer ÷255: FI unchanged, ‖∇_x log p_y‖ ÷255."""
    model, x, labels = build(CNN)
    rescaled, _, _ = build(CNN)
    with torch.no_grad():
        rescaled[0].weight.div_(255.0)
    x255 = 255.0 * x
    before = input_fi(model, x, labels, windows=WINDOWS)
    after = input_fi(rescaled, x255, labels, windows=WINDOWS)
    _close(before.whole.fi, after.whole.fi)
    for w in WINDOWS:
        _close(before.maps[w].fi, after.maps[w].fi, rtol=1e-8)

    def grad_norm(m: nn.Module, inputs: Tensor) -> Tensor:
        inputs = inputs.clone().requires_grad_(True)
        log_p = torch.log_softmax(m.eval()(inputs), -1).gather(1, labels[:, None]).sum()
        (g,) = torch.autograd.grad(log_p, inputs)
        return g.flatten(1).norm(dim=1)

    _close(grad_norm(rescaled, x255) * 255.0, grad_norm(model, x))


def test_reparameterisation_of_the_input_leaves_whole_fi_unchanged() -> None:
    """x = A τ for an invertible A: FI of τ equals FI of x.

    The MLP's bottleneck keeps the rank below K − 1, so this is not the closed form.
    """
    model, x, labels = build(CASES[0])
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tau = torch.linalg.solve(A, x.T).T
    reparam = nn.Sequential(nn.Linear(6, 6, bias=False), model).double()
    with torch.no_grad():
        reparam[0].weight.copy_(A)
    direct = input_fi(model, x, labels, windows=())
    through = input_fi(reparam, tau, labels, windows=())
    assert direct.whole.effective_rank.tolist() == [2, 2, 2]  # informative, not the closed form
    _close(direct.whole.fi, through.whole.fi)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sub_families_never_exceed_their_family(case) -> None:
    model, x, labels = build(case, batch=4)
    windows = WINDOWS if x.dim() == 4 else ()
    result = sensitivity(model, x, labels, windows=windows)
    ceiling = result.log_fi_max.exp() * (1 + 1e-9)
    slack = 1 + 1e-9
    assert result.parameters is not None
    everything = result.parameters.whole.fi
    assert (everything <= ceiling).all()
    for name, layer in result.parameters.layers.items():
        assert (layer.parameters.fi <= everything * slack).all(), name
        assert (layer.scale.fi <= layer.parameters.fi * slack).all(), name
        if layer.channel_scale is not None:
            assert (layer.channel_scale.fi <= layer.parameters.fi * slack).all(), name
            assert (layer.scale.fi <= layer.channel_scale.fi * slack).all(), name
        for block in (layer.parameters, layer.scale):
            assert ((block.relative_fi >= 0) & (block.relative_fi <= 1)).all(), name
    if result.input is not None:
        whole = result.input.whole.fi
        assert (whole <= ceiling).all()
        for small, large in itertools.pairwise(windows):
            assert (result.input.maps[small].fi <= result.input.maps[large].fi * slack).all()
        if windows:
            assert result.input.position_map is not None
            per_channel = result.input.maps[1].fi
            assert (per_channel <= result.input.position_map.fi.unsqueeze(1) * slack).all()
            assert (result.input.maps[windows[-1]].fi <= whole[:, None, None, None] * slack).all()


def test_full_rank_families_equal_the_closed_form() -> None:
    model, x, labels = build(CNN, batch=5)
    result = sensitivity(model, x, labels, windows=())
    closed = closed_form_fi(model.eval()(x), labels)
    assert result.input is not None
    assert result.parameters is not None
    assert (result.input.whole.effective_rank == 5).all()
    _close(result.input.whole.fi, closed.fi)
    _close(result.log_fi_max, closed.log_fi_max)
    for name, layer in result.parameters.layers.items():
        full = layer.parameters.effective_rank == 5
        _close(layer.parameters.fi[full], closed.fi[full])
        assert torch.allclose(
            layer.parameters.relative_fi[full], torch.ones(int(full.sum()), dtype=torch.float64)
        ), name


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunking_does_not_change_results(chunk_size: int) -> None:
    model, x, labels = build(CASES[2], batch=5)
    whole = sensitivity(model, x, labels, windows=(1, 3))
    chunked = sensitivity(model, x, labels, windows=(1, 3), chunk_size=chunk_size)
    assert whole.input is not None
    assert chunked.input is not None
    _close(chunked.input.whole.fi, whole.input.whole.fi, rtol=1e-12)
    _close(chunked.input.maps[3].fi, whole.input.maps[3].fi, rtol=1e-12)
    assert whole.parameters is not None
    assert chunked.parameters is not None
    for name, layer in whole.parameters.layers.items():
        _close(chunked.parameters.layers[name].parameters.fi, layer.parameters.fi, rtol=1e-12)
        assert torch.equal(
            chunked.parameters.layers[name].parameters.effective_rank,
            layer.parameters.effective_rank,
        )
    assert torch.equal(chunked.target, whole.target)


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
def test_model_is_left_exactly_as_it_was(context: str) -> None:
    model, x, labels = build(CASES[2])
    model[3].train(False)  # mixed modes must be restored module by module
    model[1].weight.grad = torch.full_like(model[1].weight, 0.5)
    before = _snapshot(model)
    rng = torch.get_rng_state()
    if context == "inference_mode":
        with torch.inference_mode():
            x_in = x.clone()
            result = sensitivity(model, x_in, labels, windows=(1, 3))
    elif context == "no_grad":
        with torch.no_grad():
            result = sensitivity(model, x, labels, windows=(1, 3))
    else:
        result = sensitivity(model, x, labels, windows=(1, 3))
    after = _snapshot(model)
    assert result.input is not None
    assert torch.isfinite(result.input.whole.fi).all()
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for k, v in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(v, after["state"][k]), k  # type: ignore[index]
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):  # type: ignore[call-overload]
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert torch.equal(rng, torch.get_rng_state())


def test_frozen_layers_are_refused_with_the_fix_and_inputs_still_work() -> None:
    """The decided behaviour for frozen models (post-hoc users often freeze them): per-layer FI
    perturbs the parameters training moves, so a frozen layer named in ``layers`` is refused
    with the fix in the message, and left out when layers are not named; input FI needs no
    trainable parameter. Unfrozen again, the layers give the same FI as before."""
    model, x, labels = build(CNN)
    names = ["0", "1", "3", "4", "7"]
    before = parameter_fi(model, x, labels, layers=names)
    for p in model[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0', whose parameters are all frozen.*requires_grad_"):
        parameter_fi(model, x, labels, layers=names)
    assert "0" not in parameter_fi(model, x, labels).layers  # not named: left out
    for p in model.parameters():
        p.requires_grad_(False)
    frozen_input = input_fi(model, x, labels, windows=(1,))
    assert torch.isfinite(frozen_input.whole.fi).all()
    for p in model.parameters():
        p.requires_grad_(True)
    after = parameter_fi(model, x, labels, layers=names)
    for name in names:
        _close(after.layers[name].parameters.fi, before.layers[name].parameters.fi, rtol=1e-14)


def test_forward_fn_adapts_models_that_return_more_than_logits() -> None:
    model, x, labels = build(CNN)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: Tensor) -> dict[str, Tensor]:
            return {"logits": self.net(inputs), "aux": inputs.sum()}

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
            return self.net(inputs), inputs.sum()

    with pytest.raises(TypeError, match=r"returned tuple.*forward_fn"):
        sensitivity(Pair(), x, labels, windows=(1,))
    wrapped = Wrapped()  # a dict with "logits" is read as Hugging Face outputs are
    by_key = sensitivity(wrapped, x, labels, windows=(1,))
    adapted = sensitivity(
        wrapped, x, labels, windows=(1,), forward_fn=lambda m, inp: m(inp)["logits"]
    )
    assert by_key.input is not None
    _close(by_key.input.whole.fi, adapted.input.whole.fi, rtol=1e-14)  # type: ignore[union-attr]
    plain = sensitivity(model, x, labels, windows=(1,))
    assert adapted.input is not None
    assert plain.input is not None
    _close(adapted.input.whole.fi, plain.input.whole.fi, rtol=1e-14)
    assert adapted.parameters is not None
    assert set(adapted.parameters.layers) == {f"net.{n}" for n in ["0", "1", "3", "4", "7"]}


PURE = (  # everything below the callbacks and the command line: no Lightning, no TensorBoard
    "lightning_sens",
    "lightning_sens.core",
    "lightning_sens.reference",
    "lightning_sens.flagging",
    "lightning_sens.config",
    "lightning_sens.label_noise",
    "lightning_sens.damage",
    "lightning_sens.data",
    "lightning_sens.tracking",  # the monitor's state: torch and torchmetrics only
    *(
        f"lightning_sens.reporting.{name}"
        for name in (
            "keys", "writers", "summary", "stats", "tables", "figures", "images", "sequences",
            "html", "canvas", "pictures", "html_cells", "html_flags", "paths", "layout",
        )
    ),
)  # fmt: skip


def test_the_pure_modules_do_not_import_lightning() -> None:
    code = (
        f"import sys, {', '.join(PURE)}; "
        "roots = {m.split('.')[0] for m in sys.modules}; "
        "bad = roots & {'lightning', 'pytorch_lightning', 'tensorboard'}; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_one_call_gives_maps_with_one_label_and_layers_with_another(chunk_size: int | None) -> None:
    """``input_target`` shares the forward and the backward products between the two families:
    the result equals two separate calls, field by field."""
    model, x, labels = build(CNN, batch=5)
    wrong = (labels + 1) % 6  # a label that is not the prediction for any sample
    both = sensitivity(model, x, labels, input_target=wrong, windows=WINDOWS, chunk_size=chunk_size)
    maps = sensitivity(model, x, wrong, windows=WINDOWS, parameters=False)
    layers = sensitivity(model, x, labels, inputs=False)
    assert both.input is not None
    assert maps.input is not None
    assert both.parameters is not None
    assert layers.parameters is not None
    _close(both.input.whole.fi, maps.input.whole.fi)
    assert torch.equal(both.input.whole.effective_rank, maps.input.whole.effective_rank)
    for w in WINDOWS:
        _close(both.input.maps[w].fi, maps.input.maps[w].fi)
    assert both.input.metric_map is not None
    assert maps.input.metric_map is not None
    _close(both.input.metric_map, maps.input.metric_map)
    assert torch.equal(both.target, labels)
    _close(both.log_fi_max, layers.log_fi_max)
    for name, layer in layers.parameters.layers.items():
        got = both.parameters.layers[name]
        _close(got.parameters.fi, layer.parameters.fi)
        _close(got.scale.fi, layer.scale.fi)
        _close(got.metric, layer.metric)
    _close(both.parameters.whole.fi, layers.parameters.whole.fi)
    with pytest.raises(ValueError, match="input_target must have shape"):
        sensitivity(model, x, labels, input_target=labels[:2], windows=WINDOWS)
