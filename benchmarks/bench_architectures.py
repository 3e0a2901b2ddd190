"""Benchmark: the engine on a CNN, a ViT, a text transformer and an LSTM, each against its own
forward pass and lower bound, measured side by side in one run.

Models (random weights, eval mode, K = 10, batch 32, float32):

- ResNet-18 adapted to 32 × 32 inputs (every layer on a fast route);
- a ViT on 32 × 32 images (torchvision's VisionTransformer: patch 4, 4 layers, width 128,
  4 heads): attention weights, the class token and the position embedding take the Jacobian
  route, the MLPs and norms their fast routes;
- a text transformer over 64 tokens (nn.TransformerEncoder, 4 layers, width 128, 4 heads, a
  10,000-token vocabulary, padding mask): attention on the Jacobian route;
- an LSTM classifier over 64 tokens (embedding 128, 2-layer LSTM of width 128): the LSTM on
  the Jacobian route.

Per model, best of ``--repeats`` interleaved runs:

- forward: one eval forward pass of the batch;
- lower bound: forward + K − 1 activation-only backward products to the perturbed input (the
  embedding output for tokens): the least an exact engine must do;
- engine: :func:`lightning_sens.sensitivity` with everything (whole input, maps for windows
  1, 3, 5, 7, every layer's parameter, scaling and channel-scaling FI, all parameters);
- engine, per-layer only.

The ratio engine / lower bound says how much work the routes add on top of the unavoidable
backward products; the target is that models on the Jacobian route stay within 3× of
ResNet-18's ratio (all fast routes).

Usage: python benchmarks/bench_architectures.py [--batch 32] [--repeats 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from lightning_sens import contrast_basis, sensitivity

K = 10
WINDOWS = (1, 3, 5, 7)
SEQUENCE, VOCAB = 64, 10_000


def resnet18() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=K)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        mlp_dim=256,
        num_classes=K,
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    return model


class TextTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128, padding_idx=0)
        self.position = nn.Parameter(0.02 * torch.randn(SEQUENCE, 128))
        layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, K)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(
            self.embed(input_ids) + self.position, src_key_padding_mask=attention_mask == 0
        )
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128)
        self.rnn = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, K)

    def forward(self, input_ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(input_ids))
        return self.head(out[:, -1])


def _tokens(batch: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, SEQUENCE), generator=g)
    mask = torch.ones(batch, SEQUENCE, dtype=torch.long)
    mask[::2, SEQUENCE // 2 :] = 0  # half the samples padded to half the length
    return {"input_ids": ids * mask, "attention_mask": mask}


def _images(batch: int) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], object]]] = {
    "ResNet-18 (32 × 32)": (resnet18, _images),
    "ViT (32 × 32, 4 layers)": (vit, _images),
    "text transformer (64 tokens)": (TextTransformer, _tokens),
    "LSTM (64 tokens)": (LSTMClassifier, lambda b: _tokens(b)["input_ids"]),
}


def _call(model: nn.Module, inputs: object) -> Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _lower_bound(model: nn.Module, inputs: object) -> None:
    """Forward + K − 1 backward products to the perturbed input (embedding output for tokens)."""
    held: list[Tensor] = []
    handle = None
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        x = inputs.clone().requires_grad_(True)
        held.append(x)
        inputs = x
    else:
        embed = model.get_submodule("embed")

        def hook(_m: nn.Module, _a: object, out: Tensor) -> Tensor:
            leaf = out.detach().requires_grad_(True)
            held.append(leaf)
            return leaf

        handle = embed.register_forward_hook(hook)
    try:
        logits = _call(model, inputs)
    finally:
        if handle is not None:
            handle.remove()
    cot = contrast_basis(K, logits.dtype).T.unsqueeze(1).expand(K - 1, *logits.shape)
    for k in range(K - 1):
        torch.autograd.grad(logits, held, cot[k], retain_graph=k < K - 2)


def _best(fn: Callable[[], object], repeats: int, times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, (build, make) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        inputs = make(args.batch)
        labels = torch.randint(0, K, (args.batch,), generator=torch.Generator().manual_seed(2))
        methods: dict[str, Callable[[], object]] = {
            "forward": lambda: torch.no_grad()(_call)(model, inputs),
            "lower bound": lambda: _lower_bound(model, inputs),
            "engine": lambda: sensitivity(model, inputs, labels, windows=WINDOWS),
            "per-layer": lambda: sensitivity(model, inputs, labels, input_maps=False),
        }
        for fn in methods.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method, fn in methods.items():
                _best(fn, args.repeats, times[method])
        best = {m: min(t) for m, t in times.items()}
        result = sensitivity(model, inputs, labels, input_maps=False)
        assert result.parameters is not None
        routes = Counter(layer.method for layer in result.parameters.layers.values())
        fast = sum(n for m, n in routes.items() if m not in ("jacobian", "unused"))
        row = (
            f"| {name} | {best['forward'] * 1e3:.0f} ms | {best['lower bound'] / best['forward']:.1f} | "
            f"{best['engine']:.2f} s | {best['engine'] / best['forward']:.1f} | "
            f"{best['engine'] / best['lower bound']:.2f} | {best['per-layer'] / best['forward']:.1f} | "
            f"{fast} fast, {routes.get('jacobian', 0)} Jacobian |"
        )
        rows.append(row)
        print(row, flush=True)
    header = (
        f"| model (batch {args.batch}, K = {K}) | forward | lower bound ÷ forward | engine | "
        "engine ÷ forward | engine ÷ lower bound | per-layer only ÷ forward | layers by route |"
    )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CPU"
    )
    text = "\n".join([f"Measured on {machine}.", "", header, "|---|" + "---:|" * 7, *rows]) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
