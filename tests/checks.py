"""Assertions shared by the tests that compare the engine with the brute-force reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

RTOL = 1e-8  # float64 engine against the float64 reference


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
