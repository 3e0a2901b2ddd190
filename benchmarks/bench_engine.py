"""Benchmark: the exact engine vs its lower bound vs the authors' per-sample recipe.

Model: torchvision's ResNet-18 adapted to 32 × 32 inputs (3 × 3 stem, no max-pool), K = 10,
eval mode, random weights with BatchNorm statistics from a few training-mode passes. One run
measures, side by side and interleaved over repeats:

- forward: one eval forward pass of the batch (the unit);
- lower bound: one forward + K − 1 activation-only backward products to the input (the least any
  exact method must do), with the faster of the loop and batched backward;
- engine: :func:`lightning_sens.sensitivity` with input maps for windows 1, 3, 5, 7 and every
  per-layer result (parameters, layer scaling, channel scaling, all parameters jointly);
- authors: the recipe of the paper's public code for the same outputs, per sample: K backward
  passes of each class probability to the input and to all parameters, then one ε-regularised
  SVD per block (batched over blocks here, which favours it). Timed on ``--authors-samples``
  samples and scaled to the batch (it is linear in the number of samples).

Peak memory is measured in a fresh subprocess per method (growth of the peak resident set,
VmHWM, after resetting it, on CPU;
torch.cuda.max_memory_allocated on CUDA).

Usage: python benchmarks/bench_engine.py [--device cpu|cuda] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lightning_sens import contrast_basis, sensitivity
from lightning_sens.reference import authors_recipe_fi

K = 10
WINDOWS = (1, 3, 5, 7)


def resnet18_cifar(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=K)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_only(model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        model(x)


def lower_bound(model: nn.Module, x: Tensor, method: str) -> None:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    cot = contrast_basis(K, logits.dtype, logits.device).T.unsqueeze(1).expand(K - 1, *logits.shape)
    if method == "batched":
        torch.autograd.grad(logits, x, cot, is_grads_batched=True)
    else:
        for k in range(K - 1):
            torch.autograd.grad(logits, x, cot[k], retain_graph=k < K - 2)


def engine(model: nn.Module, x: Tensor, labels: Tensor, chunk: int | None) -> None:
    sensitivity(model, x, labels, windows=WINDOWS, chunk_size=chunk)


def _window_blocks(jac: Tensor) -> dict[int, Tensor]:
    """(K, C, H, W) input Jacobian -> per window size, (C·H·W, K, w²) blocks (zero-padded)."""
    Kc, C, H, W = jac.shape
    out = {}
    for w in WINDOWS:
        s = w // 2
        patches = F.unfold(jac.reshape(Kc * C, 1, H, W), w, padding=s)  # (K·C, w², H·W)
        out[w] = (
            patches.reshape(Kc, C, w * w, H * W).permute(1, 3, 0, 2).reshape(C * H * W, Kc, w * w)
        )
    return out


def authors(model: nn.Module, x: Tensor, labels: Tensor) -> None:
    """The authors' recipe, one sample at a time, for every output the engine produces."""
    layers = {
        n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))
    }
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        probs = torch.softmax(model(xi), -1)[0]
        params = [p for m in layers.values() for p in m.parameters(recurse=False)]
        rows = [
            torch.autograd.grad(probs[k], [xi, *params], retain_graph=k < K - 1) for k in range(K)
        ]
        y = int(labels[i])
        jac_x = torch.stack([r[0][0] for r in rows])  # (K, C, H, W)
        blocks = [jac_x.reshape(K, -1)]
        for window_blocks in _window_blocks(jac_x).values():
            authors_recipe_fi(window_blocks, probs, y)
        authors_recipe_fi(jac_x.permute(2, 3, 0, 1).reshape(-1, K, jac_x.shape[1]), probs, y)
        index = 1
        all_params = []
        for module in layers.values():
            own = list(module.parameters(recurse=False))
            per = [
                torch.stack([r[index + j] for r in rows]) for j in range(len(own))
            ]  # (K, *shape)
            index += len(own)
            flat = torch.cat([p.reshape(K, -1) for p in per], dim=1)
            all_params.append(flat)
            blocks.append(flat)
            theta = torch.cat([p.detach().reshape(-1) for p in own])
            blocks.append((flat @ theta).unsqueeze(-1))  # layer scaling
            channel = sum(
                (g * p.detach()).reshape(K, p.shape[0], -1).sum(-1)
                for g, p in zip(per, own, strict=True)
            )
            blocks.append(channel)  # channel scaling (K, C)
        blocks.append(torch.cat(all_params, dim=1))
        for block in blocks:
            authors_recipe_fi(block, probs, y)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_memory(method: str, args: argparse.Namespace) -> float:
    """Peak memory growth (MiB) of one call of ``method``, in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--measure-memory",
        method,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
    ]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def _setup(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, torch.device]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = resnet18_cifar().to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, K, (args.batch,), generator=generator).to(device)
    return model, x, labels, device


def _methods(
    model: nn.Module, x: Tensor, labels: Tensor, args: argparse.Namespace
) -> dict[str, Callable[[], None]]:
    n = args.authors_samples
    return {
        "forward": lambda: forward_only(model, x),
        "lower bound (loop)": lambda: lower_bound(model, x, "loop"),
        "lower bound (batched)": lambda: lower_bound(model, x, "batched"),
        "engine": lambda: engine(model, x, labels, args.chunk),
        "  engine: input maps only": lambda: sensitivity(
            model, x, labels, windows=WINDOWS, parameters=False, chunk_size=args.chunk
        ),
        "  engine: per-layer only": lambda: sensitivity(
            model, x, labels, inputs=False, chunk_size=args.chunk
        ),
        "  engine: + channel metric": lambda: sensitivity(
            model, x, labels, windows=WINDOWS, chunk_size=args.chunk, channel_metric=True
        ),
        f"authors ({n} samples)": lambda: authors(model, x[:n], labels[:n]),
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory(method: str, args: argparse.Namespace) -> None:
    model, x, labels, device = _setup(args)
    fn = {
        k.split(" (")[0] if k.startswith("authors") else k: v
        for k, v in _methods(model, x, labels, args).items()
    }[method]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # reset the kernel's peak-RSS counter (VmHWM), then read it after the call
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        fn()
        peak = (_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--authors-samples", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        measure_memory(args.measure_memory, args)
        return

    model, x, labels, device = _setup(args)
    methods = _methods(model, x, labels, args)
    for fn in methods.values():  # warm-up (allocator, kernels)
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved, so drift hits every method alike
            times[name].append(_time(fn, device))
    best = {name: min(t) for name, t in times.items()}
    authors_key = next(k for k in best if k.startswith("authors"))
    authors_batch = best[authors_key] * args.batch / args.authors_samples
    lower = min(best["lower bound (loop)"], best["lower bound (batched)"])

    print(f"# bench_engine: ResNet-18 (32×32), batch {args.batch}, K = {K}, device {device}")
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, t in best.items():
        print(f"{name:28s} {t:9.3f} s   ({t / best['forward']:6.1f} × forward)")
    print(f"{'authors (scaled to batch)':28s} {authors_batch:9.3f} s")
    print(f"engine / lower bound          {best['engine'] / lower:6.2f}")
    print(f"authors / engine              {authors_batch / best['engine']:6.1f}")
    memory: dict[str, float] = {}
    if not args.no_memory:
        for method in ("forward", "lower bound (loop)", "engine", "authors"):
            memory[method] = _peak_memory(method, args)
            print(f"peak memory {method:22s} {memory[method]:9.0f} MiB")
    if args.out is not None:
        args.out.write_text(_markdown(best, authors_batch, lower, memory, args, cpu))


def _markdown(
    best: dict[str, float],
    authors_batch: float,
    lower: float,
    memory: dict[str, float],
    args: argparse.Namespace,
    cpu: str,
) -> str:
    forward = best["forward"]

    def row(name: str, seconds: float, peak: float | None = None) -> str:
        mib = f"{peak:,.0f} MiB" if peak is not None else ""
        return f"| {name} | {seconds:.2f} s | {seconds / forward:,.1f} | {mib} |"

    authors_key = next(k for k in best if k.startswith("authors"))
    lines = [
        f"Measured on {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}, batch {args.batch}, best of {args.repeats} interleaved runs "
        f"(`python benchmarks/bench_engine.py --out ...`).",
        "",
        "| method | time | × forward | peak memory |",
        "|---|---:|---:|---:|",
        row("forward (eval)", forward, memory.get("forward")),
        row(
            "lower bound (loop backward)",
            best["lower bound (loop)"],
            memory.get("lower bound (loop)"),
        ),
        row("lower bound (batched backward)", best["lower bound (batched)"]),
        row("engine, everything", best["engine"], memory.get("engine")),
        row("engine, input FI and maps only", best["  engine: input maps only"]),
        row("engine, per-layer results only", best["  engine: per-layer only"]),
        row(
            "engine, everything + per-channel weight metric",
            best["  engine: + channel metric"],
        ),
        row(
            f"authors' recipe (scaled from {args.authors_samples} samples)",
            authors_batch,
            memory.get("authors"),
        ),
        "",
        f"Engine ÷ lower bound: {best['engine'] / lower:.2f}. Authors' recipe ÷ engine: "
        f"{authors_batch / best['engine']:.0f} (timed on {best[authors_key]:.1f} s for "
        f"{args.authors_samples} samples).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
