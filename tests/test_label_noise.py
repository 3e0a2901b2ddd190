"""Every label's closed form, the evidence over training, and the counterfactual-label rule."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from lightning_sens.core import closed_form_fi
from lightning_sens.flagging import flag
from lightning_sens.label_noise import LabelEvidence, estimate_noise, label_log_fi
from tests.checks import assert_close


def test_label_log_fi_is_the_closed_form_of_every_label() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    logits[0] = torch.tensor([0.0, 80.0, 0.0, -3.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    scores = label_log_fi(logits)
    for k in range(7):
        target = torch.full((50,), k, dtype=torch.long)
        assert_close(f"label {k}", scores[:, k], closed_form_fi(logits, target).log_fi_max, 1e-13)


def test_label_log_fi_at_extreme_margins_against_250_digit_arithmetic() -> None:
    mpmath.mp.dps = 250
    z = [0.0, 60.0, -700.0, 30.0]
    scores = label_log_fi(torch.tensor([z], dtype=torch.float32))[0]
    for k in range(4):
        others = mpmath.fsum(mpmath.exp(mpmath.mpf(z[j])) for j in range(4) if j != k)
        exact = float(mpmath.log(others) - z[k])
        assert math.isclose(float(scores[k]), exact, rel_tol=1e-14, abs_tol=1e-14)


def test_evidence_sums_every_step_per_sample_in_any_order() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 3, generator=g, dtype=torch.float64)
    evidence = LabelEvidence.empty(3)
    evidence.update(torch.tensor([4, 9, 2]), torch.tensor([0, 1, 2]), scores[:3])
    evidence.update(torch.tensor([9, 7, 4]), torch.tensor([1, 0, 0]), scores[3:])
    assert evidence.ids.tolist() == [2, 4, 7, 9]
    assert evidence.seen.tolist() == [1, 2, 1, 2]
    assert evidence.labels.tolist() == [2, 0, 0, 1]
    assert_close("sample 4", evidence.mean[1], (scores[0] + scores[5]) / 2)
    assert_close("sample 9", evidence.mean[3], (scores[1] + scores[3]) / 2)
    restored = LabelEvidence.from_state_dict(evidence.state_dict())
    assert torch.equal(restored.total, evidence.total)
    with pytest.raises(ValueError, match="holds 3 classes, got scores of shape \\(1, 4\\)"):
        evidence.update(torch.tensor([1]), torch.tensor([0]), torch.zeros(1, 4))


def _population(n: int, wrong: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a model that knows the true class; ``wrong`` of the labels moved elsewhere."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 5, generator=g, dtype=torch.float64)
    logits[torch.arange(n), true] += 4 + torch.randn(n, generator=g, dtype=torch.float64)
    labels = true.clone()
    bad = torch.rand(n, generator=g) < wrong
    labels[bad] = (true[bad] + torch.randint(1, 5, (int(bad.sum()),), generator=g)) % 5
    return logits, labels, bad


def test_rule_is_quiet_on_clean_labels_and_counts_wrong_ones() -> None:
    logits, labels, _ = _population(4000, 0.0, seed=2)
    clean = estimate_noise(label_log_fi(logits), labels)
    assert clean.flagged.float().mean() < 0.005
    for wrong in (0.05, 0.2, 0.3):  # at 40 % of 5 classes, a class can pass half: refused
        logits, labels, bad = _population(4000, wrong, seed=3)
        found = estimate_noise(label_log_fi(logits), labels)
        share = float(found.estimated.sum()) / len(labels)
        assert abs(share - float(bad.float().mean())) < 0.2 * wrong + 0.005, (wrong, share)
        hits = int((found.flagged & bad).sum())
        assert hits >= 0.9 * int(found.flagged.sum())  # precision
        assert hits >= 0.8 * int(bad.sum())  # recall
        p = found.p_bad
        assert ((p >= 0) & (p <= 1)).all()
        own = label_log_fi(logits)[torch.arange(len(labels)), labels]
        for k in range(5):  # within a class, confidence never rises as the score falls
            order = own[labels == k].argsort(descending=True)
            ranked = p[labels == k][order]
            assert (ranked[1:] <= ranked[:-1]).all()


def test_rule_refuses_classes_the_model_does_not_separate() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(600, 3, generator=g, dtype=torch.float64) * 0.01  # an untrained model
    labels = torch.randint(0, 3, (600,), generator=g)
    found = estimate_noise(label_log_fi(logits), labels)
    assert not found.flagged.any()
    assert found.unseparated == [0, 1, 2]
    assert found.p_bad.isnan().all()


def test_earlier_estimates_keep_memorised_labels_flagged() -> None:
    logits, labels, bad = _population(3000, 0.2, seed=5)
    scores = label_log_fi(logits)
    early = estimate_noise(scores, labels).per_cell
    memorised = scores.clone()
    memorised[bad] -= 3.0  # training pulls the wrong labels' scores down
    late = estimate_noise(memorised, labels)
    kept = estimate_noise(memorised, labels, at_least=early)
    assert int(kept.flagged.sum()) == int(early.sum()) > int(late.flagged.sum())
    decision = flag(
        memorised[torch.arange(3000), labels],
        label_scores=memorised,
        labels=labels,
        at_least=early,
    )
    assert torch.equal(decision.flagged, kept.flagged)
    assert decision.estimated_share == pytest.approx(int(early.sum()) / 3000)
    assert torch.equal(decision.cutoff, kept.cutoff)


def test_pairs_rule_finds_swaps_between_similar_classes() -> None:
    g = torch.Generator().manual_seed(6)
    n = 6000
    true = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 5, generator=g, dtype=torch.float64)
    logits[torch.arange(n), true] += 5.0
    similar = true < 2  # classes 0 and 1 look alike: the partner's logit is raised too
    logits[similar, 1 - true[similar]] += 2.0
    labels = true.clone()
    swap = similar & (torch.rand(n, generator=g) < 0.2)
    labels[swap] = 1 - true[swap]
    scores = label_log_fi(logits)
    pooled = estimate_noise(scores, labels)
    pairs = estimate_noise(scores, labels, pairs=True)
    assert int((pooled.flagged & swap).sum()) < 0.5 * int(swap.sum())  # the pooled rule misses
    hits = int((pairs.flagged & swap).sum())
    assert hits >= 0.8 * int(swap.sum())
    assert hits >= 0.8 * int(pairs.flagged.sum())
    assert int(pairs.per_cell[0, 1]) + int(pairs.per_cell[1, 0]) == int(pairs.estimated[:2].sum())
    clean = estimate_noise(scores, true, pairs=True)  # the same model, every label right
    assert clean.flagged.float().mean() < 0.01
