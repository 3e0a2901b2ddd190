"""Self-checks of the float64 brute-force reference against the closed forms, the authors'
recipe and the invariances of docs/method.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sens.reference import (
    authors_recipe_fi,
    fi_from_jacobian,
    input_fi,
    parameter_fi,
    sensitivity,
)

DTYPE = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).to(DTYPE)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).to(DTYPE)


def _probs_and_c(logits: torch.Tensor, y: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(logits.to(DTYPE), 0)
    return p, torch.eye(len(p), dtype=DTYPE)[y] - p


def _closed_form(p_y: torch.Tensor) -> torch.Tensor:
    return (1 - p_y) / p_y


@pytest.mark.parametrize("target", ["labels", "pred"])
def test_whole_input_full_rank_closed_form(target: str) -> None:
    model = _mlp()
    x = torch.randn(5, 12, dtype=DTYPE)
    tgt = torch.tensor([0, 1, 2, 3, 1]) if target == "labels" else "pred"
    both = sensitivity(model, x, tgt, parameters=False)
    assert both.input is not None
    res = both.input.whole
    logits = model(x)
    expected_target = tgt if target == "labels" else logits.argmax(1)
    assert torch.equal(both.target, expected_target)
    p_y = torch.softmax(logits, 1).gather(1, expected_target[:, None])[:, 0]
    torch.testing.assert_close(both.p_target, p_y.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(both.log_fi_max, _closed_form(p_y).log().detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(res.fi, _closed_form(p_y).detach(), rtol=1e-9, atol=0)
    assert res.effective_rank.dtype == torch.int64
    assert res.effective_rank.tolist() == [3] * 5
    torch.testing.assert_close(res.relative_fi, torch.ones(5, dtype=DTYPE), rtol=1e-9, atol=0)
    assert both.input.maps == {}
    assert both.input.position_map is None
    assert both.input.source == "inputs"


def test_large_layer_reaches_closed_form_and_all_dominates() -> None:
    model = _mlp(1)
    x = torch.randn(3, 12, dtype=DTYPE)
    y = torch.tensor([2, 0, 3])
    res = parameter_fi(model, x, y)
    assert set(res.layers) == {"0", "2"}
    p_y = torch.softmax(model(x), 1).gather(1, y[:, None])[:, 0].detach()
    for block in (res.layers["0"].parameters, res.layers["2"].parameters, res.whole):
        torch.testing.assert_close(block.fi, _closed_form(p_y), rtol=1e-9, atol=0)
        assert block.effective_rank.tolist() == [3, 3, 3]
    for layer in ("0", "2"):
        entry = res.layers[layer]
        assert entry.channel_scale is not None
        # scaling all of a Linear layer = scaling all its output channels equally ⊂ additive block
        assert (entry.scale.fi <= entry.channel_scale.fi * (1 + 1e-9) + 1e-12).all()
        assert (entry.channel_scale.fi <= entry.parameters.fi * (1 + 1e-9)).all()
    channel_scale = res.layers["0"].channel_scale
    assert channel_scale is not None
    assert channel_scale.effective_rank.tolist() == [3, 3, 3]  # min(6 channels, K - 1)


def test_one_coordinate_formula() -> None:
    torch.manual_seed(3)
    for y in range(5):
        p, c = _probs_and_c(torch.randn(5), y)
        u = torch.randn(5, 1, dtype=DTYPE)
        H = torch.diag(p) - torch.outer(p, p)
        fi, rank = fi_from_jacobian(u, p, c)
        expected = (c @ u[:, 0]) ** 2 / (u[:, 0] @ H @ u[:, 0])
        torch.testing.assert_close(fi, expected, rtol=1e-10, atol=0)
        assert int(rank) == 1
    # a constant logit shift is invisible to the softmax: G = 0, so FI = rank = 0
    fi, rank = fi_from_jacobian(torch.ones(5, 1, dtype=DTYPE), p, c)
    assert float(fi) == 0.0
    assert int(rank) == 0
    # ... while a shift plus a small genuine component is kept
    u = torch.ones(5, dtype=DTYPE) + 1e-3 * torch.eye(5, dtype=DTYPE)[2]
    fi, rank = fi_from_jacobian(u[:, None], p, c)
    torch.testing.assert_close(fi, (c @ u) ** 2 / (u @ H @ u), rtol=1e-6, atol=0)
    assert int(rank) == 1
    fi, rank = fi_from_jacobian(torch.zeros(5, 0, dtype=DTYPE), p, c)
    assert float(fi) == 0.0
    assert int(rank) == 0


def test_reparameterisation_invariance() -> None:
    torch.manual_seed(4)
    for m in (1, 2, 4, 9):
        p, c = _probs_and_c(torch.randn(6) * 2, 1)
        J = torch.randn(6, m, dtype=DTYPE)
        A = torch.randn(m, m, dtype=DTYPE) + 3 * torch.eye(m, dtype=DTYPE)
        fi, rank = fi_from_jacobian(J, p, c)
        fi_a, rank_a = fi_from_jacobian(J @ A, p, c)
        torch.testing.assert_close(fi_a, fi, rtol=1e-9, atol=0)
        assert int(rank_a) == int(rank) == min(m, 5)


def test_input_maps_sub_blocks_bounded_by_whole() -> None:
    model = _cnn()
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE)
    y = torch.tensor([1, 3])
    res = input_fi(model, x, y, windows=(1, 3, 5))
    whole = res.whole.fi
    assert res.whole.effective_rank.tolist() == [3, 3]
    assert (res.whole.relative_fi >= 0).all()
    assert (res.whole.relative_fi <= 1 + 1e-9).all()
    assert set(res.maps) == {1, 3, 5}
    maps = {w: res.maps[w].fi for w in res.maps}
    for w in (1, 3, 5):
        assert maps[w].shape == (2, 2, 5, 5)
        assert res.maps[w].effective_rank.dtype == torch.int64
        assert (maps[w] >= 0).all()
        assert (maps[w] <= whole[:, None, None, None] * (1 + 1e-9)).all()
        assert (res.maps[w].relative_fi <= 1 + 1e-9).all()
    # larger windows contain smaller ones (also when clipped), so FI cannot decrease
    assert (maps[1] <= maps[3] * (1 + 1e-9) + 1e-15).all()
    assert (maps[3] <= maps[5] * (1 + 1e-9) + 1e-15).all()
    assert (res.maps[1].effective_rank <= 1).all()
    position = res.position_map
    assert position is not None
    assert position.fi.shape == (2, 5, 5)
    assert (position.effective_rank <= 2).all()
    assert (position.fi <= whole[:, None, None] * (1 + 1e-9)).all()

    # one corner window and one pixel by hand, from an explicit input Jacobian
    model.eval()
    b, ch = 1, 1
    J = torch.autograd.functional.jacobian(lambda xb: model(xb[None])[0], x[b])  # (K, 2, 5, 5)
    p, c = _probs_and_c(model(x[b : b + 1])[0].detach(), int(y[b]))
    corner = J[:, ch, 3:5, 3:5].reshape(4, -1)  # window 3 at (4, 4) clipped to 2 × 2
    torch.testing.assert_close(maps[3][b, ch, 4, 4], fi_from_jacobian(corner, p, c)[0])
    u = J[:, ch, 2, 1]
    H = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(maps[1][b, ch, 2, 1], (c @ u) ** 2 / (u @ H @ u))
    pixel = J[:, :, 0, 2]
    torch.testing.assert_close(position.fi[b, 0, 2], fi_from_jacobian(pixel, p, c)[0])


def test_parameter_blocks_cnn() -> None:
    model = _cnn(2)
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    res = parameter_fi(model, x, "pred", layers=["1", "5", "2"])
    assert set(res.layers) == {"1", "5", "2"}
    assert res.layers["2"].parameters.fi.tolist() == [0.0, 0.0, 0.0]  # Tanh: no parameters
    assert res.layers["2"].channel_scale is None
    bn = res.layers["1"]
    assert bn.parameters.effective_rank.tolist() == [3, 3, 3]  # 6 parameters, K - 1 = 3
    assert bn.channel_scale is not None
    assert (bn.channel_scale.effective_rank <= 3).all()
    assert (bn.scale.fi <= bn.channel_scale.fi * (1 + 1e-9) + 1e-15).all()
    assert (bn.channel_scale.fi <= bn.parameters.fi * (1 + 1e-9)).all()
    for layer in ("1", "5"):
        assert (res.layers[layer].parameters.fi <= res.whole.fi * (1 + 1e-9)).all()

    # layer scaling = the one-coordinate formula with u = ∂z/∂θ · θ (directional derivative)
    model.eval()
    conv = model[0]
    xb = x[0]
    p, c = _probs_and_c(model(xb[None])[0].detach(), int(model(xb[None])[0].argmax()))
    res0 = parameter_fi(model, xb[None], "pred", layers=["0"])

    def logits_scaled(t: torch.Tensor) -> torch.Tensor:
        params = {"0.weight": t * conv.weight, "0.bias": t * conv.bias}
        return torch.func.functional_call(model, params, (xb[None],))[0]

    u = torch.autograd.functional.jacobian(logits_scaled, torch.ones((), dtype=DTYPE))
    H = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(res0.layers["0"].scale.fi[0], (c @ u) ** 2 / (u @ H @ u))


def test_authors_recipe_converges_to_exact() -> None:
    torch.manual_seed(5)
    K, m, y = 10, 20, 0
    logits = torch.randn(K, dtype=DTYPE)
    logits[y] = torch.logsumexp(logits[1:], 0) - 5.52
    p, c = _probs_and_c(logits, y)
    assert 0.003 < float(p[y]) < 0.005
    J = torch.randn(K, m, dtype=DTYPE)
    H = torch.diag(p) - torch.outer(p, p)
    exact, rank = fi_from_jacobian(J, p, c)
    assert int(rank) == K - 1
    torch.testing.assert_close(exact, _closed_form(p[y]), rtol=1e-9, atol=0)
    regularised = authors_recipe_fi(H @ J, p, y)  # eps = 1e-3, as in the authors' code
    assert abs(float(regularised / exact) - 1) > 0.01
    tight = authors_recipe_fi(H @ J, p, y, eps=1e-8)
    torch.testing.assert_close(tight, exact, rtol=1e-4, atol=0)


def test_model_untouched_and_modes_restored() -> None:
    model = _cnn(6)
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    flags = {name: mod.training for name, mod in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE)
    y = torch.tensor([0, 2])
    input_fi(model, x, y, windows=(3,))
    parameter_fi(model, x, y)
    assert {name: mod.training for name, mod in model.named_modules()} == flags
    after = model.state_dict()
    assert set(after) == set(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())
    assert not model[0]._forward_hooks
    assert not model[5]._forward_hooks


def test_works_under_inference_mode_and_no_grad() -> None:
    model = _mlp(7)
    x = torch.randn(2, 12, dtype=DTYPE)
    plain = input_fi(model, x, "pred").whole.fi
    params = parameter_fi(model, x, "pred").layers["0"].scale.fi
    with torch.no_grad():
        torch.testing.assert_close(input_fi(model, x, "pred").whole.fi, plain)
    with torch.inference_mode():
        x_inf = x.clone()
        torch.testing.assert_close(input_fi(model, x_inf, "pred").whole.fi, plain)
        torch.testing.assert_close(parameter_fi(model, x_inf, "pred").layers["0"].scale.fi, params)


def test_rejects_non_classifier_output() -> None:
    # (B, 2, 3): not logits; a (B, 1) output is one binary logit (tests/test_binary.py)
    model = nn.Sequential(nn.Linear(3, 6), nn.Unflatten(1, (2, 3))).to(DTYPE)
    with pytest.raises(ValueError, match=r"\(1, K\).*got \(1, 2, 3\)"):
        input_fi(model, torch.randn(2, 3, dtype=DTYPE), "pred")
    with pytest.raises(ValueError, match="odd"):
        input_fi(_mlp(), torch.randn(2, 12, dtype=DTYPE), "pred", windows=(2,))


def test_authors_recipe_is_batched_over_blocks() -> None:
    generator = torch.Generator().manual_seed(4)
    Jp = torch.randn(3, 5, 7, dtype=torch.float64, generator=generator)
    p = torch.softmax(torch.randn(5, dtype=torch.float64, generator=generator), -1)
    y = torch.tensor([0, 2, 4])
    batched = authors_recipe_fi(Jp, p, y)
    assert batched.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(
            batched[i], authors_recipe_fi(Jp[i], p, int(y[i])), rtol=1e-12, atol=0
        )
