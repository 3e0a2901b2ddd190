"""K-space FI against brute force and 250-digit arithmetic; the closed forms of docs/method.md."""

from __future__ import annotations

import mpmath
import pytest
import torch

from lightning_sens import (
    closed_form_fi,
    contrast_basis,
    fi_along_direction,
    fi_from_gram,
    log_prob_gradient,
    metric_frame,
)
from lightning_sens.reference import fi_from_jacobian


def _random_case(
    K: int, m: int, seed: int, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(K, m, dtype=torch.float64, generator=generator)
    p = torch.softmax(scale * torch.randn(K, dtype=torch.float64, generator=generator), -1)
    return J, p


@pytest.mark.parametrize("K", [2, 3, 6, 10])
@pytest.mark.parametrize("m", [1, 2, 4, 12])
def test_fi_from_gram_matches_brute_force(K: int, m: int) -> None:
    for seed in range(3):
        J, p = _random_case(K, m, seed)
        for y in range(K):
            c = log_prob_gradient(p, torch.tensor(y))
            got = fi_from_gram(J @ J.T, p, c)
            want_fi, want_rank = fi_from_jacobian(J, p, c)
            assert int(got.effective_rank) == int(want_rank) == min(m, K - 1)
            torch.testing.assert_close(got.fi, want_fi, rtol=1e-10, atol=0)


def test_fi_from_gram_is_batched_over_leading_dims() -> None:
    J = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    p = torch.softmax(torch.randn(2, 1, 5, dtype=torch.float64), -1)
    y = torch.tensor([[1], [4]])
    c = log_prob_gradient(p, y)
    batched = fi_from_gram(J @ J.transpose(-1, -2), p, c)
    assert batched.fi.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single = fi_from_gram(J[i, j] @ J[i, j].T, p[i, 0], c[i, 0])
            torch.testing.assert_close(batched.fi[i, j], single.fi, rtol=1e-13, atol=0)


def _mp_fi(J: torch.Tensor, z: torch.Tensor, y: int) -> float:
    """FI with 250 significant digits (J of full column rank m ≤ K − 1)."""
    with mpmath.workdps(250):
        K = len(z)
        Jm = mpmath.matrix(J.tolist())
        top = max(mpmath.mpf(float(v)) for v in z)
        e = [mpmath.exp(mpmath.mpf(float(v)) - top) for v in z]
        p = [v / sum(e) for v in e]
        H = mpmath.matrix(K, K)
        for i in range(K):
            for j in range(K):
                H[i, j] = (p[i] if i == j else 0) - p[i] * p[j]
        c = mpmath.matrix([(1 if k == y else 0) - p[k] for k in range(K)])
        g = Jm.T * c
        return float((g.T * mpmath.inverse(Jm.T * H * Jm) * g)[0])


@pytest.mark.parametrize("margin", [30.0, 60.0, 200.0])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_fi_is_exact_for_confident_predictions(margin: float, m: int) -> None:
    """Relative error ~1e-14 at p_y = 1 − 1e-87 and at p_y = 1e-87 (naive forms give 0 or NaN)."""
    generator = torch.Generator().manual_seed(int(margin) + m)
    K = 5
    J = torch.randn(K, m, dtype=torch.float64, generator=generator)
    z = torch.randn(K, dtype=torch.float64, generator=generator)
    z[0] += margin
    p = torch.softmax(z, -1)
    for y in (0, 1):
        c = log_prob_gradient(p, torch.tensor(y))
        got = float(fi_from_gram(J @ J.T, p, c).fi)
        want = _mp_fi(J, z, y)
        assert abs(got / want - 1) < 1e-12, (margin, m, y, got, want)
        if m == 1:
            along = float(fi_along_direction(J[:, 0], p, c).fi)
            assert abs(along / want - 1) < 1e-12, (margin, y, along, want)


def _mp_metric(J: torch.Tensor, z: torch.Tensor, y: int) -> tuple[float, float]:
    """tr(Jᵀ H J) and Σ_i cᵀ J_i with 250 significant digits."""
    with mpmath.workdps(250):
        K, m = J.shape
        top = max(mpmath.mpf(float(v)) for v in z)
        e = [mpmath.exp(mpmath.mpf(float(v)) - top) for v in z]
        p = [v / sum(e) for v in e]
        trace, slope = mpmath.mpf(0), mpmath.mpf(0)
        for i in range(m):
            u = [mpmath.mpf(float(J[k, i])) for k in range(K)]
            mean = sum(p[k] * u[k] for k in range(K))
            trace += sum(p[k] * u[k] ** 2 for k in range(K)) - mean**2
            slope += u[y] - mean
        return float(trace), float(slope)


@pytest.mark.parametrize("margin", [0.0, 30.0, 60.0, 200.0])
def test_metric_frame_is_exact_for_confident_predictions(margin: float) -> None:
    """tr(G) from the contrast Gram and per column, and cᵀu, at p_y up to 1 − 1e-87."""
    generator = torch.Generator().manual_seed(int(margin) + 7)
    K, m = 6, 9
    J = torch.randn(K, m, dtype=torch.float64, generator=generator)
    z = torch.randn(K, dtype=torch.float64, generator=generator)
    z[0] += margin
    p = torch.softmax(z, -1)
    Q = contrast_basis(K)
    columns = Q.T @ J  # (K', m): what the engine's backward products give
    for y in (0, 1):
        frame = metric_frame(p[None], log_prob_gradient(p, torch.tensor(y))[None])
        trace, slope = _mp_metric(Q @ columns, z, y)  # J's component along 1 does not count
        from_gram = float(frame.trace((columns @ columns.T)[None])[0])
        per_column = float(frame.columns(columns[None]).sum())
        along = float(frame.slope(columns[None]).sum())
        for got in (from_gram, per_column):
            assert abs(got / trace - 1) < 1e-12, (margin, y, got, trace)
        assert abs(along / slope - 1) < 1e-12, (margin, y, along, slope)


def test_no_nan_when_probabilities_underflow() -> None:
    z = torch.tensor([1000.0, 0.0, -5.0], dtype=torch.float64)
    p = torch.softmax(z, -1)
    J = torch.randn(3, 1, dtype=torch.float64)
    for y in range(3):
        out = fi_from_gram(J @ J.T, p, log_prob_gradient(p, torch.tensor(y)))
        assert not torch.isnan(out.fi).any()
        assert not torch.isnan(out.relative_fi).any()


@pytest.mark.parametrize("K", [3, 7])
def test_full_rank_gives_closed_form(K: int) -> None:
    """docs/method.md, the closed form: rank K − 1 ⇒ FI = (1 − p_y)/p_y for log p_y,
    p_y(1 − p_y) for p_y."""
    J, p = _random_case(K, K + 3, seed=K)
    for y in range(K):
        c = log_prob_gradient(p, torch.tensor(y))
        out = fi_from_gram(J @ J.T, p, c)
        assert int(out.effective_rank) == K - 1
        torch.testing.assert_close(out.fi, (1 - p[y]) / p[y], rtol=1e-11, atol=0)
        torch.testing.assert_close(out.relative_fi, torch.tensor(1.0, dtype=torch.float64))
        on_p = fi_from_gram(J @ J.T, p, p[y] * c)  # f = p_y has c = p_y (e_y − p)
        torch.testing.assert_close(on_p.fi, p[y] * (1 - p[y]), rtol=1e-11, atol=0)


def test_one_coordinate_closed_form() -> None:
    """A one-dimensional family, m = 1 ⇒ FI = (cᵀu)² / (uᵀHu); both routes agree."""
    for seed in range(5):
        J, p = _random_case(6, 1, seed)
        u = J[:, 0]
        c = log_prob_gradient(p, torch.tensor(seed % 6))
        H = torch.diag(p) - torch.outer(p, p)
        want = (c @ u) ** 2 / (u @ H @ u)
        torch.testing.assert_close(fi_along_direction(u, p, c).fi, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            fi_from_gram(torch.outer(u, u), p, c).fi, want, rtol=1e-12, atol=0
        )


def test_direction_along_ones_has_no_influence() -> None:
    p = torch.softmax(torch.randn(4, dtype=torch.float64), -1)
    c = log_prob_gradient(p, torch.tensor(2))
    u = torch.full((4,), 3.0, dtype=torch.float64)
    for out in (fi_along_direction(u, p, c), fi_from_gram(torch.outer(u, u), p, c)):
        assert float(out.fi) == 0.0
        assert int(out.effective_rank) == 0


def test_objective_scaling_and_reparameterisation() -> None:
    """FI(a·f) = a² FI(f); ω = Aτ with invertible A leaves FI unchanged (docs/method.md)."""
    J, p = _random_case(6, 3, seed=4)
    c = log_prob_gradient(p, torch.tensor(1))
    base = fi_from_gram(J @ J.T, p, c).fi
    torch.testing.assert_close(fi_from_gram(J @ J.T, p, 3.0 * c).fi, 9.0 * base, rtol=1e-12, atol=0)
    A = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    JA = J @ A
    torch.testing.assert_close(fi_from_gram(JA @ JA.T, p, c).fi, base, rtol=1e-10, atol=0)


def test_relative_fi_and_bounds() -> None:
    for seed in range(10):
        J, p = _random_case(5, 2, seed)
        c = log_prob_gradient(p, torch.tensor(seed % 5))
        whole = fi_from_gram(J @ J.T, p, c)
        sub = fi_from_gram(J[:, :1] @ J[:, :1].T, p, c)
        y = seed % 5
        bound = (1 - p[y]) / p[y]
        assert float(sub.fi) <= float(whole.fi) * (1 + 1e-12)
        assert float(whole.fi) <= float(bound) * (1 + 1e-12)
        torch.testing.assert_close(whole.relative_fi, whole.fi / bound, rtol=1e-12, atol=0)
        assert 0.0 <= float(whole.relative_fi) <= 1.0


def test_closed_form_is_exact_in_float32_at_large_margins() -> None:
    logits = torch.tensor(
        [[0.0, 60.0, -3.0], [80.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float32
    )
    out = closed_form_fi(logits, torch.tensor([1, 1, 2]))
    z = logits.double()
    want = torch.stack(
        [
            torch.logsumexp(torch.tensor([-60.0, -63.0], dtype=torch.float64), 0),
            torch.tensor(80.0, dtype=torch.float64)
            + torch.log1p(torch.exp(torch.tensor(-80.0, dtype=torch.float64))),
            torch.log(torch.tensor(2.0, dtype=torch.float64)),
        ]
    )
    torch.testing.assert_close(out.log_fi_max, want, rtol=1e-14, atol=0)
    naive = (1 - torch.softmax(logits, -1)[0, 1]) / torch.softmax(logits, -1)[0, 1]
    assert float(naive) == 0.0  # what the naive float32 formula returns
    assert float(out.fi[0]) > 0.0
    torch.testing.assert_close(
        out.p_target, torch.softmax(z, -1)[torch.arange(3), torch.tensor([1, 1, 2])]
    )
    pred = closed_form_fi(logits, "pred")
    assert pred.target.tolist() == [1, 0, 0]
    assert float(pred.log_fi_max[2]) == pytest.approx(float(torch.log(torch.tensor(2.0))))


def test_contrast_basis_is_orthonormal_and_orthogonal_to_ones() -> None:
    for K in (2, 3, 10, 100):
        Q = contrast_basis(K)
        torch.testing.assert_close(Q.T @ Q, torch.eye(K - 1, dtype=torch.float64))
        torch.testing.assert_close(
            Q.T @ torch.ones(K, dtype=torch.float64), torch.zeros(K - 1, dtype=torch.float64)
        )
