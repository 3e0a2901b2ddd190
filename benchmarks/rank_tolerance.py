"""Calibrate the float32 rank tolerance on real architectures (docs/engine.md, "Numerics").

Every model of the test zoo (torchvision CNNs, ViT and Swin, a text transformer, LSTM/GRU, and
the Hugging Face and timm models when installed) is built with K classes and random weights,
and the engine runs twice on the same weights: in float64 and in float32. Every block whose rank
the engine decides (whole input, window maps, positions, layers, channel scalings) is recorded
in both runs, as eigenvalue ratios λ / λ_ref of its Gram (λ_ref: the block's largest eigenvalue,
or its noise floor).

A direction whose float64 ratio is below 1e-13 is null: float64 rounding is all there is. Its
float32 ratio measures float32 noise. A direction with a float64 ratio of 1e-9 or more is real.
For each candidate float32 tolerance t (a direction counts when its ratio exceeds t · K), the
script counts the noise directions it would keep and the real ones it would drop.

Usage: python benchmarks/rank_tolerance.py [--classes 10] [--batch 4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_sens.core.assemble as assemble
import lightning_sens.core.input_maps as input_maps
from lightning_sens import sensitivity
from tests.zoo import ZOO, build

NULL, REAL = 1e-13, 1e-9
CANDIDATES = (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
IMAGE_SIZE = 32


class Recorder:
    """Wraps the engine's rank-deciding functions and keeps every block's eigenvalue ratios."""

    def __init__(self) -> None:
        self.ratios: list[Tensor] = []
        self.originals = {
            (module, name): getattr(module, name)
            for module in (assemble, input_maps)
            for name in ("fi_from_contrast_gram", "fi_from_contrast_columns")
            if hasattr(module, name)
        }

    def _record(self, gram: Tensor, noise: Tensor | None) -> None:
        gram = gram.detach().to(torch.float64)
        evals = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
        top = evals[..., :1]
        if noise is not None:
            floor = torch.zeros(gram.shape[:-2], dtype=torch.float64) + noise.to(torch.float64)
            top = torch.maximum(top, floor.unsqueeze(-1))
        self.ratios.append((evals / top.clamp_min(1e-300)).reshape(-1, evals.shape[-1]).cpu())

    def __enter__(self) -> Recorder:
        recorder = self

        def gram_fn(original):  # type: ignore[no-untyped-def]
            def wrapped(gram, probs, c, rtol, noise_scale=None):  # type: ignore[no-untyped-def]
                recorder._record(gram, noise_scale)
                return original(gram, probs, c, rtol, noise_scale)

            return wrapped

        def columns_fn(original):  # type: ignore[no-untyped-def]
            def wrapped(columns, probs, c, rtol, noise_scale=None):  # type: ignore[no-untyped-def]
                if columns.shape[-1] < columns.shape[-2]:  # else it calls the Gram route
                    recorder._record(columns.transpose(-1, -2) @ columns, noise_scale)
                return original(columns, probs, c, rtol, noise_scale)

            return wrapped

        for (module, name), original in self.originals.items():
            wrap = gram_fn if name == "fi_from_contrast_gram" else columns_fn
            setattr(module, name, wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for (module, name), original in self.originals.items():
            setattr(module, name, original)


def _image_inputs(inputs: object) -> object:
    """Image models at CIFAR size, where the issue's ShuffleNet numbers were measured."""
    if isinstance(inputs, Tensor) and inputs.dim() == 4 and inputs.shape[1] == 3:
        generator = torch.Generator().manual_seed(5)
        return torch.randn(inputs.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return inputs


def measure(name: str, classes: int, batch: int) -> tuple[Tensor, Tensor]:
    """Paired float64 and float32 ratios of every recorded direction of one model."""
    case = next(c for c in ZOO if c.name == name)
    model, inputs, labels = build(case, batch=batch, classes=classes)
    if name not in ("vit", "swin", "hf_vit", "timm_vit"):  # their configs fix the image size
        inputs = _image_inputs(inputs)
    runs = []
    for dtype in (torch.float64, torch.float32):
        cast = model.to(dtype)
        x = inputs
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.to(dtype)
        with Recorder() as recorder:
            sensitivity(cast, x, labels, windows=(1, 3, 5))
        runs.append(recorder.ratios)
    r64, r32 = runs
    if [r.shape for r in r64] != [r.shape for r in r32]:
        raise RuntimeError(f"{name}: the float64 and float32 runs decided different blocks")
    return torch.cat([r.flatten() for r in r64]), torch.cat([r.flatten() for r in r32])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = [
        c.name
        for c in ZOO
        if c.dtype == torch.float64
        and c.name not in ("compiled", "in_place_input", "used_twice", "layernorm2d")
        and (c.requires is None or importlib.util.find_spec(c.requires) is not None)
        and not c.name.startswith("tied")
    ]
    K = args.classes
    rows = []
    totals = {t: [0, 0] for t in CANDIDATES}
    for name in names:
        r64, r32 = measure(name, K, args.batch)
        null, real = r64 < NULL, r64 >= REAL
        noise = float(r32[null].max()) if null.any() else 0.0
        smallest = float(r64[real].min()) if real.any() else float("nan")
        counts = []
        for t in CANDIDATES:
            kept_noise = int((r32[null] > t * K).sum())
            dropped_real = int((r32[real] <= t * K).sum())
            totals[t][0] += kept_noise
            totals[t][1] += dropped_real
            counts.append(f"{kept_noise}/{dropped_real}")
        rows.append(
            f"| {name} | {int(real.sum())} | {int(null.sum())} | {noise:.1e} | {smallest:.1e} | "
            + " | ".join(counts)
            + " |"
        )
        print(rows[-1], flush=True)
    header = (
        f"| model (K = {K}) | real directions | null directions | largest float32 noise ratio | "
        "smallest real ratio | " + " | ".join(f"t = {t:.0e}" for t in CANDIDATES) + " |"
    )
    rule = "|" + "---|" * (5 + len(CANDIDATES))
    total = "| **all** | | | | | " + " | ".join(f"**{a}/{b}**" for a, b in totals.values()) + " |"
    table = "\n".join([header, rule, *rows, total])
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    text = (
        f"Cells: noise directions kept / real directions dropped by a float32 tolerance t "
        f"(kept when λ/λ_ref > t · K). Measured on {machine}, batch {args.batch}, random weights, "
        f"images {IMAGE_SIZE} × {IMAGE_SIZE} where the model allows.\n\n{table}\n"
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
