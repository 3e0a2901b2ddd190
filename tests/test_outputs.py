"""Outputs with many positions or many sigmoids: the layouts read from one batch, and every
position's closed form against the float64 brute force that enumerates the joint outcomes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import lightning_sens.core.outputs as outputs
import lightning_sens.core.references as references
from lightning_sens.core import OutputLayout, closed_form_fi, position_scores, read_layout
from lightning_sens.reference import enumerated_fi

F64 = torch.float64


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _softmax_case(shape: tuple[int, ...], class_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of ``shape`` (classes on ``class_dim``), labels, and the (B, P, K) logits."""
    g = _generator()
    z = torch.randn(*shape, generator=g, dtype=F64) * 3
    canonical = z.movedim(class_dim, -1)
    labels = torch.randint(0, canonical.shape[-1], canonical.shape[:-1], generator=g)
    return z, labels, canonical.reshape(shape[0], -1, canonical.shape[-1])


@pytest.mark.parametrize(
    ("shape", "class_dim"),
    [((2, 3, 4), -1), ((2, 3, 2, 2), 1), ((3, 4), -1)],
    ids=["sequence (B, T, V)", "segmentation (B, K, H, W)", "one class per sample"],
)
def test_each_position_and_the_sample_match_the_enumerated_fisher_information(
    shape: tuple[int, ...], class_dim: int
) -> None:
    z, labels, canonical = _softmax_case(shape, class_dim)
    layout = read_layout(z, labels)
    assert layout.task == "multiclass"
    scores = position_scores(z, labels, layout)
    flat_labels = labels.reshape(shape[0], -1)
    summary = scores.summary()
    for b in range(shape[0]):
        for t in range(canonical.shape[1]):
            expected = enumerated_fi(canonical[b, t : t + 1], flat_labels[b, t : t + 1])
            got = float(scores.log_fi[b, t].exp())
            assert got == pytest.approx(expected, rel=1e-9), (b, t)
        joint = enumerated_fi(canonical[b], flat_labels[b])  # the whole sample's likelihood
        assert float(summary.total[b].exp()) == pytest.approx(joint, rel=1e-9), b


def test_the_positions_agree_with_the_classifiers_closed_form() -> None:
    z, labels, canonical = _softmax_case((3, 5, 6), -1)
    scores = position_scores(z, labels, read_layout(z, labels))
    closed = closed_form_fi(canonical.reshape(-1, 6), labels.reshape(-1))
    # the same quantities by another float64 formula (fewer passes): equal to rounding
    assert torch.allclose(scores.log_fi.reshape(-1), closed.log_fi_max, rtol=1e-13, atol=1e-13)
    pred = closed_form_fi(canonical.reshape(-1, 6), "pred")
    assert torch.allclose(scores.log_fi_pred.reshape(-1), pred.log_fi_max, rtol=1e-13, atol=1e-13)
    assert torch.allclose(scores.log_p.reshape(-1).exp(), closed.p_target, rtol=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["0/1 targets", "soft targets"])
def test_multilabel_sigmoids_match_the_enumerated_fisher_information(soft: bool) -> None:
    g = _generator()
    z = torch.randn(3, 4, generator=g, dtype=F64) * 3
    targets = torch.randint(0, 2, (3, 4), generator=g).to(F64)
    targets[:, 0] = 1.0  # rows that do not all sum to one: multi-label, not one-hot
    targets[:, 1] = 1.0
    if soft:
        targets[:, 2] = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    layout = read_layout(z, targets)
    assert (layout.task, layout.positions) == ("multilabel", (4,))
    scores = position_scores(z, targets, layout)
    summary = scores.summary()
    for b in range(3):
        for k in range(4):
            expected = enumerated_fi(z[b, k : k + 1], targets[b, k : k + 1], sigmoid=True)
            assert float(scores.log_fi[b, k].exp()) == pytest.approx(expected, rel=1e-9)
        joint = enumerated_fi(z[b], targets[b], sigmoid=True)
        assert float(summary.total[b].exp()) == pytest.approx(joint, rel=1e-9)


def test_one_binary_logit_per_pixel_is_a_sigmoid_with_the_classifiers_closed_form() -> None:
    g = _generator()
    z = torch.randn(2, 1, 3, 3, generator=g, dtype=F64) * 4
    masks = torch.randint(0, 2, (2, 3, 3), generator=g)
    layout = read_layout(z, masks)
    assert (layout.task, layout.class_dim, layout.positions) == ("binary", 1, (3, 3))
    scores = position_scores(z, masks, layout)
    two_class = torch.cat([torch.zeros_like(z), z], dim=1).movedim(1, -1).reshape(-1, 2)
    closed = closed_form_fi(two_class, masks.reshape(-1))
    assert torch.allclose(scores.log_fi.reshape(-1), closed.log_fi_max, rtol=1e-12, atol=1e-12)
    pred = closed_form_fi(two_class, "pred").log_fi_max
    assert torch.allclose(scores.log_fi_pred.reshape(-1), pred, rtol=1e-12, atol=1e-12)


def test_scores_stay_exact_at_any_margin_and_in_any_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    z = torch.zeros(1, 3, 5, dtype=torch.float32)
    z[0, 0, 2] = 800.0  # p_y = 1 in float32 and float64: log FI = log(4) − 800
    z[0, 1, 0] = -800.0
    labels = torch.tensor([[2, 0, 4]])
    layout = read_layout(z, labels)
    whole = position_scores(z, labels, layout)
    assert whole.log_fi[0, 0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item() - 800)
    assert whole.log_fi[0, 1].item() == pytest.approx(800 + torch.log(torch.tensor(4.0)).item())
    monkeypatch.setattr(outputs, "_CHUNK", 5)  # one position per chunk
    chunked = position_scores(z, labels, layout)
    assert torch.equal(chunked.log_fi, whole.log_fi)
    assert torch.equal(chunked.log_p, whole.log_p)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_classes_first_in_memory_are_scored_where_they_lie_as_exactly(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segmentation model's (B, K, H, W) logits are reduced over their class axis in place;
    the same logits with the classes last in memory take the (positions, classes) path. Both
    equal log FI_y = logsumexp_{k ≠ y} z_k − z_y in float64, also where every other class
    underflows, and any chunking of the samples gives the same scores."""
    g = _generator()
    z = (torch.randn(3, 5, 4, 4, generator=g, dtype=F64) * 3).to(dtype)
    z[0, 2, 1, 1] = 800.0  # the others underflow: log FI by log-sum-exp
    z[1, :, 0, 0] = -800.0
    z[1, 3, 0, 0] = 0.0
    labels = torch.randint(0, 5, (3, 4, 4), generator=g)
    labels[0, 1, 1], labels[1, 0, 0] = 2, 3
    layout = read_layout(z, labels)
    native = position_scores(z, labels, layout)
    last = position_scores(z.contiguous(memory_format=torch.channels_last), labels, layout)
    flat_z = z.double().movedim(1, -1).reshape(3, 16, 5)
    flat_y = labels.reshape(3, 16)
    own = flat_z.gather(-1, flat_y.unsqueeze(-1)).squeeze(-1)
    others = flat_z.scatter(-1, flat_y.unsqueeze(-1), float("-inf")).logsumexp(-1)
    expected = others - own
    tolerance = 1e-12 if dtype == F64 else 1e-6
    for found in (native, last):
        torch.testing.assert_close(found.log_fi, expected, rtol=tolerance, atol=tolerance)
        assert torch.equal(found.predicted, flat_z.argmax(-1))
    for name in ("log_fi", "log_fi_pred", "log_p"):
        torch.testing.assert_close(getattr(native, name), getattr(last, name), rtol=1e-6, atol=0)
    monkeypatch.setattr(outputs, "_CHUNK", 5 * 16)  # one sample per chunk
    chunked = position_scores(z, labels, layout)
    for name in ("log_fi", "log_fi_pred", "log_p"):
        assert torch.equal(getattr(chunked, name), getattr(native, name)), name


def test_the_summary_reduces_over_the_valid_positions_only() -> None:
    z, labels, _ = _softmax_case((3, 6, 4), -1)
    labels[0, :2] = -100
    labels[2, :] = -100  # a sample without one valid position
    scores = position_scores(z, labels, read_layout(z, labels))
    summary = scores.summary(quantile=0.75)
    assert summary.count.tolist() == [4, 6, 0]
    kept = scores.log_fi[0, 2:]
    assert torch.isnan(scores.log_fi[0, :2]).all()
    assert summary.mean[0].item() == pytest.approx(kept.mean().item(), rel=1e-12)
    assert summary.upper[0].item() == pytest.approx(torch.quantile(kept, 0.75).item(), rel=1e-12)
    assert summary.worst[0].item() == 2 + int(kept.argmax())
    assert summary.loss[0].item() == pytest.approx(-scores.log_p[0, 2:].mean().item())
    assert torch.isnan(summary.mean[2])
    assert torch.isnan(summary.total[2])
    assert summary.worst[2].item() == -1
    with pytest.raises(ValueError, match="quantile must lie in"):
        scores.summary(quantile=1.5)


def test_an_attention_mask_skips_the_padding() -> None:
    z, labels, _ = _softmax_case((2, 5, 4), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scores = position_scores(z, labels, read_layout(z, labels), mask=mask)
    assert scores.valid.tolist() == mask.bool().tolist()
    assert scores.summary().count.tolist() == [3, 5]


def test_a_causal_language_model_scores_the_next_token_as_its_own_loss_does() -> None:
    g = _generator()
    ids = torch.randint(0, 7, (2, 6), generator=g)
    z = torch.randn(2, 6, 7, generator=g, dtype=F64)
    labels = ids.clone()
    labels[1, 4:] = -100  # padding, as a data collator marks it
    layout = read_layout(z, labels, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert layout.shift
    scores = position_scores(z, labels, layout)
    assert scores.positions == (5,)
    loss = torch.nn.functional.cross_entropy(
        z[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none"
    ).reshape(2, 5)
    valid = labels[:, 1:] != -100
    assert torch.allclose(-scores.log_p[valid], loss[valid], rtol=1e-12)
    # labels that are not the inputs (a token classifier, or a masked language model whose
    # labels keep the original tokens where the inputs hold the mask token) are not shifted
    masked = ids.clone()
    masked[:, 2] = 0
    labels = torch.where(masked != ids, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0] + 1  # a position whose label differs from its input
    assert not read_layout(z, labels, {"input_ids": masked}).shift


def test_lightnings_demo_language_models_fold_the_positions_into_the_batch() -> None:
    z, labels, canonical = _softmax_case((2, 4, 9), -1)
    flat = torch.log_softmax(canonical.reshape(-1, 9), dim=-1)  # (B·T, V) log-probabilities
    layout = read_layout(flat, labels, inputs=labels + 1)
    assert (layout.flattened, layout.positions, layout.shift) == (True, (4,), False)
    scores = position_scores(flat, labels, layout)
    direct = position_scores(z, labels, read_layout(z, labels))
    assert torch.allclose(scores.log_fi, direct.log_fi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("logits", "labels", "expected"),
    [
        ((4, 3), (4,), OutputLayout("multiclass", -1, ())),
        ((4,), (4,), OutputLayout("binary", -1, ())),
        ((4, 1), (4, 1), OutputLayout("binary", -1, ())),
        ((4, 8, 50), (4, 8), OutputLayout("multiclass", -1, (8,), ignore_index=(-100, 255))),
        ((4, 300, 8), (4, 8), OutputLayout("multiclass", 1, (8,), ignore_index=(-100,))),
        ((4, 5, 6, 6), (4, 6, 6), OutputLayout("multiclass", 1, (6, 6), ignore_index=(-100, 255))),
        ((4, 6, 6, 6), (4, 6, 6), OutputLayout("multiclass", 1, (6, 6), ignore_index=(-100, 255))),
        ((4, 6, 6), (4, 6), OutputLayout("multiclass", -1, (6,), ignore_index=(-100, 255))),
        ((32, 300), (4, 8), OutputLayout("multiclass", -1, (8,), True, ignore_index=(-100,))),
    ],
)
def test_layouts_are_read_from_the_shapes(
    logits: tuple[int, ...], labels: tuple[int, ...], expected: OutputLayout
) -> None:
    classes = 2 if len(logits) == 1 or logits[-1] == 1 else min(logits[1], logits[-1])
    found = read_layout(torch.zeros(logits), torch.randint(0, classes, labels))
    assert found == expected


def test_255_is_skipped_in_masks_only_where_it_cannot_be_a_class() -> None:
    z = torch.zeros(1, 300, 4)  # a 300-token vocabulary: 255 is a token
    labels = torch.tensor([[255, 3, -100, 7]])
    scores = position_scores(z.movedim(1, -1), labels, read_layout(z.movedim(1, -1), labels))
    assert scores.valid.tolist() == [[True, True, False, True]]
    custom = read_layout(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2).long(), ignore_index=0)
    assert custom.ignore_index == (0,)


def test_unreadable_layouts_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"task='multilabel'.*argmax"):
        read_layout(torch.zeros(4, 3), torch.eye(3)[[0, 1, 2, 0]])  # one-hot rows
    layout = read_layout(torch.zeros(4, 3), torch.eye(3)[[0, 1, 2, 0]], task="multilabel")
    assert layout.task == "multilabel"
    with pytest.raises(ValueError, match=r"logits of shape \(4, 3, 5\) against labels of shape"):
        read_layout(torch.zeros(4, 3, 5), torch.zeros(4, 7).long())
    with pytest.raises(ValueError, match="task must be one of"):
        read_layout(torch.zeros(4, 3), torch.zeros(4).long(), task="segmentation")
    z = torch.zeros(2, 4, 5)
    labels = torch.tensor([[0, 1, 2, 9], [0, 1, -100, 3]])
    with pytest.raises(ValueError, match=r"\[9\] outside \[0, 5\).*ignore_index"):
        position_scores(z, labels, read_layout(z, labels))
    targets = torch.tensor([[0.0, 1.5, 1.0]])
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got \[1.5\]"):
        position_scores(torch.zeros(1, 3), targets, read_layout(torch.zeros(1, 3), targets))


def test_float32_logits_are_scored_to_their_own_accuracy() -> None:
    """Float32 logits are exponentiated and summed in float32 (four passes instead of a float64
    copy): within 1e-5 of the float64 computation of the same values, a 50,000-token vocabulary
    included, whose sums run over 50,000 terms."""
    g = _generator()
    for vocab in (7, 2048, 50_000):
        z = torch.randn(2, 6, vocab, generator=g) * 4
        labels = torch.randint(0, vocab, (2, 6), generator=g)
        labels[:, 0] = z[:, 0].argmax(-1)  # the most probable class too
        layout = read_layout(z, labels)
        single = position_scores(z, labels, layout)
        double = position_scores(z.double(), labels, layout)
        for name in ("log_fi", "log_fi_pred", "log_p"):
            a, b = getattr(single, name), getattr(double, name)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (vocab, name, (a - b).abs().max())


def _brute_reference(canonical: Tensor, labels: Tensor, right: bool = False) -> Tensor:
    """Per class k: the (lower) median of log((1 − p_k) / p_k) over the positions labelled
    otherwise (``right``: labelled k), one position at a time from the softmax's definition."""
    classes = canonical.shape[-1]
    flat, y = canonical.reshape(-1, classes), labels.reshape(-1)
    out = []
    for k in range(classes):
        values = sorted(
            float(torch.log1p(-p[k]) - torch.log(p[k]))
            for z, label in zip(flat, y, strict=True)
            if (int(label) == k) == right
            for p in [torch.softmax(z, -1)]
        )
        empty = float("-inf") if right else float("inf")
        out.append(values[(len(values) - 1) // 2] if values else empty)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("select", [64, 0], ids=["a selection per class", "one sort"])
def test_the_reference_is_each_classs_median_over_the_positions_labelled_otherwise(
    select: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(references, "_SELECT_COLUMNS", select)
    z, labels, canonical = _softmax_case((3, 4, 5, 2), class_dim=1)  # K = 4, 10 pixels each
    layout = read_layout(z, labels)
    reference = references.label_reference(z, labels, layout)
    assert reference is not None
    wrong, right = _brute_reference(canonical, labels), _brute_reference(canonical, labels, True)
    torch.testing.assert_close(reference.wrong, wrong, rtol=0, atol=1e-12)
    torch.testing.assert_close(reference.right, right, rtol=0, atol=1e-12)
    # a class that no position of another class scores has no reference: +inf; a class
    # without positions no right one: -inf
    single = references.label_reference(
        z[:, :2], labels.clamp(max=0), read_layout(z[:, :2], labels)
    )
    assert single is not None
    assert single.wrong[0] == float("inf")
    assert single.right[1] == float("-inf")


def test_the_wrong_share_is_twice_the_share_of_positions_above_their_reference() -> None:
    z, labels, canonical = _softmax_case((4, 6, 3), class_dim=-1)  # 4 sequences, V = 3
    labels[0, :2] = -100  # ignored: neither scored nor in the reference
    layout = read_layout(z, labels)
    reference = references.label_reference(z, labels, layout)
    assert reference is not None
    kept = labels != -100
    torch.testing.assert_close(
        reference.wrong, _brute_reference(canonical[kept], labels[kept]), rtol=0, atol=1e-12
    )
    scores = position_scores(z, labels, layout)
    both, first = scores.wrong_share(reference), scores.wrong_share(reference, other_class=False)
    for b in range(4):
        label_test, class_test = [], []
        for zt, y in zip(canonical[b], labels[b].tolist(), strict=True):
            if y == -100:
                continue
            p = torch.softmax(zt, -1)
            j = int(p.argmax())
            label_test.append(
                float(torch.log1p(-p[y]) - torch.log(p[y])) > float(reference.wrong[y])
            )
            fits = float(torch.log1p(-p[j]) - torch.log(p[j])) < float(reference.right[j])
            class_test.append(j != y and fits)
        n = len(label_test)
        assert first[b].item() == pytest.approx(min(2 * sum(label_test) / n, 1.0), abs=0)
        either = sum(a or c for a, c in zip(label_test, class_test, strict=True))
        assert both[b].item() == pytest.approx(min(2 * either / n, 1.0), abs=0)
    assert (both >= first).all()


def test_the_reference_takes_evenly_spaced_positions_of_a_large_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    z, labels, canonical = _softmax_case((2, 50, 3), class_dim=-1)  # 100 tokens, K = 3
    layout = read_layout(z, labels)
    monkeypatch.setattr(references, "REFERENCE_POSITIONS", 10)
    rows = torch.linspace(0, 99, 10).long()
    expected = _brute_reference(canonical.reshape(-1, 3)[rows], labels.reshape(-1)[rows])
    found = references.label_reference(z, labels, layout)
    assert found is not None
    torch.testing.assert_close(found.wrong, expected, rtol=0, atol=1e-12)


def test_binary_logits_are_a_two_class_softmax_and_large_vocabularies_have_no_reference() -> None:
    g = _generator()
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=F64) * 3
    labels = torch.randint(0, 2, (3, 4, 4), generator=g)
    layout = read_layout(z, labels)
    assert layout.task == "binary"
    two = torch.stack([torch.zeros_like(z[:, 0]), z[:, 0]], dim=-1).reshape(3, -1, 2)
    reference = references.label_reference(z, labels, layout)
    assert reference is not None
    torch.testing.assert_close(reference.wrong, _brute_reference(two, labels), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        reference.right, _brute_reference(two, labels, True), atol=1e-12, rtol=0
    )
    # the most probable class of one logit is 1 where z > 0
    assert torch.equal(position_scores(z, labels, layout).predicted, (z > 0).long().reshape(3, -1))
    vocabulary = torch.randn(1, 2, references.MAX_FLAG_CLASSES + 1)
    tokens = torch.tensor([[1, 2]])
    assert references.label_reference(vocabulary, tokens, read_layout(vocabulary, tokens)) is None


def test_every_sigmoid_of_a_multilabel_model_is_judged_against_its_own_outputs_references() -> None:
    """One sigmoid per output p: the references of p are medians over the batch's samples of
    log FI of their target at p under each value (log((1 − q)/q), q the sigmoid's probability
    of that value), split by the rounded target; a position looks wrong as a softmax's does."""
    g = _generator()
    B, P = 9, 4
    z = torch.randn(B, P, generator=g, dtype=F64) * 3
    targets = torch.randint(0, 2, (B, P), generator=g).double()
    targets[0, 1] = 0.7  # a soft target counts as 1 in the references
    targets[:, 3] = 1.0  # an output no sample has 0 at
    layout = read_layout(z, targets, task="multilabel")
    reference = references.label_reference(z, targets, layout)
    assert reference is not None
    assert reference.wrong.shape == reference.right.shape == (P, 2)

    def log_fi(value: int, zp: float) -> float:  # under a hard target, from the definition
        q = torch.sigmoid(torch.tensor(zp if value else -zp, dtype=F64))
        return float(torch.log1p(-q) - torch.log(q))

    def median(values: list[float], empty: float) -> float:
        values = sorted(values)
        return values[(len(values) - 1) // 2] if values else empty

    for p in range(P):
        for v in (0, 1):
            others = [log_fi(v, float(z[b, p])) for b in range(B) if int(targets[b, p] > 0.5) != v]
            own = [log_fi(v, float(z[b, p])) for b in range(B) if int(targets[b, p] > 0.5) == v]
            wrong, right = median(others, math.inf), median(own, -math.inf)
            assert float(reference.wrong[p, v]) == pytest.approx(wrong, abs=1e-12)
            assert float(reference.right[p, v]) == pytest.approx(right, abs=1e-12)
    assert reference.wrong[3, 1] == float("inf")
    assert reference.right[3, 0] == float("-inf")
    scores = position_scores(z, targets, layout)
    both, first = scores.wrong_share(reference), scores.wrong_share(reference, other_class=False)
    for b in range(B):
        label_test, class_test = [], []
        for p in range(P):
            t, zp = float(targets[b, p]), float(z[b, p])
            v, j = int(t > 0.5), int(zp > 0)
            label_test.append(float(scores.log_fi[b, p]) > float(reference.wrong[p, v]))
            class_test.append(j != v and log_fi(j, zp) < float(reference.right[p, j]))
        assert first[b].item() == min(2 * sum(label_test) / P, 1.0)
        either = sum(a or c for a, c in zip(label_test, class_test, strict=True))
        assert both[b].item() == min(2 * either / P, 1.0)


def test_the_upper_quantile_is_nanquantiles_on_rows_of_any_length_and_padding() -> None:
    g = _generator()
    for _ in range(200):
        rows, width = (int(torch.randint(1, n, (1,), generator=g)) for n in (6, 40))
        values = torch.randn(rows, width, generator=g, dtype=F64)
        skipped = torch.rand(rows, width, generator=g) < 0.3
        values[skipped] = float("nan")
        count = (~skipped).sum(-1)
        q = float(torch.rand(1, generator=g))
        found = outputs._row_quantile(values, count, q)
        kept = count > 0  # a row without positions is NaN in the summary, whatever this gives
        expected = torch.nanquantile(values, q, dim=-1)
        torch.testing.assert_close(found[kept], expected[kept], rtol=0, atol=1e-12)
