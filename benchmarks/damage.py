"""Benchmark: which per-layer score predicts real damage to a trained classifier, and which
per-pixel ranking finds the pixels whose edit damages a prediction most.

Real data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``: the first 12,000 training and
2,000 test images) and scikit-learn's 8 × 8 digits (1,297 training, 500 test images). Four small
models, each trained from scratch for every seed with a short plain-torch Adam loop:
``cnn3`` (three convolutions with ReLU and pooling, a linear head), ``cnn_bn`` (convolution,
BatchNorm and ReLU blocks, a linear head), ``mlp`` (three linear layers) and ``vit`` (a two-block
transformer written with ``nn.Linear``: patch embedding, separate q/k/v/out projections,
LayerNorm, a two-layer MLP, mean pooling, a linear head).

Damage is measured on N test images as the mean over them of KL(p_clean ‖ p_damaged), computed
with a float64 copy of the model in eval mode. Per layer (every module owning trainable
parameters): Gaussian noise on all of the layer's parameters with σ = ρ · rms(θ_l), ρ = 0.05 and
0.2, averaged over ``--draws`` draws (default ``DRAWS``); symmetric uniform quantisation of
the weight of Linear and Conv layers (bias untouched) to 4 and 8 bits, per tensor and per
output channel; scaling all of the layer's parameters by 1 + δ and 1 − δ, δ = 0.1 (averaged).

Predictors of each layer's damage, scored by Spearman's ρ over the layers of one trained model
and by whether their top layer is the most damaged one:

- ``scale FI``: mean over the N images of the layer-scaling FI (Shu & Zhu's influence measure);
- ``relative FI``: mean of the layer's parameter FI divided by its largest value (1 − p_y)/p_y;
- ``ours (second order)``: :func:`lightning_sens.damage.predict_damage`, the expected KL to
  second order from the engine's Fisher metric G = Jᵀ H J (the entry matching the damage; for
  quantisation ½ Σ_c e_c² tr(G_{l,c}), e_c² the mean squared rounding error of output channel c,
  ≈ Δ_c²/12);
- ``tr G (metric only)``: mean tr(G_l), the metric alone, ignoring the size of the damage;
- ``Taylor ‖∇L‖·‖θ‖``: norm of the cross-entropy gradient (true labels, the N images) times
  the norm of the layer's parameters;
- ``Hutchinson (HAWQ)``: loss-Hessian traces estimated with ``N_V`` Rademacher vectors
  (Hessian-vector products by double backward on the mean cross-entropy): ½ σ² tr(H_l) for
  noise, ½ Σ_c e_c² tr(H_{l,c}) over the weight's output channels for quantisation (the same
  e_c² as ours), and the exact ½ δ² θ_lᵀ H θ_l (one product per layer) for scaling.

Per pixel, on the same images with the predicted class ŷ: pixels ranked by the FI 1 × 1 map
(target "pred"), the diagonal of the input metric, |∂ log p_ŷ/∂x|, |gradient × input| and at
random; the top k are edited by inversion (x → 1 − x) or by an unclipped step of 0.1 against
log p_ŷ; the table gives the drop of log p_ŷ and KL(p ‖ p_edited).

Usage: python benchmarks/damage.py [--small] [--datasets fashion digits]
       [--models cnn3 cnn_bn mlp vit] [--seeds 3] [--samples 256] [--draws 8] [--out TAG]
writes benchmarks/results/damage_<TAG>.md (TAG: ``cpu`` by default, ``small`` with ``--small``).
``--small`` is the digits with the MLP, one seed and 32 images: a smoke test of well under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sens import sensitivity
from lightning_sens.damage import predict_damage, quantization_error, quantize
from lightning_sens.demos.data import load_images

DATASETS = {"fashion": "fashion-mnist", "digits": "digits"}
MODELS = ("cnn3", "cnn_bn", "mlp", "vit")
NOISE = (0.05, 0.2)  # ρ: σ = ρ · rms of the layer's parameters
BITS = (4, 8)
DELTA = 0.1  # layer scaling by 1 ± δ
DRAWS = 8  # noise draws averaged per layer and ρ
N_V = 16  # Rademacher vectors of the Hutchinson estimate
KS = (1, 5, 20)  # pixels edited
STEP = 0.1  # the signed pixel step
EPOCHS = {"fashion": 3, "digits": 3}
BATCH = {"fashion": 64, "digits": 8}
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- models


class CNN3(nn.Module):
    """Three 3 × 3 convolutions with ReLU (max-pooling after the first two) and a linear head."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.conv3(h)), 2)
        return self.head(h.flatten(1))


class CNNBN(nn.Module):
    """Convolution, BatchNorm and ReLU blocks (the second with stride 2) and a linear head."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1))


class MLP(nn.Module):
    """Three linear layers with ReLU between them."""

    def __init__(self, inputs: int, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class Positions(nn.Module):
    """A learned position embedding added to the tokens."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(0.02 * torch.randn(tokens, dim))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.table


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention with separate q/k/v/out
    projections, then a two-layer GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def split(self, h: Tensor) -> Tensor:
        """(B, T, D) → (B, heads, T, D / heads)."""
        B, T, D = h.shape
        return h.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def attend(self, h: Tensor) -> Tensor:
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        mixed = (weights @ v).transpose(1, 2).flatten(2)
        return self.out(mixed)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attend(self.ln1(h))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class TinyViT(nn.Module):
    """Patch embedding by ``nn.Linear``, position embedding, two blocks, LayerNorm, mean
    pooling over tokens and a linear head."""

    def __init__(self, side: int, channels: int = 1, classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.patch = 4 if side >= 16 else 2
        tokens = (side // self.patch) ** 2
        self.embed = nn.Linear(channels * self.patch**2, dim)
        self.pos = Positions(tokens, dim)
        self.blocks = nn.ModuleList([Block(dim, heads=2) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch
        patches = (
            x.reshape(B, C, H // p, p, W // p, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(B, -1, C * p * p)
        )
        h = self.pos(self.embed(patches))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def build(name: str, side: int) -> nn.Module:
    """A fresh model for ``side`` × ``side`` one-channel images."""
    if name == "cnn3":
        return CNN3()
    if name == "cnn_bn":
        return CNNBN()
    if name == "mlp":
        return MLP(side * side)
    if name == "vit":
        return TinyViT(side)
    raise ValueError(f"unknown model {name!r}; choose among {MODELS}")


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, batch: int, seed: int) -> None:
    """Adam (lr 2e-3) on cross-entropy, shuffled mini-batches; leaves the model in eval mode."""
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=order).split(batch):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of correct predictions."""
    return float((model(x).argmax(-1) == y).float().mean())


# ---------------------------------------------------------------------------- damage, measured


@dataclass(frozen=True)
class Kind:
    """One kind of damage: ``family`` is "noise" (value ρ), "quant" (value (bits, per
    channel)) or "scale" (value δ)."""

    name: str
    family: str
    value: float | tuple[int, bool]


KINDS = (
    *(Kind(f"noise ρ={rho}", "noise", rho) for rho in NOISE),
    *(
        Kind(f"{bits}-bit {'channel' if pc else 'tensor'}", "quant", (bits, pc))
        for bits in BITS
        for pc in (False, True)
    ),
    Kind(f"scale ±{DELTA}", "scale", DELTA),
)


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters a module owns directly (its perturbation family)."""
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every module owning trainable parameters, in ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if own_parameters(m)}


def quantizable(module: nn.Module) -> bool:
    """Linear and Conv layers: those whose weight is quantised."""
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)


def rms(params: list[Tensor]) -> float:
    """Root mean square of all entries: ‖θ‖ / √m."""
    squares = sum(float(p.detach().double().pow(2).sum()) for p in params)
    return math.sqrt(squares / sum(p.numel() for p in params))


class Probe:
    """A float64 copy of a model and its clean log-probabilities on the evaluation images."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.x = x.double()
        self.log_p = self.log_probs(self.x)

    @torch.no_grad()
    def log_probs(self, x: Tensor) -> Tensor:
        """Log-probabilities of the (possibly edited) copy on ``x``, ``(B, K)`` float64."""
        return torch.log_softmax(self.model(x), dim=-1)

    def kl(self, x: Tensor | None = None) -> Tensor:
        """KL(p_clean ‖ p_now) per image, with the copy as it is now, ``(B,)``."""
        log_q = self.log_probs(self.x if x is None else x)
        return (self.log_p.exp() * (self.log_p - log_q)).sum(dim=-1)


@contextmanager
def restored(params: list[Tensor]) -> Iterator[None]:
    """Give the parameters back their values on exit, whatever was done to them."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def noise_damage(probe: Probe, module: nn.Module, rho: float, draws: int, seed: int) -> float:
    """Mean KL after adding N(0, (ρ · rms θ_l)² I) to all of the layer's parameters, averaged
    over ``draws`` draws."""
    params = own_parameters(module)
    sigma = rho * rms(params)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with restored(params), torch.no_grad():
        saved = [p.clone() for p in params]
        for _ in range(draws):
            for p, p0 in zip(params, saved, strict=True):
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.copy_(p0 + sigma * noise)
            total += float(probe.kl().mean())
    return total / draws


def quant_damage(probe: Probe, module: nn.Module, bits: int, per_channel: bool) -> float:
    """Mean KL after quantising the layer's weight (the bias is left alone)."""
    weight = module.weight
    with restored([weight]), torch.no_grad():
        weight.copy_(quantize(weight.detach().clone(), bits, per_channel))
        return float(probe.kl().mean())


def scale_damage(probe: Probe, module: nn.Module, delta: float) -> float:
    """Mean KL after scaling all of the layer's parameters by 1 + δ and by 1 − δ (averaged)."""
    params = own_parameters(module)
    kls = []
    with restored(params), torch.no_grad():
        saved = [p.clone() for p in params]
        for factor in (1 + delta, 1 - delta):
            for p, p0 in zip(params, saved, strict=True):
                p.copy_(factor * p0)
            kls.append(float(probe.kl().mean()))
    return sum(kls) / len(kls)


def measure_damage(
    probe: Probe, names: list[str], seed: int, draws: int = DRAWS
) -> dict[str, list[float]]:
    """Kind name → actual damage per layer (nan where the kind does not apply)."""
    modules = dict(probe.model.named_modules())
    damage: dict[str, list[float]] = {kind.name: [] for kind in KINDS}
    for i, name in enumerate(names):
        module = modules[name]
        for kind in KINDS:
            if kind.family == "noise":
                value = noise_damage(probe, module, kind.value, draws, seed * 1000 + i)
            elif kind.family == "quant":
                bits, per_channel = kind.value
                value = (
                    quant_damage(probe, module, bits, per_channel)
                    if quantizable(module)
                    else math.nan
                )
            else:
                value = scale_damage(probe, module, kind.value)
            damage[kind.name].append(value)
    return damage


# ------------------------------------------------------------------------- damage, predicted

PREDICTORS = (
    "scale FI",
    "relative FI",
    "ours (second order)",
    "tr G (metric only)",
    "Taylor ‖∇L‖·‖θ‖",
    "Hutchinson (HAWQ)",
)


@dataclass
class Predicted:
    """Predictor → kind name → value per layer; cost per predictor (text, seconds)."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cost: dict[str, tuple[str, float]] = field(default_factory=dict)

    def same_for_all(self, predictor: str, per_layer: list[float]) -> None:
        """A predictor that gives one score per layer whatever the damage."""
        self.values[predictor] = {kind.name: list(per_layer) for kind in KINDS}


def engine_predictors(
    model: nn.Module, x: Tensor, y: Tensor, names: list[str], out: Predicted
) -> None:
    """Scale FI, relative FI, the second-order prediction and tr G, from one engine call."""
    start = time.perf_counter()
    result = sensitivity(model, x, y, inputs=False, channel_metric=True)
    assert result.parameters is not None
    damage = predict_damage(model, result.parameters, noise=NOISE, bits=BITS, scale=(DELTA,))
    seconds = time.perf_counter() - start
    layers = result.parameters.layers
    out.same_for_all("scale FI", [float(layers[n].scale.fi.mean()) for n in names])
    out.same_for_all("relative FI", [float(layers[n].parameters.relative_fi.mean()) for n in names])
    out.same_for_all("tr G (metric only)", [float(damage[n].metric) for n in names])
    ours: dict[str, list[float]] = {}
    for kind in KINDS:
        if kind.family == "noise":
            ours[kind.name] = [float(damage[n].noise[kind.value]) for n in names]
        elif kind.family == "quant":
            ours[kind.name] = [float(damage[n].quant.get(kind.value, math.nan)) for n in names]
        else:
            ours[kind.name] = [float(damage[n].scale[kind.value]) for n in names]
    out.values["ours (second order)"] = ours
    text = f"engine's K−1 = {_classes(model, x) - 1}, shared by the four"
    for predictor in ("scale FI", "relative FI", "ours (second order)", "tr G (metric only)"):
        out.cost[predictor] = (text, seconds)


def _classes(model: nn.Module, x: Tensor) -> int:
    """Number of classes K of a classifier."""
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def loss_and_params(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Mean cross-entropy over (x, y) and every trainable parameter, in ``parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return F.cross_entropy(model(x), y), params


def taylor_scores(model: nn.Module, x: Tensor, y: Tensor, names: list[str]) -> list[float]:
    """‖∇_θ_l L‖ · ‖θ_l‖ per layer, L the mean cross-entropy (one backward pass)."""
    modules = dict(model.named_modules())
    loss, params = loss_and_params(model, x, y)
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params), strict=True))
    scores = []
    for name in names:
        own = own_parameters(modules[name])
        g = math.sqrt(sum(float(grads[id(p)].double().pow(2).sum()) for p in own))
        scores.append(g * math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in own)))
    return scores


def hutchinson_samples(
    model: nn.Module, x: Tensor, y: Tensor, n_v: int, seed: int
) -> dict[int, Tensor]:
    """Per parameter (keyed by ``id``), ``(n_v, *shape)`` samples v ⊙ (H v) of the diagonal of
    the loss Hessian, v Rademacher over all trainable parameters at once (2 n_v backward
    passes: one double backward per vector). Their mean over dim 0 estimates diag(H); summed
    over a layer's entries, each sample is an unbiased estimate of tr(H_l)."""
    generator = torch.Generator().manual_seed(seed)
    loss, params = loss_and_params(model, x, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples: dict[int, list[Tensor]] = {id(p): [] for p in params}
    for _ in range(n_v):
        vs = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype) for p in params
        ]
        hvs = torch.autograd.grad(grads, params, vs, retain_graph=True)
        for p, v, hv in zip(params, vs, hvs, strict=True):
            samples[id(p)].append((v * hv).detach().double())
    return {key: torch.stack(value) for key, value in samples.items()}


def layer_trace_samples(samples: dict[int, Tensor], module: nn.Module) -> Tensor:
    """``(n_v,)`` Hutchinson samples of tr(H_l) over the module's own parameters."""
    return sum(samples[id(p)].flatten(1).sum(dim=1) for p in own_parameters(module))


def curvature_along_self(model: nn.Module, x: Tensor, y: Tensor, module: nn.Module) -> float:
    """θ_lᵀ H θ_l exactly (one Hessian-vector product), H the loss Hessian of the layer."""
    loss, _ = loss_and_params(model, x, y)
    own = own_parameters(module)
    grads = torch.autograd.grad(loss, own, create_graph=True)
    hvs = torch.autograd.grad(grads, own, [p.detach() for p in own])
    return sum(
        float((p.detach().double() * hv.double()).sum()) for p, hv in zip(own, hvs, strict=True)
    )


def hutchinson_predictors(
    model: nn.Module, x: Tensor, y: Tensor, names: list[str], seed: int, out: Predicted
) -> None:
    """HAWQ-style second-order predictions from Hutchinson traces of the loss Hessian."""
    modules = dict(model.named_modules())
    start = time.perf_counter()
    samples = hutchinson_samples(model, x, y, N_V, seed)
    values: dict[str, list[float]] = {kind.name: [] for kind in KINDS}
    for name in names:
        module = modules[name]
        trace = float(layer_trace_samples(samples, module).mean())
        sigma2 = {rho: (rho * rms(own_parameters(module))) ** 2 for rho in NOISE}
        for kind in KINDS:
            if kind.family == "noise":
                values[kind.name].append(0.5 * sigma2[kind.value] * trace)
            elif kind.family == "quant" and quantizable(module):
                bits, per_channel = kind.value
                channel = samples[id(module.weight)].mean(dim=0).flatten(1).sum(dim=1)
                error = quantization_error(module.weight.detach(), bits, per_channel)
                values[kind.name].append(float(0.5 * (error * channel).sum()))
            elif kind.family == "quant":
                values[kind.name].append(math.nan)
    traces_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scale = [0.5 * DELTA**2 * curvature_along_self(model, x, y, modules[name]) for name in names]
    values[next(k.name for k in KINDS if k.family == "scale")] = scale
    out.values["Hutchinson (HAWQ)"] = values
    out.cost["Hutchinson (HAWQ)"] = (
        f"2·{N_V} = {2 * N_V} (+2 per layer for scaling)",
        traces_seconds + time.perf_counter() - start,
    )


def predict_all(model: nn.Module, x: Tensor, y: Tensor, names: list[str], seed: int) -> Predicted:
    """Every predictor of every layer's damage, with its cost."""
    out = Predicted()
    engine_predictors(model, x, y, names, out)
    start = time.perf_counter()
    out.same_for_all("Taylor ‖∇L‖·‖θ‖", taylor_scores(model, x, y, names))
    out.cost["Taylor ‖∇L‖·‖θ‖"] = ("1", time.perf_counter() - start)
    hutchinson_predictors(model, x, y, names, seed, out)
    return out


# -------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    """Spearman ρ over layers and whether the predictor's top layer is the most damaged."""

    rho: float
    top1: bool


def score(predicted: list[float], actual: list[float]) -> Score:
    """Score one predictor on one damage kind, over the layers where both are defined.

    Predictions are compared at 9 significant digits, so that a predictor that is constant up
    to rounding (relative FI where every layer reaches the largest FI) gets no ρ (nan), and a
    tie at the top is no top-1 hit."""
    pairs = [
        (float(f"{p:.9g}"), a)
        for p, a in zip(predicted, actual, strict=True)
        if math.isfinite(p) and math.isfinite(a)
    ]
    if len(pairs) < 2:
        return Score(math.nan, False)
    pred, act = zip(*pairs, strict=True)
    rho = float(spearmanr(pred, act).statistic) if len(set(pred)) > 1 else math.nan
    top = max(pred)
    top1 = pred.count(top) == 1 and act[pred.index(top)] == max(act)
    return Score(rho, top1)


@dataclass
class Run:
    """Everything measured on one trained model."""

    dataset: str
    model: str
    seed: int
    accuracy: float
    layers: list[str]
    damage: dict[str, list[float]]
    predicted: Predicted
    pixels: dict[tuple[str, str, int], tuple[float, float]]

    def scores(self) -> dict[str, dict[str, Score]]:
        """Predictor → kind name → score."""
        return {
            predictor: {
                kind.name: score(
                    self.predicted.values[predictor][kind.name], self.damage[kind.name]
                )
                for kind in KINDS
            }
            for predictor in PREDICTORS
        }

    def ratios(self, predictor: str, kind: str) -> list[float]:
        """Predicted / actual damage per layer (where both are positive and finite)."""
        pairs = zip(self.predicted.values[predictor][kind], self.damage[kind], strict=True)
        return [p / a for p, a in pairs if math.isfinite(p) and math.isfinite(a) and a > 0]


# ------------------------------------------------------------------------------------ pixels

RANKINGS = ("FI 1×1 map", "metric map", "abs(gradient)", "abs(gradient × input)", "random")
EDITS = ("invert", f"step {STEP}")


def pixel_rankings(
    model: nn.Module, x: Tensor, seed: int
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Ranking name → ``(B, C·H·W)`` score per pixel (higher: edited first), the gradient of
    log p_ŷ, ``(B, C·H·W)``, and ŷ, the predicted class, ``(B,)``."""
    r = sensitivity(model, x, "pred", windows=(1,), input_maps=True, parameters=False)
    assert r.input is not None
    gradient = r.input.gradient.flatten(1)
    generator = torch.Generator().manual_seed(seed)
    rankings = {
        "FI 1×1 map": r.input.maps[1].fi.flatten(1),
        "metric map": r.input.metric_map.flatten(1),
        "abs(gradient)": gradient.abs(),
        "abs(gradient × input)": (gradient * x.flatten(1).double()).abs(),
        "random": torch.rand(gradient.shape, generator=generator, dtype=torch.float64),
    }
    return rankings, gradient, r.target


def edit_pixels(x: Tensor, chosen: Tensor, edit: str, gradient: Tensor) -> Tensor:
    """``x`` (float64) with the chosen pixels (``(B, k)`` flat indices) edited."""
    flat = x.flatten(1).clone()
    values = flat.gather(1, chosen)
    new = 1.0 - values if edit == "invert" else values - STEP * gradient.gather(1, chosen).sign()
    return flat.scatter(1, chosen, new).view_as(x)


def pixel_damage(
    model: nn.Module, probe: Probe, seed: int
) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(ranking, edit, k) → (mean drop of log p_ŷ, mean KL(p ‖ p_edited))."""
    rankings, gradient, target = pixel_rankings(model, probe.x.float(), seed)
    predicted = target.view(-1, 1)
    clean = probe.log_p.gather(1, predicted)
    out = {}
    for ranking, values in rankings.items():
        order = values.argsort(dim=1, descending=True)
        for edit in EDITS:
            for k in KS:
                x_edit = edit_pixels(probe.x, order[:, :k], edit, gradient)
                log_q = probe.log_probs(x_edit)
                drop = float((clean - log_q.gather(1, predicted)).mean())
                kl = float((probe.log_p.exp() * (probe.log_p - log_q)).sum(-1).mean())
                out[(ranking, edit, k)] = (drop, kl)
    return out


# ------------------------------------------------------------------------------------ running


def run_one(
    dataset: str,
    model_name: str,
    seed: int,
    data: tuple[Tensor, ...],
    samples: int,
    draws: int = DRAWS,
) -> Run:
    """Train one model and measure every damage, predictor and pixel ranking on it."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build(model_name, x_train.shape[-1])
    start = time.perf_counter()
    train(model, x_train, y_train, EPOCHS[dataset], BATCH[dataset], seed)
    acc = accuracy(model, x_test, y_test)
    log(
        f"  {dataset}/{model_name} seed {seed}: trained in {time.perf_counter() - start:.1f} s, "
        f"test accuracy {acc:.3f}"
    )
    x, y = x_test[:samples], y_test[:samples]
    names = list(layers_of(model))
    probe = Probe(model, x)
    start = time.perf_counter()
    damage = measure_damage(probe, names, seed, draws)
    log(f"    damage of {len(names)} layers measured in {time.perf_counter() - start:.1f} s")
    predicted = predict_all(model, x, y, names, seed)
    costs = ", ".join(f"{k}: {s:.2f} s" for k, (_, s) in predicted.cost.items())
    log(f"    predictors: {costs}")
    start = time.perf_counter()
    pixels = pixel_damage(model, probe, seed)
    log(f"    pixels in {time.perf_counter() - start:.1f} s")
    return Run(dataset, model_name, seed, acc, names, damage, predicted, pixels)


def run(args: argparse.Namespace) -> list[Run]:
    """Every (dataset, model, seed)."""
    runs = []
    for dataset in args.datasets:
        subset = None if dataset == "digits" else (12_000, 2_000)
        _, x_train, y_train, x_test, y_test = load_images(
            DATASETS[dataset], Path("/tmp/lightning-sens-data"), subset=subset
        )
        data = (x_train, y_train, x_test, y_test)
        for model_name in args.models:
            for seed in range(args.seeds):
                runs.append(run_one(dataset, model_name, seed, data, args.samples, args.draws))
    return runs


# ------------------------------------------------------------------------------------ report


def mean(values: list[float]) -> float:
    """Mean of the finite values (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def median(values: list[float]) -> float:
    """Median (nan if empty)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def score_cells(runs: list[Run]) -> dict[str, dict[str, tuple[float, int, int]]]:
    """Predictor → kind → (mean ρ, top-1 hits, runs) over the given runs."""
    all_scores = [r.scores() for r in runs]
    return {
        predictor: {
            kind.name: (
                mean([s[predictor][kind.name].rho for s in all_scores]),
                sum(s[predictor][kind.name].top1 for s in all_scores),
                len(all_scores),
            )
            for kind in KINDS
        }
        for predictor in PREDICTORS
    }


def winners(cells: dict[str, dict[str, tuple[float, int, int]]]) -> dict[str, list[str]]:
    """Kind → the predictors with the highest mean ρ as printed (2 decimals; ties: all)."""
    out = {}
    for kind in KINDS:
        rhos = {p: round(cells[p][kind.name][0], 2) for p in PREDICTORS}
        finite = [r for r in rhos.values() if math.isfinite(r)]
        out[kind.name] = [p for p, r in rhos.items() if finite and r == max(finite)]
    return out


def layer_table(runs: list[Run], with_cost: bool = True) -> list[str]:
    """Rows: predictors; columns: mean ρ (top-1 hits / runs) per damage kind, and the cost.
    The best mean ρ per column is bold."""
    cells = score_cells(runs)
    best = winners(cells)
    head = ["predictor", *(k.name for k in KINDS)]
    if with_cost:
        head.append("cost: backward passes; s")
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for predictor in PREDICTORS:
        row = [predictor]
        for kind in KINDS:
            rho, hits, n = cells[predictor][kind.name]
            text = f"{'n/a' if math.isnan(rho) else f'{rho:.2f}'} ({hits}/{n})"
            row.append(f"**{text}**" if predictor in best[kind.name] else text)
        if with_cost:
            passes = runs[0].predicted.cost[predictor][0]
            seconds = mean([r.predicted.cost[predictor][1] for r in runs])
            row.append(f"{passes}; {seconds:.2f} s")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def calibration_table(runs: list[Run]) -> list[str]:
    """Median over all layers and runs of predicted / actual damage, for the two predictors that
    predict the KL itself."""
    head = ["predictor", *(k.name for k in KINDS)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(KINDS) + "|"]
    for predictor in ("ours (second order)", "Hutchinson (HAWQ)"):
        row = [predictor]
        for kind in KINDS:
            ratios = [q for r in runs for q in r.ratios(predictor, kind.name)]
            row.append(f"{median(ratios):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def pixel_table(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """Rows: ranking × edit; columns: drop of log p_ŷ and KL at each k (mean over images,
    models and seeds). Bold: the largest per column within each edit. Also the winning ranking
    per (edit, measure, k)."""
    means = {
        key: tuple(mean([r.pixels[key][i] for r in runs]) for i in (0, 1)) for key in runs[0].pixels
    }
    columns = [(i, k) for i in (0, 1) for k in KS]
    best = {
        (edit, i, k): max(RANKINGS, key=lambda name, e=edit, i=i, k=k: means[(name, e, k)][i])
        for edit in EDITS
        for i, k in columns
    }
    head = ["ranking", "edit", *(f"{('drop log p', 'KL')[i]}, k={k}" for i, k in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * len(columns) + "|"]
    for edit in EDITS:
        for ranking in RANKINGS:
            row = [ranking, edit]
            for i, k in columns:
                text = f"{means[(ranking, edit, k)][i]:.3g}"
                row.append(f"**{text}**" if best[(edit, i, k)] == ranking else text)
            lines.append("| " + " | ".join(row) + " |")
    wins = {
        f"{edit}, {('drop log p', 'KL')[i]}, k={k}": best[(edit, i, k)]
        for edit in EDITS
        for i, k in columns
    }
    return lines, wins


def header(args: argparse.Namespace, seconds: float) -> list[str]:
    """How the report was produced: command, machine, settings."""
    command = " ".join(["python benchmarks/damage.py", *sys.argv[1:]])
    training = "; ".join(f"{d}: {EPOCHS[d]} epochs, batch {BATCH[d]}" for d in args.datasets)
    return [
        "# Which score predicts damage? (benchmarks/damage.py)",
        "",
        f"Produced by `{command}` on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}, {args.threads} torch thread(s)), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"{seconds:.0f} s in all.",
        "",
        f"Datasets: {', '.join(args.datasets)}; models: {', '.join(args.models)}; "
        f"{args.seeds} seed(s) each (seed = initialisation and batch order); training: Adam "
        f"2e-3 ({training}). Damage, predictors and pixel edits on the first {args.samples} test "
        f"images; damage measured with a float64 copy of the model; noise averaged over "
        f"{args.draws} draws; Hutchinson with {N_V} Rademacher vectors.",
        "",
        "Cells: Spearman ρ between predictor and measured damage over the layers of one trained "
        "model, averaged over seeds, and (k/n): the runs where the predictor's top layer is the "
        "most damaged one. Quantisation columns rank only the Linear and Conv layers (weights). "
        "n/a: the predictor is the same for every layer (relative FI is 1 wherever a layer "
        "reaches the largest FI). Bold: the best mean ρ of the column. Quantisation predictions "
        "(ours and Hutchinson alike) use each output channel's mean squared rounding error as "
        "the error variance. Cost: backward passes over the evaluation images beyond the "
        "forward pass, and wall time per run.",
    ]


def computed_notes(runs: list[Run]) -> list[str]:
    """Findings read off the numbers (no typed conclusions)."""
    cells = score_cells(runs)
    best = winners(cells)
    ours, hutch = cells["ours (second order)"], cells["Hutchinson (HAWQ)"]
    diffs = "; ".join(f"{k.name}: {ours[k.name][0] - hutch[k.name][0]:+.2f}" for k in KINDS)
    engine = mean([r.predicted.cost["ours (second order)"][1] for r in runs])
    hutchinson = mean([r.predicted.cost["Hutchinson (HAWQ)"][1] for r in runs])
    return [
        "Best mean ρ per damage kind: "
        + "; ".join(f"{kind}: {' = '.join(names) or 'none'}" for kind, names in best.items())
        + ".",
        "",
        f"Mean ρ of ours minus Hutchinson's: {diffs}.",
        "",
        f"Mean wall time per run: engine call (all four engine predictors) {engine:.2f} s, "
        f"Hutchinson with the scaling products {hutchinson:.2f} s "
        f"({hutchinson / engine:.1f}× the engine).",
    ]


def report(runs: list[Run], args: argparse.Namespace, seconds: float) -> str:
    """The markdown report."""
    lines = header(args, seconds)
    for dataset in args.datasets:
        for model_name in args.models:
            chosen = [r for r in runs if r.dataset == dataset and r.model == model_name]
            accs = ", ".join(f"{r.accuracy:.3f}" for r in chosen)
            lines += [
                "",
                f"## {dataset} / {model_name}",
                "",
                f"{len(chosen[0].layers)} layers; test accuracy per seed: {accs}.",
                "",
                *layer_table(chosen),
            ]
    for dataset in args.datasets:
        chosen = [r for r in runs if r.dataset == dataset]
        lines += [
            "",
            f"## Pooled: {dataset}, mean over models and seeds",
            "",
            *layer_table(chosen, with_cost=False),
        ]
    lines += [
        "",
        "## Pooled over datasets, models and seeds",
        "",
        *layer_table(runs, with_cost=False),
        "",
        *computed_notes(runs),
        "",
        "## Absolute accuracy of the KL predictions",
        "",
        "Median over all layers and runs of predicted / measured mean KL (1: exact).",
        "",
        *calibration_table(runs),
    ]
    for dataset in args.datasets:
        table, wins = pixel_table([r for r in runs if r.dataset == dataset])
        counts = {name: sum(w == name for w in wins.values()) for name in RANKINGS}
        leader = max(counts, key=counts.__getitem__)
        lines += [
            "",
            f"## Pixels: {dataset}",
            "",
            "The top-k pixels of each ranking edited (invert: x → 1 − x; step: x − "
            f"{STEP}·sign(∂ log p_ŷ/∂x), unclipped), ŷ the predicted class; drop of log p_ŷ and "
            f"KL(p ‖ p_edited), mean over {args.samples} images, the models and the seeds. Bold: "
            "the largest of the column within each edit.",
            "",
            *table,
            "",
            f"Columns won (of {len(wins)}): "
            + ", ".join(f"{name} {n}" for name, n in counts.items())
            + f"; most: {leader}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="digits, mlp, 1 seed, 32 images")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--draws", type=int, default=DRAWS, help="noise draws averaged per layer and level"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on shared cores)"
    )
    parser.add_argument("--out", default=None, help="tag: writes results/damage_<TAG>.md")
    args = parser.parse_args()
    if args.small:
        args.datasets, args.models, args.seeds, args.samples = ["digits"], ["mlp"], 1, 32
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = run(args)
    text = report(runs, args, time.perf_counter() - start)
    tag = args.out or ("small" if args.small else "cpu")
    path = Path(tag) if tag.endswith(".md") else RESULTS / f"damage_{tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"wrote {path}")
    print(text)


if __name__ == "__main__":
    main()
