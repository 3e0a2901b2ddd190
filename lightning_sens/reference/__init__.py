"""Slow, float64, brute-force reference for the influence measure of Shu & Zhu (AAAI 2019).

This module is a test oracle: it materialises full Jacobians with plain autograd, one sample and
one logit at a time (parameters substituted with ``torch.func.functional_call``), and computes FI
from them directly, in float64, with an SVD. It favours obviously correct code over speed;
docs/method.md, "The measure", states the math.

Notation (per sample, docs/method.md, "The measure"):

- ``z ∈ R^K``: logits of one sample, ``forward_fn(model, inputs of that sample)``;
  ``p = softmax(z)`` (float64).
- ``y``: target class, the true label or ``"pred"`` (the argmax of ``z``).
- ``c = e_y − p``: gradient of ``f = log p_y`` with respect to ``z``.
- ``H = diag(p) − p pᵀ``: Hessian of the cross-entropy with respect to ``z``.
- ``J = ∂z/∂ω`` (K × m) for a perturbation ``ω ∈ R^m`` at its unperturbed value ``ω0``.
- ``G = Jᵀ H J``, ``∇f = Jᵀ c``, ``FI = ∇fᵀ G⁺ ∇f`` (dimensionless), effective rank ``rank(G)``.

Inputs are a tensor or a dict of tensors (passed as keyword arguments); outputs may carry the
logits in a ``logits`` attribute or key. A parameter shared by several modules (tied weights) is
one parameter: perturbing it perturbs every use. Besides :mod:`torch`, it imports from the core
only definitions (channel axes, how inputs reach the model, the result types), never its
computations.

Its results are the engine's own types (:class:`~lightning_sens.core.results.SensitivityResult`,
``InputFI``, ``ParameterFI``, ``LayerFI``, ``BlockFI``), so that the two can be compared field by
field; :func:`parameter_fi` says which field it cannot compute and what it holds instead.
"""

from lightning_sens.reference.inputs import input_fi
from lightning_sens.reference.measure import authors_recipe_fi, fi_from_jacobian, jacobian
from lightning_sens.reference.outputs import enumerated_fi, metric_trace
from lightning_sens.reference.parameters import parameter_fi
from lightning_sens.reference.result import sensitivity

__all__ = [  # noqa: RUF022 (grouped by topic, not sorted)
    # the engine's calls, by brute force
    "sensitivity",
    "input_fi",
    "parameter_fi",
    # FI of one Jacobian
    "fi_from_jacobian",
    "jacobian",
    # many positions: the joint likelihood by enumeration, the metric's trace by definition
    "enumerated_fi",
    "metric_trace",
    # the authors' regularised recipe
    "authors_recipe_fi",
]
