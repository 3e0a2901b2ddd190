"""benchmarks/damage.py: the small run end to end, and the pieces its conclusions rest on."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "damage.py"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on one thread: on 2 busy cores, torch's 2-thread kernels stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _benchmark() -> ModuleType:
    """benchmarks/damage.py as a module (benchmarks/ is not a package)."""
    name = "damage_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _tiny(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 two-layer classifier with 3 classes and a batch of 24 samples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


def _table_rows(text: str, first: str) -> dict[str, list[str]]:
    """Cells of the first markdown table whose header starts with ``first``, by row name."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        keys = 2 if first == "ranking" else 1  # the pixel table's rows: ranking and edit
        rows[" / ".join(cells[:keys])] = cells[keys:]
    return rows


def _number(cell: str) -> float:
    """The leading number of a cell such as ``**0.83 (2/3)**``."""
    return float(cell.strip("*").split()[0])


def test_small_run_writes_finite_tables(tmp_path: Path) -> None:
    bench = _benchmark()
    out = tmp_path / "damage.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# ")
    assert "Produced by `python benchmarks/damage.py --small" in text
    layers = _table_rows(text, "predictor")
    assert list(layers) == list(bench.PREDICTORS)
    for predictor in ("ours (second order)", "tr G (metric only)", "Hutchinson (HAWQ)"):
        cells = layers[predictor][: len(bench.KINDS)]
        assert all(math.isfinite(_number(c)) for c in cells), (predictor, cells)
    assert "Best mean ρ per damage kind: noise ρ=0.05: " in text
    pixels = _table_rows(text, "ranking")
    assert len(pixels) == len(bench.RANKINGS) * len(bench.EDITS)
    for cells in pixels.values():
        assert len(cells) == 2 * len(bench.KS)
        assert all(math.isfinite(_number(c)) for c in cells)


def _exact_hessian(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, slice]]:
    """The loss Hessian over all parameters (flattened in ``named_parameters()`` order), and
    each parameter's slice of it."""
    named = dict(model.named_parameters())
    spans, start = {}, 0
    for name, p in named.items():
        spans[name] = slice(start, start + p.numel())
        start += p.numel()
    flat = torch.cat([p.detach().flatten() for p in named.values()])

    def loss(vector: Tensor) -> Tensor:
        values = {n: vector[s].view_as(named[n]) for n, s in spans.items()}
        return F.cross_entropy(functional_call(model, values, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat), spans


def test_hutchinson_agrees_with_the_exact_hessian_trace() -> None:
    bench = _benchmark()
    model, x, y = _tiny()
    hessian, spans = _exact_hessian(model, x, y)
    diagonal = hessian.diagonal()
    samples = bench.hutchinson_samples(model, x, y, n_v=1500, seed=0)
    for index in ("0", "2"):
        layer = model.get_submodule(index)
        estimates = bench.layer_trace_samples(samples, layer)
        exact = float(
            diagonal[spans[f"{index}.weight"]].sum() + diagonal[spans[f"{index}.bias"]].sum()
        )
        error = float(estimates.std()) / math.sqrt(len(estimates))
        assert abs(float(estimates.mean()) - exact) < 4 * error + 1e-12, (index, exact)
        # per output channel of the weight (what the quantisation prediction uses)
        channel = samples[id(layer.weight)]  # (n_v, C_out, C_in)
        exact_channel = diagonal[spans[f"{index}.weight"]].view_as(layer.weight).sum(dim=1)
        per_channel = channel.sum(dim=2)
        errors = per_channel.std(dim=0) / math.sqrt(len(per_channel))
        assert torch.all((per_channel.mean(dim=0) - exact_channel).abs() < 4 * errors + 1e-12)
    # the exact curvature along the layer's own parameters
    layer = model.get_submodule("2")
    theta = torch.cat([layer.weight.detach().flatten(), layer.bias.detach().flatten()])
    block = hessian[spans["2.weight"].start : spans["2.bias"].stop, :][
        :, spans["2.weight"].start : spans["2.bias"].stop
    ]
    expected = float(theta @ block @ theta)
    assert bench.curvature_along_self(model, x, y, layer) == pytest.approx(expected, rel=1e-9)


def test_measured_kl_at_small_noise_matches_the_second_order_prediction() -> None:
    bench = _benchmark()
    from lightning_sens import sensitivity
    from lightning_sens.damage import predict_damage

    model, x, y = _tiny(seed=1)
    result = sensitivity(model, x, y, inputs=False)
    assert result.parameters is not None
    rho, delta = 1e-3, 1e-3
    predicted = predict_damage(model, result.parameters, noise=(rho,), bits=(), scale=(delta,))
    probe = bench.Probe(model, x)
    for index in ("0", "2"):
        layer = probe.model.get_submodule(index)
        measured = bench.noise_damage(probe, layer, rho, draws=3000, seed=0)
        assert measured == pytest.approx(predicted[index].noise[rho], rel=0.04), index
        scaled = bench.scale_damage(probe, layer, delta)
        assert scaled == pytest.approx(predicted[index].scale[delta], rel=0.01), index


def test_scores_of_constant_predictors_and_ties() -> None:
    bench = _benchmark()
    perfect = bench.score([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    assert perfect.rho == pytest.approx(1.0)
    assert perfect.top1
    constant = bench.score([1.0, 1.0 + 1e-13, 1.0], [0.1, 0.2, 0.3])
    assert math.isnan(constant.rho)
    assert not constant.top1  # a tie at the top is no hit
    skipped = bench.score([3.0, math.nan, 1.0], [0.3, math.nan, 0.1])
    assert skipped.top1
