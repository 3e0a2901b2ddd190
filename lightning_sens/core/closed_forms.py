"""The measure from the logits alone: the class it uses, c = ∂ log p_y/∂z, and the closed form.

For f = log p_y (docs/method.md, "The measure"), every quantity of a sample that does not depend
on the perturbation family comes from its logits z ∈ R^K: the class y (the label, or the argmax
for "pred"), p_y, c = e_y − p, and the largest FI any family can reach, (1 − p_y)/p_y, which
every family of full rank K − 1 attains (docs/method.md, "Two facts you must know").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_sens.core.inputs import logits_of
from lightning_sens.core.validation import check_logits, check_target, class_indices

__all__ = ["ClosedFormFI", "Target", "closed_form_fi", "log_prob_gradient", "resolve_target"]

Target = Tensor | Literal["pred"]


@dataclass(frozen=True)
class ClosedFormFI:
    """Whole-family FI from the logits alone, for f = log p_y (docs/method.md, "Two facts you
    must know").

    Its fields are named as the same quantities of
    :class:`~lightning_sens.core.results.SensitivityResult`.

    Attributes:
        target: the class y of each sample (int64, ``(B,)``): the given label or the argmax.
        p_target: p_y (float64, ``(B,)``).
        log_fi_max: log FI = log((1 − p_y) / p_y) = logsumexp_{k≠y}(z_k − z_y) (float64,
            ``(B,)``), accurate at any logit margin: the largest FI of any family, reached by
            every family of full rank K − 1.
    """

    target: Tensor
    p_target: Tensor
    log_fi_max: Tensor

    @property
    def fi(self) -> Tensor:
        """FI = (1 − p_y) / p_y; overflows to inf only beyond float64's range."""
        return torch.exp(self.log_fi_max)


def resolve_target(logits: Tensor, target: Target, name: str = "target") -> Tensor:
    """The class index y per sample: ``target`` as class indices (0/1 float or bool labels and
    ``(B, 1)`` labels converted by :func:`~lightning_sens.core.validation.class_indices`), or
    the argmax of the logits for "pred"."""
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(
                f"{name} must be a tensor of class indices or the string 'pred', got {target!r}."
            )
        return logits.argmax(dim=-1)
    return class_indices(target, name).to(logits.device)


def log_prob_gradient(probs: Tensor, target: Tensor) -> Tensor:
    """c = ∂ log p_y / ∂z = e_y − p, shape ``(..., K)``."""
    c = -probs
    return c.scatter_add(-1, target.unsqueeze(-1), torch.ones_like(c[..., :1]))


def closed_form_fi(logits: Tensor, target: Target) -> ClosedFormFI:
    """Whole-family FI for f = log p_y from the logits: (1 − p_y) / p_y, in log space.

    This is the exact FI of any perturbation family whose Gram has full rank K − 1, e.g. the
    whole input (Setups 1 and 3) or all parameters (docs/method.md, "Two facts you must know").
    It costs nothing once the logits exist. Computed as log FI = logsumexp_{k≠y}(z_k − z_y) in
    float64, so it stays exact at logit margins where (1 − p)/p in float32 is 0.

    Args:
        logits: ``(B, K)`` logits, any floating dtype; one binary logit ``(B,)`` or ``(B, 1)``
            is the two-class model ``(0, z)`` (docs/method.md, "Binary classifiers with one
            logit"), where log FI = −z for y = 1 and z for y = 0.
        target: ``(B,)`` true labels (Setups 1, 2) or ``"pred"`` for the predicted class (3, 4).
            Integer class indices, or the 0/1 labels of a binary classifier (float or bool,
            ``(B,)`` or ``(B, 1)``).

    Example:
        >>> z = torch.tensor([[0.0, 60.0, 0.0], [2.0, 0.0, 0.0]])
        >>> closed_form_fi(z, torch.tensor([1, 0])).log_fi_max  # log(2 e^-60), log(2 e^-2)
        tensor([-59.3069,  -1.3069], dtype=torch.float64)
    """
    logits = logits_of(logits)
    check_logits(logits)
    y = resolve_target(logits, target)
    check_target(y, logits)
    z = logits.detach().to(torch.float64)
    z_y = z.gather(-1, y.unsqueeze(-1))
    others = (z - z_y).scatter(-1, y.unsqueeze(-1), float("-inf"))
    log_fi_max = torch.logsumexp(others, dim=-1)
    p_target = torch.log_softmax(z, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).exp()
    return ClosedFormFI(target=y, p_target=p_target, log_fi_max=log_fi_max)
