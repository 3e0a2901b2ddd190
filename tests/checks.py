"""Assertions shared by the tests that compare the engine with the brute-force reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

RTOL = 1e-8  # float64 engine against the float64 reference

# Fields of the result types that the brute-force reference does not compute, with the reason.
# assert_same_fields compares every other field; a field added to a result type later is
# compared too, and fails until the reference computes it or it is listed here.
NOT_IN_REFERENCE = {
    # Which route computed the layer's Gram ("direct", "ghost", "jacobian", ...): a choice of the
    # engine, not a quantity. The reference has no routes; it writes "jacobian" (it
    # differentiates the whole model by autograd, what the engine's Jacobian route does).
    ("LayerFI", "method"),
}


def assert_close(name: str, got: Tensor, want: Tensor, rtol: float = RTOL) -> None:
    """Relative agreement entry by entry; on failure, list the entries that differ."""
    got, want = got.detach().cpu().to(torch.float64), want.detach().cpu().to(torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.abs().clamp_min(1e-12)
    bad = ((got - want).abs() > rtol * scale).nonzero()
    if len(bad):
        rows = [
            f"  {tuple(i.tolist())}: engine {got[tuple(i)]:.15g} vs reference {want[tuple(i)]:.15g}"
            for i in bad[:10]
        ]
        pytest.fail(f"{name}: {len(bad)} of {got.numel()} entries differ\n" + "\n".join(rows))


def assert_equal(name: str, got: Tensor, want: Tensor) -> None:
    if not torch.equal(got.detach().cpu().long(), want.detach().cpu().long()):
        pytest.fail(f"{name}: engine {got.tolist()} vs reference {want.tolist()}")


def assert_same_fields(
    name: str,
    got: object,
    want: object,
    rtol: float = RTOL,
    exempt: set[tuple[str, str]] = NOT_IN_REFERENCE,
) -> None:
    """Engine and reference results agree field by field, recursively.

    Dataclasses are walked with :func:`dataclasses.fields` (every field but those in
    ``exempt``, pairs ``(type name, field name)``); dicts must have the same keys; floating
    tensors agree to ``rtol`` (:func:`assert_close`), other tensors exactly, and both have the
    same dtype; everything else (None, strings, tuples) is equal.
    """
    if dataclasses.is_dataclass(got) and not isinstance(got, type):
        assert type(got) is type(want), f"{name}: {type(got).__name__} vs {type(want).__name__}"
        kind = type(got).__name__
        for field in dataclasses.fields(got):
            if (kind, field.name) not in exempt:
                here = f"{name}.{field.name}"
                assert_same_fields(
                    here, getattr(got, field.name), getattr(want, field.name), rtol, exempt
                )
    elif isinstance(got, dict):
        assert isinstance(want, dict), f"{name}: a dict vs {type(want).__name__}"
        assert set(got) == set(want), f"{name}: keys {sorted(got)} vs {sorted(want)}"
        for key, value in got.items():
            assert_same_fields(f"{name}[{key!r}]", value, want[key], rtol, exempt)
    elif isinstance(got, Tensor):
        assert isinstance(want, Tensor), f"{name}: a tensor vs {type(want).__name__}"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} vs {want.dtype}"
        if got.is_floating_point():
            assert_close(name, got, want, rtol)
        else:
            assert got.shape == want.shape, (
                f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
            )
            assert_equal(name, got, want)
    else:
        assert got == want, f"{name}: engine {got!r} vs reference {want!r}"
