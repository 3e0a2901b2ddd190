"""Brute-force FI of a sample with many positions or many sigmoids, by enumerating its outcomes.

The perturbation family is the logits themselves (J = I, so every logit direction is
reachable), and the metric is the Fisher information of the sample's joint likelihood computed
from its definition: G = Σ_o P(o) ∇ log P(o) ∇ log P(o)ᵀ over every joint outcome o of its
positions, with FI = ∇fᵀ G⁺ ∇f for f = log P(labels) (docs/derivations.md, "Many positions
and many sigmoids"). Exponential in the number of positions: a test oracle for a handful.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["enumerated_fi"]


def enumerated_fi(logits: Tensor, labels: Tensor, sigmoid: bool = False) -> float:
    """FI of one sample's joint likelihood under perturbations of all its logits.

    Args:
        logits: ``(P, K)``, a softmax over K classes at each of P positions, or ``(P,)``, one
            sigmoid per position (``sigmoid=True``).
        labels: ``(P,)`` class indices, or targets in [0, 1] for sigmoids.
        sigmoid: whether each position is one Bernoulli output.
    """
    z = logits.detach().to(torch.float64)
    if sigmoid:
        s = torch.sigmoid(z)
        outcomes = [
            torch.tensor(o, dtype=torch.float64) for o in itertools.product((0, 1), repeat=len(z))
        ]
        grads = [o - s for o in outcomes]  # ∇_z log P(o) for independent Bernoullis
        probs = [float(torch.prod(torch.where(o == 1, s, 1 - s))) for o in outcomes]
        gradient = labels.to(torch.float64) - s  # ∇_z of Σ t log σ + (1 − t) log(1 − σ)
    else:
        P, K = z.shape
        p = torch.softmax(z, dim=-1)
        eye = torch.eye(K, dtype=torch.float64)
        grads, probs = [], []
        for o in itertools.product(range(K), repeat=P):
            grads.append(torch.cat([eye[k] - p[t] for t, k in enumerate(o)]))
            probs.append(float(torch.prod(torch.stack([p[t, k] for t, k in enumerate(o)]))))
        gradient = torch.cat([eye[int(k)] - p[t] for t, k in enumerate(labels)])
    metric = sum(w * torch.outer(g, g) for w, g in zip(probs, grads, strict=True))
    return float(gradient @ torch.linalg.pinv(metric, hermitian=True) @ gradient)
