"""Benchmark: which layers of a language model break under weight quantisation, predicted from
the metric's trace with sampled labels against Hutchinson's Hessian trace (HAWQ) and measured.

Real text: the Python standard library's own source (the ``*.py`` files at the top of the
interpreter's ``stdlib`` folder, in name order), split into word, punctuation and whitespace
tokens; the most frequent ``VOCAB − 1`` tokens and one unknown token make the vocabulary.
A tiny Llama (Hugging Face ``LlamaForCausalLM`` from a small configuration, random weights,
untied embeddings) is trained from scratch for every seed with AdamW on sequences of
``CONTEXT`` tokens; the last 10 % of the token stream is held out.

Damage, per Linear layer and scheme (4 and 8 bits, one step per tensor and per output channel;
:func:`lightning_sens.damage.quantize`): the weight rounded alone (the model untouched otherwise),
then the measured KL(p ‖ p_quantised) summed over a sequence's next-token predictions and
averaged over ``SAMPLES`` held-out sequences (:func:`lightning_sens.damage.measure_damage` with
the causal layout), and the held-out perplexity.

Predictors, scored per trained model by Spearman's ρ over the layers and by whether their top
layer is the most damaged one:

- ``ours (sampled trace)``: :func:`lightning_sens.quantization.quantization_report`, which
  estimates tr(G) per output channel from ``DRAWS`` labels sampled from the model at every
  position (no labels needed) and predicts ½ Σ_c e_c² tr(G_c), e_c² the channel's mean squared
  rounding error;
- ``Hutchinson (HAWQ)``: the loss Hessian's diagonal per output channel from ``N_V``
  Rademacher vectors (Hessian-vector products by double backward on the mean next-token
  cross-entropy with the true tokens), ½ Σ_c e_c² tr(H_c) with the same e_c².

Usage: python benchmarks/lm_damage.py [--small] [--seeds 5] [--steps 600] [--out TAG]
writes benchmarks/results/lm_damage_<TAG>.md, or the path TAG where it ends in .md (TAG: ``cpu``;
``small`` with ``--small``, a smoke test of about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_sens import read_layout
from lightning_sens.damage import Perturbation, measure_damage, quantization_error, quantize
from lightning_sens.quantization import quantization_report

VOCAB = 2048
CONTEXT = 64
SAMPLES = 32  # held-out sequences the damage is measured and predicted on
DRAWS = 16  # sampled labels per position (ours)
N_V = 16  # Rademacher vectors (Hutchinson)
SCHEMES = [(b, per) for b in (4, 8) for per in (True, False)]
RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = re.compile(r"\w+|[^\w\s]|\s+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def corpus(limit: int) -> tuple[Tensor, int]:
    """The token ids of the standard library's top-level ``*.py`` files (at most ``limit``
    tokens), and how many files were read."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    words: list[str] = []
    files = 0
    for path in sorted(folder.glob("*.py")):
        words += TOKEN.findall(path.read_text(errors="replace"))
        files += 1
        if len(words) >= limit:
            break
    words = words[:limit]
    common = [w for w, _ in Counter(words).most_common(VOCAB - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0: unknown
    return torch.tensor([index.get(w, 0) for w in words]), files


def build(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        attn_implementation="eager",  # Hutchinson's double backward: not through fused kernels
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sequences(ids: Tensor) -> Tensor:
    n = len(ids) // CONTEXT
    return ids[: n * CONTEXT].reshape(n, CONTEXT)


def train(model: nn.Module, data: Tensor, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, data: Tensor) -> float:
    return math.exp(float(model(input_ids=data, labels=data).loss))


def hutchinson_channels(model: nn.Module, data: Tensor, names: list[str], seed: int) -> dict:
    """Per layer, the loss Hessian's diagonal summed over each output channel of its weight
    (``N_V`` Rademacher vectors)."""
    weights = [model.get_submodule(n).weight for n in names]
    loss = model(input_ids=data, labels=data).loss
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    sums = [torch.zeros(w.shape[0], dtype=torch.float64) for w in weights]
    for _ in range(N_V):
        vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
        hvs = torch.autograd.grad(grads, weights, vs, retain_graph=True)
        for total, v, hv in zip(sums, vs, hvs, strict=True):
            total += (v * hv).double().flatten(1).sum(1) / N_V
    return dict(zip(names, sums, strict=True))


@dataclass
class Run:
    seed: int
    layers: list[str]
    measured: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    ours: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    hutchinson: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    perplexity: float = math.nan
    perplexity_4bit: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_one(seed: int, train_data: Tensor, held_out: Tensor, steps: int) -> Run:
    model = build(seed)
    start = time.perf_counter()
    train(model, train_data, steps, seed)
    trained = time.perf_counter() - start
    data = held_out[:SAMPLES]
    batch = {"input_ids": data}
    layout = read_layout(model(**batch).logits, data, batch)
    start = time.perf_counter()
    rows = quantization_report(model, batch, [4, 8], layout=layout, draws=DRAWS, seed=seed)
    ours_seconds = time.perf_counter() - start
    layers = sorted({str(r["layer"]) for r in rows})
    out = Run(seed, layers, perplexity=perplexity(model, data))
    for bits, per in SCHEMES:
        steps_name = "channel" if per else "tensor"
        found = {
            r["layer"]: float(r["predicted_kl"])
            for r in rows
            if r["bits"] == bits and r["steps"] == steps_name
        }  # type: ignore[arg-type]
        out.ours[bits, per] = [found[n] for n in layers]
    start = time.perf_counter()
    channels = hutchinson_channels(model, data, layers, seed)
    out.seconds = {
        "train": trained,
        "ours": ours_seconds,
        "hutchinson": time.perf_counter() - start,
    }
    for bits, per in SCHEMES:
        out.hutchinson[bits, per] = [
            0.5
            * float(
                (quantization_error(model.get_submodule(n).weight, bits, per) * channels[n]).sum()
            )
            for n in layers
        ]
        out.measured[bits, per] = [
            measure_damage(model, batch, n, Perturbation("quant", bits, per), layout=layout)
            for n in layers
        ]
    for name in layers:
        module = model.get_submodule(name)
        kept = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.copy_(quantize(kept, 4, True))
        out.perplexity_4bit[name] = perplexity(model, data)
        with torch.no_grad():
            module.weight.copy_(kept)
    return out


def rank_scores(predicted: list[float], actual: list[float]) -> tuple[float, bool]:
    rho = float(spearmanr(predicted, actual).statistic)
    top = max(range(len(actual)), key=actual.__getitem__)
    return rho, max(range(len(predicted)), key=predicted.__getitem__) == top


def report(
    runs: list[Run], args: argparse.Namespace, files: int, tokens: int, seconds: float
) -> str:
    lines = [
        "# Quantisation damage of a language model's layers: sampled-label trace vs Hutchinson",
        "",
        f"Written by `python benchmarks/lm_damage.py{' --small' if args.small else ''} --seeds "
        f"{args.seeds} --steps {args.steps}` in {seconds:.0f} s on {platform.machine()} "
        f"({os.cpu_count()} CPUs), torch {torch.__version__}.",
        "",
        f"Corpus: {tokens:,} tokens of the Python standard library ({files} files), vocabulary "
        f"{VOCAB}; a tiny Llama (2 layers, width 64) trained {args.steps} steps per seed; damage "
        f"measured and predicted on {SAMPLES} held-out sequences of {CONTEXT} tokens. Per "
        "scheme: mean Spearman ρ over the seeds between each predictor and the measured KL over "
        "the Linear layers, and how many seeds' most damaged layer each predictor ranks first.",
        "",
        "| weights | ours (sampled trace) ρ | Hutchinson ρ | ours top-1 | Hutchinson top-1 |",
        "|---|---|---|---|---|",
    ]
    for bits, per in SCHEMES:
        ours = [rank_scores(r.ours[bits, per], r.measured[bits, per]) for r in runs]
        hutch = [rank_scores(r.hutchinson[bits, per], r.measured[bits, per]) for r in runs]
        name = f"{bits}-bit, per {'channel' if per else 'tensor'}"
        lines.append(
            f"| {name} | {sum(o[0] for o in ours) / len(ours):.2f} | "
            f"{sum(h[0] for h in hutch) / len(hutch):.2f} | {sum(o[1] for o in ours)}/{len(ours)} "
            f"| {sum(h[1] for h in hutch)}/{len(hutch)} |"
        )
    lines += [
        "",
        "| seed | layers | perplexity | worst layer at 4 bits (per channel) | its perplexity | "
        "seconds: ours / Hutchinson / training |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        worst = max(r.perplexity_4bit, key=r.perplexity_4bit.__getitem__)
        lines.append(
            f"| {r.seed} | {len(r.layers)} | {r.perplexity:.2f} | `{worst}` | "
            f"{r.perplexity_4bit[worst]:.2f} | {r.seconds['ours']:.1f} / "
            f"{r.seconds['hutchinson']:.1f} / {r.seconds['train']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one seed, few steps: a smoke test")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument(
        "--out", default=None, help="results/lm_damage_<OUT>.md, or a path ending in .md"
    )
    args = parser.parse_args()
    if args.small:
        args.seeds, args.steps = 1, 20
    start = time.perf_counter()
    ids, files = corpus(60_000 if args.small else 600_000)
    cut = int(0.9 * len(ids))
    train_data, held_out = sequences(ids[:cut]), sequences(ids[cut:])
    runs = []
    for seed in range(args.seeds):
        log(f"seed {seed}")
        runs.append(run_one(seed, train_data, held_out, args.steps))
    text = report(runs, args, files, len(ids), time.perf_counter() - start)
    tag = args.out or ("small" if args.small else "cpu")
    target = Path(tag) if tag.endswith(".md") else RESULTS / f"lm_damage_{tag}.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
