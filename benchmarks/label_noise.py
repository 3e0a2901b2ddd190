"""Benchmark: finding wrong labels — the monitor's flags against what users would pick instead.

Real data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``: 12,000 training images) and
scikit-learn's 8 × 8 digits (1,297 training images). Labels are corrupted at several rates,
symmetrically (to any other class) or between similar classes (Fashion-MNIST: T-shirt ↔ shirt,
pullover ↔ coat, sneaker ↔ ankle boot; digits: 1 ↔ 7, 3 ↔ 8, 5 ↔ 6; the rate is the share of
those classes' samples moved to their partner). Every method trains the same model (the demo's
small CNN, Adam 1e-3, batch 128, ``--epochs`` epochs) with the same seed:

- ``monitor``: ``SensitivityMonitor()`` (training-set scores from the training steps, the
  "counterfactual" rule on the evidence of all steps), at its defaults and with the exact-engine
  probes off (``exact_probe_size=0``: the flags alone), and with the opt-in rule
  ``flag_rule="counterfactual_pairs"``;
- ``cleanlab``: ``cleanlab.filter.find_label_issues`` on 4-fold cross-validated probabilities
  (its documented use; four more trainings on 3/4 of the data);
- ``AUM``: area under the margin with threshold samples (Pleiss et al. 2020): two runs, each
  with a different 1/(K+1) of the samples moved to an extra class; a sample is flagged when its
  AUM falls below the 99th percentile of the threshold samples' AUM;
- ``loss`` (eval loss after training) and ``TracIn`` (Captum's ``TracInCPFast`` self-influence
  over the epoch checkpoints): rankings with no rule; their F1 is at n = the true number of bad
  labels, an oracle no user has, reported as an upper bound.

Precision, recall and F1 of the flagged set against the corrupted labels, AUROC of each
method's score, and cost: wall time relative to one plain training run on the same machine.

Usage: pip install -e ".[bench]"; python benchmarks/label_noise.py [--small] [--out FILE.md]
       [--accelerator cpu|gpu] [--datasets fashion-mnist digits] [--methods flags cleanlab ...]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


class Indexed(Dataset):
    """(image, label, index): the methods that need ids read them from the batch."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


class Net(SmallCNN):
    """The demo's CNN, reading (x, y, ids) batches, with ``outputs`` classes."""

    def __init__(self, outputs: int = 10) -> None:
        super().__init__(channels=1, lr=1e-3)
        self.net[-1] = nn.Linear(32 * 4 * 4, outputs)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])


def corrupt(
    y: Tensor, rate: float, kind: str, pairs: tuple[tuple[int, int], ...], seed: int
) -> tuple[Tensor, Tensor]:
    """Noisy labels and the mask of corrupted ones."""
    g = torch.Generator().manual_seed(seed)
    noisy = y.clone()
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


@dataclass
class Setting:
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    epochs: int
    accelerator: str
    seed: int = 0


def fit(
    s: Setting,
    x: Tensor,
    y: Tensor,
    callbacks: list[pl.Callback] | None = None,
    outputs: int = 10,
) -> tuple[Net, float]:
    """Train the model on (x, y) with the setting's recipe; (model, seconds)."""
    pl.seed_everything(s.seed, verbose=False)
    model = Net(outputs)
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


def run(args: argparse.Namespace) -> list[str]:
    lines = []
    for dataset in args.datasets:
        name, x, y, x_val, y_val = load_images(dataset, Path("/tmp/lightning-sens-data"))
        s = Setting(x, y, x_val[:500], y_val[:500], args.epochs, args.accelerator)
        _, plain = fit(s, x, y)
        _, plain = fit(s, x, y)  # the second run: warm caches, the plain cost to compare with
        for kind in args.kinds:
            for rate in args.rates:
                if kind == "pairs" and rate == 0:
                    continue  # the same labels as symmetric noise at 0 %
                noisy, bad = corrupt(y, rate / 100, kind, PAIRS[name], seed=1)
                every: dict[str, Callable[[Setting, Tensor], tuple[Tensor, Tensor, float]]] = {
                    "flags": partial(monitor_method, exact_probe_size=0),
                    "defaults": monitor_method,
                    "pairs": partial(
                        monitor_method, exact_probe_size=0, flag_rule="counterfactual_pairs"
                    ),
                    "cleanlab": cleanlab_method,
                    "aum": aum_method,
                }
                methods = {METHODS[m]: f for m, f in every.items() if m in args.methods}
                for method, compute in methods.items():
                    flagged, score, seconds = compute(s, noisy)
                    p, r, f = quality(flagged, bad)
                    lines.append(
                        f"| {name} | {kind} | {rate} | {method} | {int(flagged.sum())} / "
                        f"{int(bad.sum())} | {p:.2f} | {r:.2f} | {f:.2f} | "
                        f"{auroc(score, bad):.3f} | {seconds / plain:.1f}× |"
                    )
                    print(lines[-1], flush=True)
                if "rankings" not in args.methods:
                    continue
                for method, (score, seconds) in ranking_methods(s, noisy).items():
                    p, r, f = quality(top_n(score, int(bad.sum())), bad)
                    lines.append(
                        f"| {name} | {kind} | {rate} | {method}, top n (oracle) | "
                        f"{int(bad.sum())} / {int(bad.sum())} | {p:.2f} | {r:.2f} | {f:.2f} | "
                        f"{auroc(score, bad):.3f} | {seconds / plain:.1f}× |"
                    )
                    print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="digits, monitor only, 0 and 20 %%")
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "digits"])
    parser.add_argument("--kinds", nargs="+", default=["symmetric", "pairs"])
    parser.add_argument("--rates", nargs="+", type=int, default=[0, 3, 10, 20, 40])
    parser.add_argument("--epochs", type=int, default=6)
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
    header = [
        f"Measured by `benchmarks/label_noise.py` on {device or platform.machine()} "
        f"({args.accelerator}, torch {torch.__version__}), {args.epochs} epochs. "
        "flagged / bad: flagged samples and truly corrupted labels.",
        "",
        "| data | noise | % | method | flagged / bad | precision | recall | F1 | AUROC | cost |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
