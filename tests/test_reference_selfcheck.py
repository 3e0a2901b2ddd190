"""Self-checks of the float64 brute-force reference against the closed forms, the authors'
recipe and the invariances of docs/method.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sens.reference import authors_recipe_fi, fi_from_jacobian, input_fi, parameter_fi

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
    res = input_fi(model, x, tgt)
    logits = model(x)
    expected_target = tgt if target == "labels" else logits.argmax(1)
    assert torch.equal(res["target"], expected_target)
    p_y = torch.softmax(logits, 1).gather(1, expected_target[:, None])[:, 0]
    torch.testing.assert_close(res["p_target"], p_y.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(res["fi"], _closed_form(p_y).detach(), rtol=1e-9, atol=0)
    assert res["rank"].dtype == torch.int64
    assert res["rank"].tolist() == [3] * 5
    torch.testing.assert_close(res["relative_fi"], torch.ones(5, dtype=DTYPE), rtol=1e-9, atol=0)
    assert "maps" not in res


def test_large_layer_reaches_closed_form_and_all_dominates() -> None:
    model = _mlp(1)
    x = torch.randn(3, 12, dtype=DTYPE)
    y = torch.tensor([2, 0, 3])
    res = parameter_fi(model, x, y)
    assert set(res) == {"0", "2", "__all__"}
    p_y = torch.softmax(model(x), 1).gather(1, y[:, None])[:, 0].detach()
    for layer in ("0", "2", "__all__"):
        torch.testing.assert_close(res[layer]["fi"], _closed_form(p_y), rtol=1e-9, atol=0)
        assert res[layer]["rank"].tolist() == [3, 3, 3]
    for layer in ("0", "2"):
        entry = res[layer]
        assert entry["scale_fi"] is not None
        assert entry["channel_scale_fi"] is not None
        # scaling all of a Linear layer = scaling all its output channels equally ⊂ additive block
        assert (entry["scale_fi"] <= entry["channel_scale_fi"] * (1 + 1e-9) + 1e-12).all()
        assert (entry["channel_scale_fi"] <= entry["fi"] * (1 + 1e-9)).all()
    assert res["0"]["channel_scale_rank"].tolist() == [3, 3, 3]  # min(6 channels, K - 1)


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
    whole = res["fi"]
    assert res["rank"].tolist() == [3, 3]
    assert (res["relative_fi"] >= 0).all()
    assert (res["relative_fi"] <= 1 + 1e-9).all()
    assert set(res["maps"]) == {1, 3, 5}
    for w in (1, 3, 5):
        assert res["maps"][w].shape == (2, 2, 5, 5)
        assert res["map_ranks"][w].dtype == torch.int64
        assert (res["maps"][w] >= 0).all()
        assert (res["maps"][w] <= whole[:, None, None, None] * (1 + 1e-9)).all()
    # larger windows contain smaller ones (also when clipped), so FI cannot decrease
    assert (res["maps"][1] <= res["maps"][3] * (1 + 1e-9) + 1e-15).all()
    assert (res["maps"][3] <= res["maps"][5] * (1 + 1e-9) + 1e-15).all()
    assert (res["map_ranks"][1] <= 1).all()
    assert res["position_map"].shape == (2, 5, 5)
    assert (res["position_map_rank"] <= 2).all()
    assert (res["position_map"] <= whole[:, None, None] * (1 + 1e-9)).all()

    # one corner window and one pixel by hand, from an explicit input Jacobian
    model.eval()
    b, ch = 1, 1
    J = torch.autograd.functional.jacobian(lambda xb: model(xb[None])[0], x[b])  # (K, 2, 5, 5)
    p, c = _probs_and_c(model(x[b : b + 1])[0].detach(), int(y[b]))
    corner = J[:, ch, 3:5, 3:5].reshape(4, -1)  # window 3 at (4, 4) clipped to 2 × 2
    torch.testing.assert_close(res["maps"][3][b, ch, 4, 4], fi_from_jacobian(corner, p, c)[0])
    u = J[:, ch, 2, 1]
    H = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(res["maps"][1][b, ch, 2, 1], (c @ u) ** 2 / (u @ H @ u))
    pixel = J[:, :, 0, 2]
    torch.testing.assert_close(res["position_map"][b, 0, 2], fi_from_jacobian(pixel, p, c)[0])


def test_parameter_blocks_cnn() -> None:
    model = _cnn(2)
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    res = parameter_fi(model, x, "pred", layers=["1", "5", "2"])
    assert set(res) == {"1", "5", "2", "__all__"}
    assert res["2"]["fi"].tolist() == [0.0, 0.0, 0.0]  # Tanh: no parameters
    assert res["2"]["channel_scale_fi"] is None
    assert res["2"]["channel_scale_rank"] is None
    bn = res["1"]
    assert bn["rank"].tolist() == [3, 3, 3]  # 6 parameters, K - 1 = 3
    assert bn["channel_scale_rank"] is not None
    assert (bn["channel_scale_rank"] <= 3).all()
    assert (bn["scale_fi"] <= bn["channel_scale_fi"] * (1 + 1e-9) + 1e-15).all()
    assert (bn["channel_scale_fi"] <= bn["fi"] * (1 + 1e-9)).all()
    for layer in ("1", "5"):
        assert (res[layer]["fi"] <= res["__all__"]["fi"] * (1 + 1e-9)).all()

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
    torch.testing.assert_close(res0["0"]["scale_fi"][0], (c @ u) ** 2 / (u @ H @ u))


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
    plain = input_fi(model, x, "pred")["fi"]
    params = parameter_fi(model, x, "pred")["0"]["scale_fi"]
    with torch.no_grad():
        torch.testing.assert_close(input_fi(model, x, "pred")["fi"], plain)
    with torch.inference_mode():
        x_inf = x.clone()
        torch.testing.assert_close(input_fi(model, x_inf, "pred")["fi"], plain)
        torch.testing.assert_close(parameter_fi(model, x_inf, "pred")["0"]["scale_fi"], params)


def test_rejects_non_classifier_output() -> None:
    model = nn.Linear(3, 1).to(DTYPE)
    with pytest.raises(ValueError, match=r"\(1, K\)"):
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
