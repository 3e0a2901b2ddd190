"""Benchmark: the engine on a CNN, a ViT, a text transformer and an LSTM, each against its own
forward pass and lower bound, measured side by side in one run.

Models (random weights, eval mode, K = 10, batch 32, float32):

- ResNet-18 adapted to 32 × 32 inputs (every layer on a fast route);
- a ViT on 32 × 32 images (torchvision's VisionTransformer: patch 4, 4 layers, width 128,
  4 heads): attention weights, the class token and the position embedding take the Jacobian
  route, the MLPs and norms their fast routes;
- a text transformer over 64 tokens (nn.TransformerEncoder, 4 layers, width 128, 4 heads, a
  10,000-token vocabulary, padding mask, fixed sinusoidal positions): nn.MultiheadAttention on
  the Jacobian route; and the same model with attention written as four nn.Linear layers, all on
  fast routes: the cost of the Jacobian route against the fast routes at the same size;
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
backward products. The target: the Jacobian route within 3× of the fast routes on the same model
size (the two text transformers), and models with Jacobian-route layers within 3× of
ResNet-18's per-layer ratio.

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


def _positions(length: int, width: int) -> Tensor:
    """Fixed sinusoidal position encodings (no parameters)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-9.2 / width))
    table = torch.zeros(length, width)
    table[:, 0::2], table[:, 1::2] = (
        torch.sin(position * frequency),
        torch.cos(position * frequency),
    )
    return table


class LinearAttention(nn.Module):
    """Self-attention written with four nn.Linear layers (q, k, v, out): every weight on a fast
    route. The same function and size as nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, D = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)

        allowed = mask.bool()[:, None, None, :]
        mixed = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=allowed
        )
        return self.out(mixed.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer as nn.TransformerEncoderLayer, with LinearAttention."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = LinearAttention(width, heads)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(x + self.attention(x, mask))
        return self.norm2(x + self.down(torch.relu(self.up(x))))


class TextTransformer(nn.Module):
    """4 layers, width 128, 4 heads, over 64 tokens; ``linear_attention`` swaps
    nn.MultiheadAttention (the Jacobian route) for LinearAttention (fast routes)."""

    def __init__(self, linear_attention: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128, padding_idx=0)
        self.register_buffer("position", _positions(SEQUENCE, 128))
        self.linear_attention = linear_attention
        if linear_attention:
            self.layers = nn.ModuleList(EncoderLayer(128, 4, 256) for _ in range(4))
        else:
            layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, K)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) + self.position
        if self.linear_attention:
            for layer in self.layers:
                h = layer(h, attention_mask)
        else:
            h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
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
    "text transformer, nn.MultiheadAttention": (TextTransformer, _tokens),
    "text transformer, attention from nn.Linear": (lambda: TextTransformer(True), _tokens),
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


def _timed(fn: Callable[[], object], times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def _methods(model: nn.Module, inputs: object, labels: Tensor) -> dict[str, Callable[[], object]]:
    def forward() -> object:
        with torch.no_grad():
            return _call(model, inputs)

    return {
        "forward": forward,
        "lower bound": lambda: _lower_bound(model, inputs),
        "engine": lambda: sensitivity(model, inputs, labels, windows=WINDOWS),  # type: ignore[arg-type]
        "per-layer": lambda: sensitivity(model, inputs, labels, inputs=False),  # type: ignore[arg-type]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    per_layer: dict[str, float] = {}
    for name, (build, make) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        inputs = make(args.batch)
        labels = torch.randint(0, K, (args.batch,), generator=torch.Generator().manual_seed(2))
        methods = _methods(model, inputs, labels)
        for fn in methods.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method, fn in methods.items():
                _timed(fn, times[method])
        best = {m: min(t) for m, t in times.items()}
        result = sensitivity(model, inputs, labels, inputs=False)
        assert result.parameters is not None
        routes = Counter(layer.method for layer in result.parameters.layers.values())
        fast = sum(n for m, n in routes.items() if m not in ("jacobian", "unused"))
        forward, bound = best["forward"], best["lower bound"]
        per_layer[name] = best["per-layer"]
        row = (
            f"| {name} | {forward * 1e3:.0f} ms | {bound / forward:.1f} | "
            f"{best['engine'] / forward:.1f} | {best['engine'] / bound:.2f} | "
            f"{best['per-layer'] / forward:.1f} | {best['per-layer'] / bound:.2f} | "
            f"{fast} fast, {routes.get('jacobian', 0)} Jacobian |"
        )
        rows.append(row)
        print(row, flush=True)
    header = (
        f"| model (batch {args.batch}, K = {K}) | forward | lower bound ÷ forward | "
        "engine ÷ forward | engine ÷ lower bound | per-layer only ÷ forward | "
        "per-layer only ÷ lower bound | layers by route |"
    )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CPU"
    )
    jacobian = per_layer["text transformer, nn.MultiheadAttention"]
    fast = per_layer["text transformer, attention from nn.Linear"]
    same_size = (
        f"Same model size, attention on the Jacobian route (nn.MultiheadAttention) vs on fast "
        f"routes (nn.Linear): per-layer time {jacobian:.2f} s vs {fast:.2f} s, "
        f"{jacobian / fast:.1f}× (target: within 3×)."
    )
    lines = [f"Measured on {machine}.", "", header, "|---|" + "---:|" * 7, *rows, "", same_size]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
