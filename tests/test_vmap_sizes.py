"""Sizes that coincide inside the Jacobian route, against the float64 brute-force reference.

The route takes per-sample Jacobians with ``torch.func.vmap`` over samples and over the K − 1
cotangents (docs/engine.md, "The Jacobian route"). A batching rule that lines up one of these
dimensions with the other raises when their sizes differ, and the engine then loops; it gives
wrong numbers without a word when they are equal (a batch, chunk or sub-batch of K − 1 samples)
or when one of them is 1 and broadcasts. torch 2.14's rule for prelu's backward did so with the
samples outside the cotangents; its rule for cdist's backward is wrong under any vmap over
cotangents. Most cases below failed before the route nested the vmaps the other way and checked
their numbers against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_sens import reference, sensitivity
from lightning_sens.core.routes import jacobian
from lightning_sens.core.routes.jacobian import JacobianCall, per_sample_jacobians
from tests.checks import assert_close, assert_equal
from tests.models import Affine
from tests.zoo import Prototypes

# (batch, classes, chunk_size): the coincidences of the batch, a chunk and K − 1
SIZES = {
    "batch=K-1": (4, 5, None),
    "batch=K-1=2": (2, 3, None),
    "batch=1": (1, 5, None),
    "K-1=1": (3, 2, None),
    "batch=K-1=1": (1, 2, None),
    "first chunk=K-1": (6, 5, 4),
    "last chunk=K-1": (9, 5, 5),
}


def prelu_net(classes: int) -> nn.Module:
    """A custom layer and a PReLU, both on the Jacobian route."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), Affine(3), nn.PReLU(3), nn.Flatten(), nn.Linear(3 * 4 * 4, classes)
    )


def prototype_net(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), Prototypes(48, classes))


NETS = {"prelu": prelu_net, "cdist": prototype_net}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_every_layer_matches_the_reference_when_sizes_coincide(
    net: str, sizes: tuple[int, int, int | None]
) -> None:
    _compare(net, *sizes)


def _compare(net: str, batch: int, classes: int, chunk: int | None) -> None:
    torch.manual_seed(0)
    model = NETS[net](classes).double()
    x = torch.randn(batch, 2, 5, 5, generator=torch.Generator().manual_seed(11)).double()
    labels = torch.arange(batch) % classes
    got = sensitivity(model, x, labels, inputs=False, chunk_size=chunk, channel_metric=True)
    want = reference.parameter_fi(model, x, labels)
    assert got.parameters is not None
    assert "jacobian" in {layer.method for layer in got.parameters.layers.values()}
    assert set(got.parameters.layers) == set(want.layers)
    for name, layer in got.parameters.layers.items():
        ref = want.layers[name]
        assert_close(f"{name} fi", layer.parameters.fi, ref.parameters.fi)
        assert_equal(f"{name} rank", layer.parameters.effective_rank, ref.parameters.effective_rank)
        assert_close(f"{name} scale fi", layer.scale.fi, ref.scale.fi)
        assert_close(f"{name} metric", layer.metric, ref.metric)
        assert_close(f"{name} scale metric", layer.scale_metric, ref.scale_metric)
        if ref.channel_scale is not None:
            assert layer.channel_scale is not None, name
            assert_close(f"{name} channel fi", layer.channel_scale.fi, ref.channel_scale.fi)
    assert_close("all parameters fi", got.parameters.whole.fi, want.whole.fi)


def _call(module: nn.Module, x: Tensor, cotangents: Tensor) -> JacobianCall:
    def replay(params: dict[str, Tensor], values: list[Tensor]) -> list[Tensor]:
        return [torch.func.functional_call(module, params, (values[0],))]

    return JacobianCall(replay, [x], [0], [cotangents], [0])


@pytest.mark.parametrize("K1", [1, 3, 4])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_prelu_keeps_the_vectorised_path_and_its_numbers_are_autograds(batch: int, K1: int) -> None:
    """The route's vmap runs prelu at every size (no fall back to the loop), exactly."""
    _check_prelu(batch, K1)


def test_a_sub_batch_of_k_minus_1_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route splits a chunk to bound the memory of its Jacobians, here into sub-batches of
    K' = 4 samples (4 × K' × 3 float64 numbers for PReLU's 3 weights) and one of 1."""
    monkeypatch.setattr(jacobian, "_MEMORY_BUDGET", 4 * 4 * 3 * 8)
    _check_prelu(9, 4)


def _check_prelu(batch: int, K1: int) -> None:
    torch.manual_seed(0)
    module = nn.PReLU(3).double()
    params = {"weight": module.weight.detach()}
    x = torch.randn(batch, 3, 4, dtype=torch.float64)
    cotangents = torch.randn(K1, batch, 3, 4, dtype=torch.float64)
    found, vectorised = per_sample_jacobians([_call(module, x, cotangents)], params, batch)
    assert vectorised
    for b in range(batch):
        for k in range(K1):
            w = module.weight.detach().clone().requires_grad_(True)
            out = torch.nn.functional.prelu(x[b : b + 1], w)
            (want,) = torch.autograd.grad(out, w, cotangents[k, b : b + 1])
            assert_close(f"sample {b}, cotangent {k}", found["weight"][b, k], want, 1e-12)
