"""How many labels are wrong, and which: evidence from every label's FI, accumulated over training.

Pure torch, no Lightning. Four pieces (the rule and its benchmark: docs/flags.md, "The rule:
what a wrong label looks like to this model" and "Benchmark"):

- :func:`label_log_fi`: the closed form log FI = log((1 − p_k) / p_k) of the whole input for
  *every* label k at once, exact in float64 (the true-label column is Setup 1's score).
- :class:`LabelEvidence`: per sample, the mean of those scores over all the training steps that
  saw it: a soft area under the margin curve (log FI_y ≥ −margin_y), which grows more certain as
  training goes on instead of fading as the network memorises.
- :func:`estimate_noise`: per class i, the samples labelled i are compared with the scores that
  the samples of the *other* classes get under label i, i.e. with what a wrong label i looks like
  to this very model. If at most half of the wrong labels are memorised below that reference's
  median, twice the number of class-i samples above it estimates how many class-i labels are
  wrong; the highest-scoring that many are flagged. On clean data almost no sample scores like a
  wrong label, so almost nothing is flagged; no threshold is tuned. With ``pairs``, each class
  is also compared with every other class separately, on the margin between the two labels:
  it finds wrong labels between classes the model confuses, and also flags some samples it
  finds ambiguous between them.
- :func:`separation_p_value`: whether the model separates a class from its reference at all (a
  one-sided rank test at :data:`SIGNIFICANCE`). A class it does not separate, or whose estimate
  reaches half its samples, is *undecided*: nothing in it is flagged (docs/flags.md, "When the
  rule declines to decide").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MAX_ENTRIES",
    "SIGNIFICANCE",
    "LabelEvidence",
    "NoiseEstimate",
    "estimate_noise",
    "label_log_fi",
    "separation_p_value",
]

MAX_ENTRIES = 2**25
"""The most samples × classes the evidence keeps (float64: 256 MiB), e.g. 50,000 × 100 CIFAR-100
or 300,000 × 100; beyond it the monitor says so and does not keep training-set evidence."""

CELL_CUTS = (0.5, 0.75, 0.9)
"""The reference quantiles at which the pairs rule estimates a cell's count of wrong labels
(:func:`estimate_noise`): the smallest of the three estimates is kept."""

SIGNIFICANCE = 0.01
"""The level of the one-sided test that the model separates a class (or cell) from its
reference (:func:`separation_p_value`); a class it does not reject is undecided."""


def label_log_fi(logits: Tensor) -> Tensor:
    """log FI of the whole input for every label: ``(B, K)`` float64 ``log((1 − p_k) / p_k)``.

    Equal to ``closed_form_fi(logits, k).log_fi_max`` for each k: the most probable class goes
    through the same log-sum-exp of the other logits (exact at any margin), every other class
    through log(1 − p_k) with p_k ≤ 1/2, where ``log1p`` is exact.

    Example:
        >>> label_log_fi(torch.tensor([[0.0, 60.0, 0.0]]))  # log(2 e^-60) for the top class
        tensor([[ 60.0000, -59.3069,  60.0000]], dtype=torch.float64)
    """
    z = logits.detach().to(torch.float64)
    log_p = torch.log_softmax(z, dim=-1)
    out = torch.log1p(-log_p.exp()) - log_p
    top = z.argmax(dim=-1, keepdim=True)
    others = (z - z.gather(-1, top)).scatter(-1, top, float("-inf"))
    return out.scatter(-1, top, torch.logsumexp(others, dim=-1, keepdim=True))


@dataclass
class LabelEvidence:
    """Running sums of :func:`label_log_fi` per sample id, over every time a sample was scored.

    ``update`` takes the scores of one or more batches; ``mean`` is the soft area under the
    margin curve of every label. Ids are kept sorted; a sample scored twice in one epoch (a
    sampler with replacement) counts twice, as AUM counts every step.

    Attributes:
        ids: ``(M,)`` sorted sample ids.
        labels: ``(M,)`` the label each sample was last trained with.
        total: ``(M, K)`` float64 sums of log FI under every label.
        seen: ``(M,)`` how many times each sample was scored.
    """

    ids: Tensor
    labels: Tensor
    total: Tensor
    seen: Tensor

    @classmethod
    def empty(cls, num_classes: int) -> LabelEvidence:
        long = torch.zeros(0, dtype=torch.long)
        return cls(long, long.clone(), torch.zeros(0, num_classes, dtype=torch.float64), long)

    @property
    def mean(self) -> Tensor:
        """``(M, K)``: the mean log FI of every label over the steps that scored the sample."""
        return self.total / self.seen.clamp(min=1).unsqueeze(-1).to(self.total.dtype)

    def update(self, ids: Tensor, labels: Tensor, scores: Tensor) -> LabelEvidence:
        """Add ``scores`` ``(B, K)`` of samples ``ids`` trained with ``labels``; returns self."""
        if scores.shape[-1] != self.total.shape[-1]:
            raise ValueError(
                f"LabelEvidence holds {self.total.shape[-1]} classes, got scores of shape "
                f"{tuple(scores.shape)}; the number of classes cannot change during training."
            )
        every = torch.cat([self.ids, ids.cpu().long()])
        unique, where = torch.unique(every, sorted=True, return_inverse=True)
        total = torch.zeros(len(unique), scores.shape[-1], dtype=torch.float64)
        total.index_add_(0, where, torch.cat([self.total, scores.cpu().to(torch.float64)]))
        seen = torch.zeros(len(unique), dtype=torch.long)
        seen.index_add_(0, where, torch.cat([self.seen, torch.ones(len(ids), dtype=torch.long)]))
        latest = torch.zeros(len(unique), dtype=torch.long)
        latest[where] = torch.cat([self.labels, labels.cpu().long()])  # later entries win
        self.ids, self.labels, self.total, self.seen = unique, latest, total, seen
        return self

    def forget(self, part: LabelEvidence, ids: Tensor) -> LabelEvidence:
        """Take ``part``'s scores of the samples ``ids`` out of these sums (a sample's last label
        stays) and out of ``part``; returns self. Every such sample must be here and in ``part``
        and scored here more often than in ``part``."""
        ids = ids.cpu().long().unique()
        mine = torch.searchsorted(self.ids, ids)
        theirs = torch.searchsorted(part.ids, ids)
        self.total[mine] -= part.total[theirs]
        self.seen[mine] -= part.seen[theirs]
        keep = torch.ones(len(part.ids), dtype=torch.bool)
        keep[theirs] = False
        part.ids, part.labels = part.ids[keep], part.labels[keep]
        part.total, part.seen = part.total[keep], part.seen[keep]
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {"ids": self.ids, "labels": self.labels, "total": self.total, "seen": self.seen}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> LabelEvidence:
        return cls(state["ids"], state["labels"], state["total"], state["seen"])


@dataclass(frozen=True)
class NoiseEstimate:
    """Which labels :func:`estimate_noise` holds to be wrong, and how sure it is.

    Attributes:
        flagged: bool ``(N,)``.
        p_bad: ``(N,)`` the estimated share of wrong labels among the samples of the same class
            (and cell) that score at least as high: 1 − the q-value of flagging down to this
            sample (with ``pairs``, the larger of its class's and its cell's). NaN where the
            rule is undecided.
        estimated: ``(K,)`` estimated number of wrong labels per class, the number it flags
            (−1: undecided).
        per_cell: ``(K, C)`` the count of each comparison: C = 1, or C = K with ``pairs``
            (``[i, i]``: class i against all others; ``[i, j]``: the samples labelled i whose
            most likely other class is j); the class flags the union of their top-ranked
            samples. 0 where undecided.
        cutoff: ``(N,)`` the median of the class's reference (the other classes' log FI under
            its label): log FI above it looks like a wrong label (+inf where undecided).
        undecided: bool ``(K,)``: classes the rule cannot decide (:func:`separation_p_value`):
            none of their samples is flagged. A class without samples is not undecided.
        undecided_cells: bool ``(K, C)``: the same per cell that holds samples; with ``pairs``
            a class can be decided in some cells and not in others.
    """

    flagged: Tensor
    p_bad: Tensor
    estimated: Tensor
    per_cell: Tensor
    cutoff: Tensor
    undecided: Tensor
    undecided_cells: Tensor

    @property
    def undecided_classes(self) -> list[int]:
        """The classes the rule cannot decide: the model does not separate them from the
        others (or half or more of their labels would be wrong), so none is flagged."""
        return [int(k) for k in torch.nonzero(self.undecided).flatten()]


def separation_p_value(own: Tensor, reference: Tensor) -> float:
    """One-sided Mann–Whitney p-value against "``own`` scores lie below ``reference``".

    The null hypothesis is that the two are exchangeable, as they are when the model's scores
    carry no information about the labels: a small p-value says that the model separates the
    samples of ``own`` from the reference. Normal approximation of the U statistic (pairs in
    which the own score is the lower, ties counting half) with tie and continuity corrections;
    at 1 % it never rejects where the exact test would not, for every size up to 25 × 25
    without ties (docs/flags.md, "When the rule declines to decide"). 1 when either side is
    empty or every score ties.

    Example:
        >>> round(separation_p_value(torch.arange(6.0), torch.arange(6.0) + 10), 4)
        0.0025
        >>> separation_p_value(torch.arange(6.0) + 10, torch.arange(6.0)) > 0.99  # above it
        True
    """
    a = own.detach().to(torch.float64).flatten().cpu().sort().values
    r = reference.detach().to(torch.float64).flatten().cpu().sort().values
    return _p_value_sorted(a, r)


def _p_value_sorted(a: Tensor, r: Tensor, merged: Tensor | None = None) -> float:
    """:func:`separation_p_value` of two sorted float64 CPU tensors (the caller sorted them);
    ``merged``: both together, sorted, where the caller has them."""
    n, m = a.numel(), r.numel()
    if n == 0 or m == 0:
        return 1.0
    right = torch.searchsorted(r, a, side="right")
    tied = right - torch.searchsorted(r, a, side="left")
    below = float((m - right).sum()) + 0.5 * float(tied.sum())  # pairs with own < reference
    if merged is None:
        merged = torch.cat([a, r]).sort().values
    counts = torch.unique_consecutive(merged, return_counts=True)[1].to(torch.float64)
    total = n + m
    ties = float((counts**3 - counts).sum()) / (total * (total - 1))
    variance = n * m / 12 * (total + 1 - ties)
    if variance <= 0:
        return 1.0
    z = (below - n * m / 2 - 0.5) / math.sqrt(variance)
    return float(torch.special.ndtr(torch.tensor(-z, dtype=torch.float64)))


@dataclass
class _Part:
    """One comparison of :func:`estimate_noise`: the samples of class ``k`` in ``cell``, their
    statistic (higher: looks more like a wrong label), the reference's sorted statistic, and
    whether the model separates them."""

    cell: int
    members: Tensor
    values: Tensor
    reference: Tensor
    separated: bool
    cuts: tuple[float, ...]


def estimate_noise(
    scores: Tensor, labels: Tensor, at_least: Tensor | None = None, pairs: bool = False
) -> NoiseEstimate:
    """The counterfactual-label rule on per-sample log FI under every label (module docstring).

    A class is decided only when the model separates it: its samples' log FI under their label
    lies below the reference's at the :data:`SIGNIFICANCE` level (:func:`separation_p_value`),
    and fewer than half its samples would be flagged. An undecided class flags nothing and its
    ``p_bad`` is NaN (docs/flags.md, "When the rule declines to decide").

    Args:
        scores: ``(N, K)`` log FI of every label (one epoch's :func:`label_log_fi`, or the
            :attr:`LabelEvidence.mean` over training).
        labels: ``(N,)`` the given labels.
        at_least: ``(K, C)`` (or ``(K,)`` when C = 1) counts estimated earlier in training (e.g.
            the largest per-epoch estimate so far): memorisation lowers the estimate as training
            goes on, so the flagged count of a decided cell is the larger of the two. It never
            decides a class: an undecided class stays unflagged whatever it holds.
        pairs: besides the pooled comparison, split each class i into cells by the sample's most
            likely other class j and compare cell (i, j) with the samples labelled j, on the
            margin log FI(i) − log FI(j) (docs/flags.md, "Wrong labels between similar
            classes"). Its estimate is the smallest of those at the reference's median, upper
            quartile and 90th percentile (:data:`CELL_CUTS`), so that correct samples the model
            finds ambiguous, which crowd just above the reference's lower half, count less. It
            finds wrong labels between classes the model confuses (class-conditional noise),
            which the pooled reference misses, and flags the union of both; it also flags some
            correct samples of classes the model itself confuses. C = K: cell ``[i, i]`` holds
            the pooled comparison, ``[i, j]`` the cell of samples labelled i nearest to j.
    """
    x = scores.detach().to(torch.float64).cpu()
    y = labels.detach().long().cpu()
    n, num_classes = x.shape
    own = x[torch.arange(n), y]
    width = num_classes if pairs else 1
    floor = None if at_least is None else at_least.reshape(num_classes, -1).cpu()
    alternative = x.scatter(-1, y.unsqueeze(-1), float("inf")).argmin(dim=-1)
    flagged = torch.zeros(n, dtype=torch.bool)
    p_bad = torch.full((n,), float("nan"), dtype=torch.float64)
    estimated = torch.zeros(num_classes, dtype=torch.long)
    per_cell = torch.zeros(num_classes, width, dtype=torch.long)
    cutoff = torch.full((n,), float("inf"), dtype=torch.float64)
    undecided = torch.zeros(num_classes, dtype=torch.bool)
    undecided_cells = torch.zeros(num_classes, width, dtype=torch.bool)
    members_of = [torch.nonzero(y == k).flatten() for k in range(num_classes)]
    # every label's scores sorted once; a class's own and reference scores are slices of it
    column_values, column_order = x.sort(dim=0)
    for k in range(num_classes):
        mine = members_of[k]
        if mine.numel() == 0:
            continue
        column, sorted_labels = column_values[:, k], y[column_order[:, k]]
        mine_sorted = column[sorted_labels == k]
        rest = column[sorted_labels != k]  # what a wrong label k looks like to this model
        whole = _p_value_sorted(mine_sorted, rest, column) <= SIGNIFICANCE
        parts = [_Part(k if pairs else 0, mine, own[mine], rest, whole, (0.5,))]
        if pairs:  # only the cells that hold samples: K² cells, mostly empty when K is large
            sources = alternative[mine]
            for j in sources.unique().tolist():
                members = mine[sources == j]
                margin = x[members, k] - x[members, j]
                theirs = members_of[j]
                reference = (x[theirs, k] - x[theirs, j]).sort().values
                separated = whole and (
                    _p_value_sorted(margin.sort().values, reference) <= SIGNIFICANCE
                )
                parts.append(_Part(j, members, margin, reference, separated, CELL_CUTS))
        chosen, pooled_decided = [], False
        for part in parts:
            undecided_cells[k, part.cell] = not part.separated
            if part.reference.numel() == 0:
                continue
            size = part.members.numel()
            count = kept = _count(part.values, part.reference, part.cuts)
            if part.separated and floor is not None:
                kept = min(max(count, int(floor[k, part.cell])), size)
            # the premise is that fewer than half of a part's labels are wrong (an estimate of
            # half is what a part at chance gives); the counts kept earlier flag at most half
            if 2 * count >= size or 2 * kept > size:
                undecided_cells[k, part.cell] = True
                continue
            if part.separated:
                ranked, where = part.values.sort(descending=True)
                chosen.append((part.cell, part.reference, part.members[where], ranked, kept))
                pooled_decided |= part is parts[0]
        if not pooled_decided:  # the class against all others decides the class
            undecided[k] = True
            undecided_cells[k, [part.cell for part in parts]] = True
            estimated[k] = -1
            continue
        cutoff[mine] = rest[(rest.numel() - 1) // 2]
        for cell, reference, order, ranked, count in chosen:
            per_cell[k, cell] = count
            flagged[order[:count]] = True
            p_bad[order] = torch.fmax(p_bad[order], _share(reference, ranked, count))
        estimated[k] = int(flagged[mine].sum())
    return NoiseEstimate(flagged, p_bad, estimated, per_cell, cutoff, undecided, undecided_cells)


def _count(values: Tensor, reference: Tensor, cuts: tuple[float, ...]) -> int:
    """How many of ``values`` are wrong labels, if wrong labels are distributed like the sorted
    ``reference`` above each cut and correct ones sit below it: the smallest over the cuts (the
    reference's quantiles) of the number above the cut over the reference's share above it.
    With the median alone: twice the number above it, at most all of them."""
    m = reference.numel()
    if cuts == (0.5,):
        median = reference[(m - 1) // 2]
        return min(2 * int((values > median).sum()), values.numel())
    best = float("inf")
    for q in cuts:
        cut = reference[int(q * (m - 1))]
        tail = (m - int(torch.searchsorted(reference, cut, right=True))) / m
        if tail > 0:
            best = min(best, int((values > cut).sum()) / tail)
    return 0 if best == float("inf") else min(int(best + 0.5), values.numel())


def _share(reference: Tensor, ranked: Tensor, count: int) -> Tensor:
    """Per sample, for a part's statistic ``ranked`` highest first: the estimated share of
    wrong labels among the part's samples scoring at least as high, count · S_ref(s) / #{≥ s}
    (the sorted ``reference`` tells how many wrong labels to expect above any score), never
    rising as the statistic falls."""
    survival = 1 - torch.searchsorted(reference, ranked, side="left") / len(reference)
    ahead = torch.arange(1, ranked.numel() + 1, dtype=torch.float64)
    share = (count * survival.to(torch.float64) / ahead).clamp(max=1.0)
    return share.flip(0).cummax(0).values.flip(0)
