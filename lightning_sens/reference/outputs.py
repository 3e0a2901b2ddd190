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

__all__ = ["enumerated_fi", "metric_trace"]


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


def metric_trace(
    model: torch.nn.Module,
    inputs: Tensor,
    layer: str,
    *,
    class_dim: int = -1,
    sigmoid: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """tr(G_l) of layer ``layer``'s trainable parameters per sample, from the definition:
    Σ_t Σ_k p_tk ‖∇_θ log p_tk‖² over every position t (one backward pass per position and
    class), or Σ_t σ_t (1 − σ_t) ‖∇_θ z_t‖² for one sigmoid per entry. ``(B,)`` float64.

    Args:
        model: returns logits with the classes on ``class_dim`` (or one logit per entry).
        inputs: a tensor batch.
        layer: the module whose own parameters are perturbed.
        class_dim: the class axis of the logits.
        sigmoid: one sigmoid per logit entry instead of a softmax over ``class_dim``.
        mask: ``(B, *positions)``, nonzero where a position counts, or None.
    """
    params = [p for p in model.get_submodule(layer).parameters(recurse=False) if p.requires_grad]
    out = []
    for b in range(inputs.shape[0]):
        z = model(inputs[b : b + 1])[0].to(torch.float64)
        if sigmoid:
            log_probs, flat = None, z.reshape(-1)
        else:
            moved = z.movedim(class_dim - 1 if class_dim > 0 else class_dim, -1)
            log_probs = torch.log_softmax(moved.reshape(-1, moved.shape[-1]), dim=-1)
            flat = log_probs
        keep = torch.ones(flat.shape[0], dtype=torch.bool)
        if mask is not None:
            keep = mask[b].reshape(-1).bool()
        total = torch.zeros((), dtype=torch.float64)
        for t in range(flat.shape[0]):
            if not keep[t]:
                continue
            if log_probs is None:
                s = torch.sigmoid(flat[t]).detach()
                grads = torch.autograd.grad(flat[t], params, retain_graph=True)
                total += s * (1 - s) * sum(g.double().square().sum() for g in grads)
                continue
            for k in range(log_probs.shape[-1]):
                grads = torch.autograd.grad(log_probs[t, k], params, retain_graph=True)
                weight = log_probs[t, k].detach().exp()
                total += weight * sum(g.double().square().sum() for g in grads)
        out.append(total)
    return torch.stack(out)
