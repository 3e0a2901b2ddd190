"""Benchmark: finding wrong labels — the monitor's flags against what users would pick instead.

Real data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``: 12,000 training images) and
scikit-learn's 8 × 8 digits (1,297 training images). Labels are corrupted at several rates, in
three ways (``--kinds``):

- ``symmetric``: to any other class, uniformly;
- ``pairs``: between similar classes (Fashion-MNIST: T-shirt ↔ shirt, pullover ↔ coat, sneaker ↔
  ankle boot; digits: 1 ↔ 7, 3 ↔ 8, 5 ↔ 6; the rate is the share of those classes' samples moved
  to their partner);
- ``instance``: instance-dependent, the usual stand-in for human mistakes: a separately trained
  model (the demo CNN, on Fashion-MNIST training images 30,000–41,999 that the benchmark never
  uses; on the digits, each half of the training set by a model trained on the other half)
  gives every image probabilities; the images to mislabel are drawn with weights 1 − p(true
  class), hard ones likelier, and each gets a wrong label drawn from that model's
  probabilities over the other classes.

Every method trains the same model (``--models``: the demo's small CNN, ``cnn3`` three
convolutions with BatchNorm and dropout, ``mlp`` one hidden layer with dropout, ``resnet`` a
small ResNet; Adam 1e-3, batch 128, each of ``--epochs`` training lengths) with the same seed,
for each of ``--seeds`` (which also draws the corruption):

- ``monitor``: ``SensitivityMonitor()`` (training-set scores from the training steps, the
  "counterfactual" rule on the evidence of the steps since the second epoch), at its defaults
  and with the exact-engine probes off (``exact_probe_size=0``: the flags alone), and with the
  opt-in rule ``flag_rule="counterfactual_pairs"``;
- ``cleanlab``: ``cleanlab.filter.find_label_issues`` on 4-fold cross-validated probabilities
  (its documented use; four more trainings on 3/4 of the data);
- ``AUM``: area under the margin with threshold samples (Pleiss et al. 2020): two runs, each
  with a different 1/(K+1) of the samples moved to an extra class; a sample is flagged when its
  AUM falls below the 99th percentile of the threshold samples' AUM;
- ``loss`` (eval loss after training) and ``TracIn`` (Captum's ``TracInCPFast`` self-influence
  over the epoch checkpoints): rankings with no rule; their F1 is at n = the true number of bad
  labels, an oracle no user has, reported as an upper bound.

Precision, recall and F1 of the flagged set against the corrupted labels, AUROC of each
method's score, and cost: wall time relative to one plain training run of the same model on the
same machine. With several seeds each number is their mean and F1 shows its range.

Usage: pip install -e ".[bench]"; python benchmarks/label_noise.py [--small] [--out FILE.md]
       [--accelerator cpu|gpu] [--datasets fashion-mnist digits] [--methods flags cleanlab ...]
       [--kinds symmetric pairs instance] [--models cnn cnn3 mlp resnet] [--epochs 2 6]
       [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sens import SensitivityMonitor
from lightning_sens.demos.data import load_images
from lightning_sens.demos.models import SmallCNN
from lightning_sens.flagging import flag

METHODS = {  # command-line name: name in the table
    "flags": "monitor, flags only",
    "defaults": "monitor, defaults",
    "pairs": "monitor, flag_rule=counterfactual_pairs",
    "cleanlab": "cleanlab (4-fold)",
    "aum": "AUM (threshold samples)",
    "rankings": "loss and TracIn",
}
PAIRS = {"fashion-mnist": ((0, 6), (2, 4), (7, 9)), "digits": ((1, 7), (3, 8), (5, 6))}
KINDS = ("symmetric", "pairs", "instance")
MODELS = {  # command-line name: name in the table
    "cnn": "demo CNN",
    "cnn3": "3 conv + BN + dropout",
    "mlp": "MLP + dropout",
    "resnet": "small ResNet",
}


class Indexed(Dataset):
    """(image, label, index): the methods that need ids read them from the batch."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


class Block(nn.Module):
    """A ResNet basic block: two 3 × 3 convolutions with BatchNorm, and the shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def network(model: str, outputs: int, side: int) -> nn.Module:
    """The benchmark's models for 1-channel ``side`` × ``side`` images."""
    if model == "cnn":  # the demo's small CNN
        net = SmallCNN(channels=1).net
        net[-1] = nn.Linear(32 * 4 * 4, outputs)
        return net
    if model == "cnn3":  # three convolutions, BatchNorm and dropout
        layers: list[nn.Module] = []
        for inputs, width, pool in ((1, 32, True), (32, 64, True), (64, 64, False)):
            layers += [nn.Conv2d(inputs, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if pool else []
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, outputs)
        )
    if model == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(side * side, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, outputs),
        )
    if model == "resnet":  # three stages of one basic block each
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            Block(16, 16, 1),
            Block(16, 32, 2),
            Block(32, 64, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, outputs),
        )
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")


class Net(pl.LightningModule):
    """One of the benchmark's networks, reading (x, y, ids) batches, with ``outputs`` classes."""

    def __init__(self, model: str = "cnn", outputs: int = 10, side: int = 28) -> None:
        super().__init__()
        self.net = network(model, outputs, side)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])


def corrupt(
    y: Tensor,
    rate: float,
    kind: str,
    pairs: tuple[tuple[int, int], ...],
    seed: int,
    probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Noisy labels and the mask of corrupted ones; ``instance`` needs ``probs``, a separate
    model's ``(N, K)`` probabilities of every image."""
    g = torch.Generator().manual_seed(seed)
    noisy = y.clone()
    if kind == "instance":
        assert probs is not None, "instance-dependent noise needs a separate model's probabilities"
        return instance_noise(y, probs, rate, g)
    if kind == "symmetric":
        chosen = torch.randperm(len(y), generator=g)[: int(rate * len(y))]
        noisy[chosen] = (y[chosen] + torch.randint(1, 10, (len(chosen),), generator=g)) % 10
    else:
        partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        for c in sorted(partner):
            members = torch.nonzero(y == c).flatten()
            chosen = members[torch.randperm(len(members), generator=g)[: int(rate * len(members))]]
            noisy[chosen] = partner[c]
    return noisy, noisy != y


def instance_noise(
    y: Tensor, probs: Tensor, rate: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``rate`` × N images, drawn without replacement with weights 1 − p(true class) (hard
    images likelier), each given a wrong label drawn from ``probs`` over the other classes."""
    count = int(rate * len(y))
    noisy = y.clone()
    if count == 0:
        return noisy, noisy != y
    hard = (1 - probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)).clamp(min=1e-3).double()
    chosen = torch.multinomial(hard, count, replacement=False, generator=generator)
    others = probs[chosen].double().clamp(min=1e-12).scatter(-1, y[chosen].unsqueeze(-1), 0.0)
    noisy[chosen] = torch.multinomial(others, 1, generator=generator).squeeze(-1)
    return noisy, noisy != y


@dataclass
class Setting:
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    epochs: int
    accelerator: str
    seed: int = 0
    model: str = "cnn"


def fit(
    s: Setting,
    x: Tensor,
    y: Tensor,
    callbacks: list[pl.Callback] | None = None,
    outputs: int = 10,
) -> tuple[Net, float]:
    """Train the model on (x, y) with the setting's recipe; (model, seconds)."""
    pl.seed_everything(s.seed, verbose=False)
    model = Net(s.model, outputs, x.shape[-1])
    train = DataLoader(Indexed(x, y), batch_size=128, shuffle=True)
    val = DataLoader(Indexed(s.x_val, s.y_val), batch_size=500)
    trainer = pl.Trainer(
        max_epochs=s.epochs,
        accelerator=s.accelerator,
        devices=1,
        logger=False,
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir="/tmp/lightning-sens-label-noise",
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    return model, time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(b.to(device)).float().cpu() for b in x.split(1000)])


def monitor_method(s: Setting, y: Tensor, **options: object) -> tuple[Tensor, Tensor, float]:
    monitor = SensitivityMonitor(**options)
    _, seconds = fit(s, s.x, y, [monitor])
    evidence = monitor.tracker.evidence
    assert evidence is not None, "the training steps were scored"
    assert len(evidence.ids) == len(y), "every sample was scored"
    own = evidence.mean.gather(-1, evidence.labels.unsqueeze(-1)).squeeze(-1)
    decision = flag(
        own,
        monitor.config.flag_rule,
        label_scores=evidence.mean,
        labels=evidence.labels,
        at_least=monitor.tracker.noise_floor,
    )
    flagged = torch.zeros(len(y), dtype=torch.bool)
    flagged[evidence.ids] = decision.flagged
    score = torch.zeros(len(y), dtype=torch.float64)
    score[evidence.ids] = own
    return flagged, score, seconds


def cleanlab_method(s: Setting, y: Tensor) -> tuple[Tensor, Tensor, float]:
    from cleanlab.filter import find_label_issues

    folds = torch.randperm(len(y), generator=torch.Generator().manual_seed(s.seed)) % 4
    probs = torch.zeros(len(y), 10)
    total = 0.0
    for k in range(4):
        model, seconds = fit(s, s.x[folds != k], y[folds != k])
        probs[folds == k] = predict(model, s.x[folds == k]).softmax(-1)
        total += seconds
    flagged = find_label_issues(y.numpy(), probs.numpy())
    score = 1 - probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return torch.as_tensor(flagged), score.double(), total


class Margins(pl.Callback):
    """AUM: each sample's margin (assigned logit − largest other logit) at every step."""

    def __init__(self, n: int) -> None:
        self.total = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)
        self._logits: Tensor | None = None
        self._handle: object = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        def keep(_: nn.Module, __: object, out: Tensor) -> None:
            self._logits = out.detach()

        self._handle = module.register_forward_hook(keep)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: object, batch: list, i: int
    ) -> None:
        _, y, ids = batch
        z = self._logits
        assert z is not None
        assigned = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        other = z.scatter(-1, y.unsqueeze(-1), float("-inf")).max(-1).values
        self.total[ids.cpu()] += (assigned - other).double().cpu()
        self.count[ids.cpu()] += 1


def aum_method(s: Setting, y: Tensor) -> tuple[Tensor, Tensor, float]:
    n, k = len(y), 10
    order = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed + 7))
    flagged = torch.zeros(n, dtype=torch.bool)
    score = torch.zeros(n, dtype=torch.float64)
    decided = torch.zeros(n, dtype=torch.bool)
    total = 0.0
    for run in range(2):
        threshold = order[run * (n // (k + 1)) : (run + 1) * (n // (k + 1))]
        assigned = y.clone()
        assigned[threshold] = k  # the extra class: every one of these is a wrong label
        margins = Margins(n)
        _, seconds = fit(s, s.x, assigned, [margins], outputs=k + 1)
        total += seconds
        aum = margins.total / margins.count.clamp(min=1)
        cut = torch.quantile(aum[threshold], 0.99)
        fresh = torch.ones(n, dtype=torch.bool)
        fresh[threshold] = False
        fresh &= ~decided
        flagged[fresh] = aum[fresh] < cut
        score[fresh] = -aum[fresh]
        decided |= fresh
    return flagged, score, total


def ranking_methods(s: Setting, y: Tensor) -> dict[str, tuple[Tensor, float]]:
    """Loss after training and TracIn self-influence over the epoch checkpoints."""
    checkpoints: list[dict[str, Tensor]] = []

    class Keep(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            checkpoints.append(copy.deepcopy(module.state_dict()))

    model, seconds = fit(s, s.x, y, [Keep()])
    loss = nn.functional.cross_entropy(predict(model, s.x), y, reduction="none")
    out = {"loss": (loss.double(), seconds * 1.0)}
    try:
        from captum.influence import TracInCPFast
    except ImportError:
        return out
    model = model.cpu().eval()
    paths = []
    folder = Path("/tmp/lightning-sens-label-noise/tracin")
    folder.mkdir(parents=True, exist_ok=True)
    for i, state in enumerate(checkpoints):
        paths.append(str(folder / f"epoch{i}.pt"))
        torch.save({k: v.cpu() for k, v in state.items()}, paths[-1])

    def load(net: nn.Module, path: str) -> float:
        net.load_state_dict(torch.load(path))
        return 1e-3

    start = time.perf_counter()
    data = torch.utils.data.TensorDataset(s.x, y)
    tracin = TracInCPFast(
        model,
        model.net[-1],
        data,
        paths,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=1000,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        influence = tracin.self_influence(show_progress=False)
    out["TracIn"] = (influence.double(), seconds + time.perf_counter() - start)
    return out


def quality(flagged: Tensor, bad: Tensor) -> tuple[float, float, float]:
    hits = int((flagged & bad).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(int(bad.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def auroc(score: Tensor, bad: Tensor) -> float:
    if bad.all() or not bad.any():
        return float("nan")
    ranks = score.argsort().argsort().double() + 1
    n_bad = int(bad.sum())
    return float((ranks[bad].sum() - n_bad * (n_bad + 1) / 2) / (n_bad * (len(bad) - n_bad)))


def top_n(score: Tensor, n: int) -> Tensor:
    flagged = torch.zeros(len(score), dtype=torch.bool)
    flagged[score.argsort(descending=True)[:n]] = True
    return flagged


def separate_probabilities(name: str, x: Tensor, y: Tensor, s: Setting) -> Tensor:
    """Every training image's class probabilities from a demo CNN that never saw it: on
    Fashion-MNIST one trained on training images 30,000–41,999 (the benchmark uses the first
    12,000); on the digits, each half by a model trained on the other half."""
    recipe = Setting(x, y, s.x_val, s.y_val, 6, s.accelerator, seed=100)
    if name == "digits":
        probs = torch.zeros(len(y), 10)
        half = torch.arange(len(y)) % 2 == 0
        for part in (half, ~half):
            model, _ = fit(recipe, x[~part], y[~part])
            probs[part] = predict(model, x[part]).softmax(-1)
        return probs
    _, x_all, y_all, _, _ = load_images(name, Path("/tmp/lightning-sens-data"), subset=None)
    model, _ = fit(recipe, x_all[30_000:42_000], y_all[30_000:42_000])
    return predict(model, x).softmax(-1)


@dataclass
class Outcome:
    """One method on one setting, over the seeds."""

    flagged: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    quality: list[tuple[float, float, float]] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)

    def row(self, key: tuple[str, str, int, str, int, str], total: int) -> str:
        name, model, epochs, kind, rate, method = key
        mean = statistics.fmean
        p, r, f = (mean(q[i] for q in self.quality) for i in range(3))
        f1s = [q[2] for q in self.quality]
        spread = f" ({min(f1s):.2f}–{max(f1s):.2f})" if len(f1s) > 1 else ""
        flagged = mean(self.flagged)
        share = f"{flagged:.0f} / {mean(self.bad):.0f}"
        if rate == 0:
            share = f"{flagged:.0f} ({100 * flagged / total:.2f} %)"
        return (
            f"| {name} | {MODELS[model]} | {epochs} | {kind} | {rate} | {method} | {share} | "
            f"{p:.2f} | {r:.2f} | {f:.2f}{spread} | {_number(mean(self.auroc), 3)} | "
            f"{mean(self.cost):.1f}× |"
        )


def _number(value: float, digits: int) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN: AUROC on clean labels


def run(args: argparse.Namespace) -> list[str]:
    outcomes: dict[tuple[str, str, int, str, int, str], Outcome] = {}
    lines = []
    for dataset in args.datasets:
        name, x, y, x_val, y_val = load_images(dataset, Path("/tmp/lightning-sens-data"))
        base = Setting(x, y, x_val[:500], y_val[:500], 0, args.accelerator)
        probs = separate_probabilities(name, x, y, base) if "instance" in args.kinds else None
        for model in args.models:
            for epochs in args.epochs:
                for seed in args.seeds:
                    s = Setting(x, y, base.x_val, base.y_val, epochs, args.accelerator, seed, model)
                    _, plain = fit(s, x, y)
                    _, plain = fit(s, x, y)  # warm caches: the plain cost to compare with
                    for kind, rate in settings_of(args):
                        noisy, bad = corrupt(y, rate / 100, kind, PAIRS[name], 1 + seed, probs)
                        label = "none" if rate == 0 else kind
                        for method, (found, score, seconds) in methods(args, s, noisy):
                            flagged = top_n(score, int(bad.sum())) if found is None else found
                            key = (name, model, epochs, label, rate, method)
                            outcome = outcomes.setdefault(key, Outcome())
                            outcome.flagged.append(int(flagged.sum()))
                            outcome.bad.append(int(bad.sum()))
                            outcome.quality.append(quality(flagged, bad))
                            outcome.auroc.append(auroc(score, bad))
                            outcome.cost.append(seconds / plain)
                            print(outcome.row(key, len(y)), f"(seed {seed})", flush=True)
        for key, outcome in outcomes.items():
            if key[0] == name:
                lines.append(outcome.row(key, len(y)))
    return lines


def settings_of(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(kind, rate) to run: clean labels once, then every kind at every other rate."""
    out = [("symmetric", 0)] if 0 in args.rates else []
    return out + [(kind, rate) for kind in args.kinds for rate in args.rates if rate != 0]


def methods(
    args: argparse.Namespace, s: Setting, noisy: Tensor
) -> list[tuple[str, tuple[Tensor | None, Tensor, float]]]:
    """Every method asked for on (s, noisy labels): (name, (flagged, score, seconds)); a ranking
    without a rule has no flagged set (None)."""
    every: dict[str, Callable[[Setting, Tensor], tuple[Tensor, Tensor, float]]] = {
        "flags": partial(monitor_method, exact_probe_size=0),
        "defaults": monitor_method,
        "pairs": partial(monitor_method, exact_probe_size=0, flag_rule="counterfactual_pairs"),
        "cleanlab": cleanlab_method,
        "aum": aum_method,
    }
    out = [(METHODS[m], f(s, noisy)) for m, f in every.items() if m in args.methods]
    if "rankings" in args.methods:  # no rule: flagged below at the true number of bad labels
        for method, (score, seconds) in ranking_methods(s, noisy).items():
            out.append((f"{method}, top n (oracle)", (None, score, seconds)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="digits, monitor only, 0 and 20 %%")
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "digits"])
    parser.add_argument(
        "--kinds", nargs="+", default=["symmetric", "pairs", "instance"], choices=KINDS
    )
    parser.add_argument("--rates", nargs="+", type=int, default=[0, 3, 10, 20, 40])
    parser.add_argument("--models", nargs="+", default=["cnn"], choices=MODELS)
    parser.add_argument("--epochs", nargs="+", type=int, default=[6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="which methods to run (default: all)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.small:
        args.datasets, args.kinds, args.rates = ["digits"], ["symmetric"], [0, 20]
        args.methods = ["flags"]
    torch.set_float32_matmul_precision("highest")
    lines = run(args)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor()
    seeds = len(args.seeds)
    header = [
        f"Measured by `benchmarks/label_noise.py` on {device or platform.machine()} "
        f"({args.accelerator}, torch {torch.__version__}), {seeds} seed{'s' * (seeds > 1)}"
        f"{' (mean; F1 with its range)' if seeds > 1 else ''}. flagged / bad: flagged samples "
        "and truly corrupted labels; on clean labels (noise none), the flagged samples and their "
        "share.",
        "",
        "| data | model | epochs | noise | % | method | flagged / bad | precision | recall | F1 | "
        "AUROC | cost |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
