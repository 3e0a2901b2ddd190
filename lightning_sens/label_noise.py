"""How many labels are wrong, and which: evidence from every label's FI, accumulated over training.

Pure torch, no Lightning. Three pieces (the rule and its benchmark: docs/flags.md, "The rule:
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
  is compared with every other class separately: it finds wrong labels between classes the
  model confuses, and also flags samples it finds ambiguous between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_ENTRIES", "LabelEvidence", "NoiseEstimate", "estimate_noise", "label_log_fi"]

MAX_ENTRIES = 2**25
"""The most samples × classes the evidence keeps (float64: 256 MiB), e.g. 50,000 × 100 CIFAR-100
or 300,000 × 100; beyond it the monitor says so and does not keep training-set evidence."""


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
            sample. NaN in a class the model does not yet separate.
        estimated: ``(K,)`` estimated number of wrong labels per class (−1: not separated).
        per_cell: ``(K, C)`` the same per class and cell: C = 1, or C = K with ``pairs`` (cell
            ``[i, j]``: labelled i, most likely other class j).
        cutoff: ``(N,)`` the median of each sample's reference: log FI above it looks like a
            wrong label.
    """

    flagged: Tensor
    p_bad: Tensor
    estimated: Tensor
    per_cell: Tensor
    cutoff: Tensor

    @property
    def unseparated(self) -> list[int]:
        """Classes whose estimate would exceed half their samples: the model cannot tell them
        apart from other classes yet, so none of their samples is flagged."""
        return [int(k) for k in torch.nonzero(self.estimated < 0).flatten()]


def estimate_noise(
    scores: Tensor, labels: Tensor, at_least: Tensor | None = None, pairs: bool = False
) -> NoiseEstimate:
    """The counterfactual-label rule on per-sample log FI under every label (module docstring).

    Args:
        scores: ``(N, K)`` log FI of every label (one epoch's :func:`label_log_fi`, or the
            :attr:`LabelEvidence.mean` over training).
        labels: ``(N,)`` the given labels.
        at_least: ``(K, C)`` (or ``(K,)`` when C = 1) counts estimated earlier in training (e.g.
            the largest per-epoch estimate so far): memorisation lowers the estimate as training
            goes on, so the flagged count of a cell is the larger of the two.
        pairs: split each class i into cells by the sample's most likely other class j, and
            compare cell (i, j) with the samples labelled j only. This finds wrong labels between
            classes the model confuses (class-conditional noise), which the pooled reference of
            all other classes misses; it also flags samples that the model itself finds
            ambiguous between such classes, also when every label is right (docs/flags.md,
            "The rule: what a wrong label looks like to this model").
    """
    x = scores.detach().to(torch.float64).cpu()
    y = labels.detach().long().cpu()
    n, num_classes = x.shape
    own = x[torch.arange(n), y]
    width = num_classes if pairs else 1
    floor = None if at_least is None else at_least.reshape(num_classes, -1).cpu()
    if pairs:
        alternative = x.scatter(-1, y.unsqueeze(-1), float("inf")).argmin(dim=-1)
    flagged = torch.zeros(n, dtype=torch.bool)
    p_bad = torch.full((n,), float("nan"), dtype=torch.float64)
    estimated = torch.zeros(num_classes, dtype=torch.long)
    per_cell = torch.zeros(num_classes, width, dtype=torch.long)
    cutoff = torch.full((n,), float("inf"), dtype=torch.float64)
    members_of = [torch.nonzero(y == k).flatten() for k in range(num_classes)]
    for k in range(num_classes):
        mine = members_of[k]
        if pairs:  # only the cells that hold samples: K² cells, mostly empty when K is large
            sources = alternative[mine]
            cells = [
                (j, mine[sources == j], x[members_of[j], k]) for j in sources.unique().tolist()
            ]
        else:
            cells = [(0, mine, x[y != k, k])]
        found = []
        for cell, members, reference in cells:
            if members.numel() == 0 or reference.numel() == 0:
                continue
            reference = reference.sort().values
            median = reference[(reference.numel() - 1) // 2]
            count = min(2 * int((own[members] > median).sum()), members.numel())
            if floor is not None:
                count = min(max(count, int(floor[k, cell])), members.numel())
            found.append((cell, members, reference, median, count))
        total = sum(f[-1] for f in found)
        if total > mine.numel() // 2:  # more than half "wrong": the classes are not separated
            estimated[k] = -1
            continue
        estimated[k] = total
        for cell, members, reference, median, count in found:
            per_cell[k, cell] = count
            cutoff[members] = median
            order = members[own[members].argsort(descending=True)]
            flagged[order[:count]] = True
            # share of wrong labels among the samples scoring ≥ s: count · S_ref(s) / #{own ≥ s}
            survival = 1 - torch.searchsorted(reference, own[order], side="left") / len(reference)
            ahead = torch.arange(1, order.numel() + 1, dtype=torch.float64)
            share = (count * survival.to(torch.float64) / ahead).clamp(max=1.0)
            p_bad[order] = share.flip(0).cummax(0).values.flip(0)  # never rises as scores fall
    return NoiseEstimate(flagged, p_bad, estimated, per_cell, cutoff)
