"""The engine on the device under test, in float64 and float32, against the CPU float64 result."""

from __future__ import annotations

import pytest
import torch

from lightning_sens import sensitivity
from tests.models import CASES, build

CNN, RESNET = CASES[1], CASES[2]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would make float32 results on Ampere+ GPUs far less exact than float32 arithmetic."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _cpu_result(case):
    model, x, labels = build(case, batch=4)
    return model, x, labels, sensitivity(model, x, labels, windows=(1, 3, 5))


@pytest.mark.parametrize("case", [CNN, RESNET], ids=["cnn_bn", "resnet"])
def test_float64_on_device_matches_cpu(case, device: torch.device) -> None:
    model, x, labels, want = _cpu_result(case)
    got = sensitivity(model.to(device), x.to(device), labels.to(device), windows=(1, 3, 5))
    assert got.input is not None
    assert want.input is not None
    torch.testing.assert_close(got.input.whole.fi.cpu(), want.input.whole.fi, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.input.maps[3].fi.cpu(), want.input.maps[3].fi, rtol=1e-9, atol=0)
    assert got.parameters is not None
    assert want.parameters is not None
    for name, layer in want.parameters.layers.items():
        mine = got.parameters.layers[name]
        torch.testing.assert_close(mine.parameters.fi.cpu(), layer.parameters.fi, rtol=1e-9, atol=0)
        torch.testing.assert_close(mine.scale.fi.cpu(), layer.scale.fi, rtol=1e-9, atol=0)


@pytest.mark.parametrize("case", [CNN, RESNET], ids=["cnn_bn", "resnet"])
def test_float32_model_agrees_with_float64(case, device: torch.device) -> None:
    """A float32 model's FI equals the float64 value to float32 accuracy, with the same ranks.

    Both use one rank rule: the engine forms every Gram in float64, also from float32 Jacobians
    (default_rtol).
    """
    model, x, labels = build(case, batch=4)
    want = sensitivity(model, x, labels, windows=(1, 3, 5))
    got = sensitivity(
        model.float().to(device), x.float().to(device), labels.to(device), windows=(1, 3, 5)
    )
    assert got.input is not None
    assert want.input is not None
    pairs = [(got.input.whole, want.input.whole), (got.input.position_map, want.input.position_map)]
    pairs += [(got.input.maps[w], want.input.maps[w]) for w in (1, 3, 5)]
    assert got.parameters is not None
    assert want.parameters is not None
    for name, layer in want.parameters.layers.items():
        mine = got.parameters.layers[name]
        pairs += [(mine.parameters, layer.parameters), (mine.scale, layer.scale)]
    for mine, ref in pairs:
        assert mine is not None
        assert ref is not None
        assert torch.equal(mine.effective_rank.cpu(), ref.effective_rank)
        torch.testing.assert_close(mine.fi.cpu(), ref.fi, rtol=2e-4, atol=1e-7)


@pytest.mark.gpu
def test_cuda_defaults_use_the_batched_backward() -> None:
    """On CUDA, "auto" takes the vectorised backward; it must agree with the loop."""
    model, x, labels = build(CNN, batch=4)
    model, x, labels = model.cuda(), x.cuda(), labels.cuda()
    auto = sensitivity(model, x, labels, windows=(1, 3))
    loop = sensitivity(model, x, labels, windows=(1, 3), backward="loop")
    assert auto.input is not None
    assert loop.input is not None
    torch.testing.assert_close(auto.input.maps[3].fi, loop.input.maps[3].fi, rtol=1e-10, atol=0)
