"""Which layers to keep at higher precision: layers ranked by the damage that rounding their
weights to b bits would do, predicted from the metric (exact engine, or sampled labels for large
outputs) and, if asked, measured (docs/damage.md, "What the metric predicts")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_sens.core.engine import sensitivity
from lightning_sens.core.inputs import (
    ForwardFn,
    ForwardModule,
    Inputs,
    batch_size,
    default_forward,
    select,
)
from lightning_sens.core.layout import OutputLayout
from lightning_sens.core.results import ParameterFI
from lightning_sens.core.trace import DRAWS, TraceResult, sampled_metric_trace
from lightning_sens.damage import Perturbation, measure_damage, predict_damage

__all__ = ["QUANTIZATION_COLUMNS", "TraceMethod", "quantization_report", "trace_method"]


QUANTIZATION_COLUMNS = (
    "bits",
    "steps",
    "rank",
    "layer",
    "parameters",
    "predicted_kl",
    "measured_kl",
    "estimator",
)


TraceMethod = Literal["auto", "exact", "sampled"]


def trace_method(
    model: nn.Module,
    inputs: Inputs,
    forward_fn: ForwardFn | None,
    layout: OutputLayout | None,
    method: TraceMethod,
    draws: int,
) -> Literal["exact", "sampled"]:
    """How to get the layers' metrics: the exact engine where the output is one prediction of
    K classes per sample and its K − 1 backward products cost no more than ``draws`` sampled
    ones; the sampled trace otherwise (many positions, large vocabularies)."""
    if method not in ("auto", "exact", "sampled"):
        raise ValueError(f"method must be 'auto', 'exact' or 'sampled', got {method!r}.")
    if layout is not None and layout.dense:
        if method == "exact":
            raise ValueError(
                f"method='exact' needs one prediction per sample; this model's outputs are "
                f"{layout.describe()}: use method='sampled' (or 'auto')."
            )
        return "sampled"
    if method != "auto":
        return method
    with torch.no_grad():
        first = ForwardModule(model, forward_fn or default_forward)(
            select(inputs, slice(0, 1), batch_size(inputs))
        )
    classes = first.shape[-1] if isinstance(first, Tensor) else 2
    return "exact" if classes - 1 <= draws else "sampled"


def quantization_report(
    model: nn.Module,
    inputs: Inputs,
    bits: Sequence[int] = (4, 8),
    measure: bool = False,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    *,
    layout: OutputLayout | None = None,
    mask: Tensor | None = None,
    method: TraceMethod = "auto",
    draws: int = DRAWS,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Linear and convolution layers ranked by the damage that rounding their weights would do.

    One pass on ``inputs`` (predicted label; no labels needed) gives every layer's per-channel
    weight metric: the exact engine where the model makes one prediction of few classes per
    sample, the trace from ``draws`` sampled labels where it makes many or of many classes
    (:func:`trace_method`; docs/damage.md, "Large outputs: the trace from sampled labels").
    The predicted KL follows for every width and step scheme. With ``measure``, each layer is
    also quantised alone (a substituted copy of its weight; the model is not changed) and the
    actual mean KL on ``inputs`` measured.

    Args:
        model: any module whose forward returns logits.
        inputs: the samples to average over.
        bits: quantisation widths.
        measure: also measure each layer's KL.
        forward_fn: (module, inputs) → logits, or None for the module's forward.
        chunk_size: samples per pass.
        layout: how the logits meet labels (:func:`~lightning_sens.core.layout.read_layout`);
            None: one prediction per sample.
        mask: ``(B, *positions)``, nonzero where a position counts, or None.
        method: "auto", "exact" or "sampled".
        draws: labels drawn per sample for the sampled trace.
        seed: of the draws.

    Returns:
        Rows with the keys of :data:`QUANTIZATION_COLUMNS`, sorted by bits, steps ("tensor" or
        "channel") and rank (1: the layer predicted to hurt most); ``measured_kl`` is NaN when
        not measured; ``estimator`` says "exact" or "sampled (S draws)".
    """
    chosen = trace_method(model, inputs, forward_fn, layout, method, draws)
    metrics: ParameterFI | TraceResult | None
    if chosen == "exact":
        metrics = sensitivity(
            model,
            inputs,
            "pred",
            inputs=False,
            forward_fn=forward_fn,
            chunk_size=chunk_size,
            channel_metric=True,
        ).parameters
        estimator = "exact"
    else:
        metrics = sampled_metric_trace(
            model,
            inputs,
            layout=layout,
            mask=mask,
            draws=draws,
            forward_fn=forward_fn,
            channel_metric=True,
            chunk_size=chunk_size,
            seed=seed,
        )
        estimator = f"sampled ({draws} draws)"
    if metrics is None:  # pragma: no cover - parameters=True always gives them
        return []
    predicted = predict_damage(model, metrics, noise=(), bits=tuple(bits), scale=())
    rows: list[dict[str, object]] = []
    for b in bits:
        for per_channel in (True, False):
            scheme = Perturbation("quant", b, per_channel)
            found = [
                (n, d.predicted[scheme]) for n, d in predicted.items() if scheme in d.predicted
            ]
            found.sort(key=lambda item: -item[1])
            for rank, (name, kl) in enumerate(found, start=1):
                measured = float("nan")
                if measure:
                    measured = measure_damage(
                        model, inputs, name, scheme, forward_fn, layout=layout, mask=mask
                    )
                rows.append(
                    {
                        "bits": b,
                        "steps": "channel" if per_channel else "tensor",
                        "rank": rank,
                        "layer": name,
                        "parameters": predicted[name].parameters,
                        "predicted_kl": kl,
                        "measured_kl": measured,
                        "estimator": estimator,
                    }
                )
    return rows
