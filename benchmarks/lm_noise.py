"""Benchmark: which documents of a language model's training set are unlike the rest (garbled
or replaced text), flagged by a default ``SensitivityMonitor()`` during training, against
perplexity filtering with a model trained out of sample.

Two corpora and two models, so that nothing is tuned to one:

- ``stdlib``: the Python standard library's top-level ``*.py`` files (in name order), cut by
  Python's own ``tokenize`` into tokens; a small causal transformer (2 layers, width 64).
- ``fortunes``: Debian's ``fortunes`` collection (``apt-get install fortunes``: short English
  texts; skipped with a line where it is not installed), cut into words at white space; a
  one-layer LSTM, the model of Lightning's demo.

The ``VOCAB − 1`` most frequent tokens make the vocabulary (one more for the rest): 2,048 > the
1,024 classes up to which the monitor judges labels, so it flags documents. Documents are
windows of ``LENGTH`` + 1 tokens (inputs and next tokens). A share of the training documents is
corrupted: ``shuffle`` (its tokens in random order) or ``replace`` (30 % of its tokens replaced
by random tokens of the vocabulary).

Ours: a Lightning ``Trainer`` with ``SensitivityMonitor()`` at its defaults; the flags are the
positions table's ``flagged`` column of the training split at the last decision, the AUROC its
``evidence``'s (the mean over decisions of how far the document's loss lies above the others').
Perplexity filtering: per-document loss (log perplexity) of two models, each trained on one
half and scoring the other (the out-of-sample reference model such filters use); flagged by the
same robust cut (3.5 robust standard deviations above the median), and at the cut that flags
exactly as many documents as are corrupted (an oracle: the best a percentile filter can do);
AUROC of its ranking. ``training loss``: the AUROC of the monitor's per-document loss at the
last decision (a ranking only). Costs: the monitored run and the cross-validation over a plain
run (plain, monitored and cross-validated runs alternate, the fastest of each counts).

Usage: pip install -e ".[bench]"; python benchmarks/lm_noise.py [--small] [--out TAG] [--strides]
writes benchmarks/results/lm_noise_<TAG>.md (TAG: ``cpu``; ``small`` with ``--small``), or the
path TAG where it ends in .md; ``--strides``: the flags at fixed ``position_stride`` values
instead, in lm_strides_<TAG>.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from segmentation_noise import auroc, decisions_of, scores, stride_of
from token_noise import tagged
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor
from lightning_sens.flagging import robust_z

VOCAB = 2048
LENGTH = 64
BATCH = 64
EPOCHS = 5
RATES = (0.02, 0.05, 0.1)
KINDS = ("shuffle", "replace")
REPLACED = 0.3
CUT = 3.5  # the monitor's default flag_threshold
FORTUNES = Path("/usr/share/games/fortunes")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stdlib_tokens(count: int) -> list[str]:
    """The first ``count`` tokens of the standard library's top-level modules."""
    out: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += [w for w, _ in tagged(path.read_text(errors="replace"))]
        if len(out) >= count:
            break
    return out[:count]


def fortune_tokens(count: int) -> list[str]:
    """The first ``count`` words of the fortunes collection (its files in name order)."""
    out: list[str] = []
    for path in sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix):
        out += path.read_text(errors="replace").replace("%", " ").split()
        if len(out) >= count:
            break
    return out[:count]


def documents(tokens: list[str]) -> Tensor:
    """Windows of ``LENGTH + 1`` token ids (0: a token outside the vocabulary)."""
    common = [w for w, _ in Counter(tokens).most_common(VOCAB - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}
    ids = torch.tensor([index.get(w, 0) for w in tokens])
    n = len(ids) // (LENGTH + 1)
    return ids[: n * (LENGTH + 1)].view(n, LENGTH + 1)


def corrupt(docs: Tensor, rate: float, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """``rate`` of the documents shuffled or with ``REPLACED`` of their tokens replaced; returns
    them and which."""
    g = torch.Generator().manual_seed(seed)
    out, bad = docs.clone(), torch.zeros(len(docs), dtype=torch.bool)
    for i in torch.randperm(len(docs), generator=g)[: round(rate * len(docs))].tolist():
        bad[i] = True
        if kind == "shuffle":
            out[i] = docs[i][torch.randperm(docs.shape[1], generator=g)]
        else:
            at = torch.randperm(docs.shape[1], generator=g)[: round(REPLACED * docs.shape[1])]
            out[i, at] = torch.randint(1, VOCAB, (len(at),), generator=g)
    return out, bad


class CausalTransformer(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(LENGTH, width)
        block = nn.TransformerEncoderLayer(width, 2, 2 * width, 0.0, batch_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        x = self.embed(ids) + self.position.weight[:t]
        return self.head(self.body(x, mask=mask, is_causal=True))  # (B, T, V)


class Lstm(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(ids))[0])  # (B, T, V)


class Module(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, following = batch
        return F.cross_entropy(self(ids).transpose(1, 2), following)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ids, following = batch
        self.log("val_loss", F.cross_entropy(self(ids).transpose(1, 2), following))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def fit(
    make: Callable[[], nn.Module],
    docs: Tensor,
    val: Tensor,
    epochs: int,
    monitor: bool,
    options: dict[str, object] | None = None,
) -> tuple[float, Path]:
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    train = DataLoader(TensorDataset(docs[:, :-1], docs[:, 1:]), batch_size=BATCH, shuffle=True)
    held = DataLoader(TensorDataset(val[:, :-1], val[:, 1:]), batch_size=500)
    root = Path(tempfile.mkdtemp(prefix="lm-noise-"))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[SensitivityMonitor(**(options or {}))] if monitor else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(make()), train, held)
    return time.perf_counter() - start, Path(trainer.logger.log_dir)


def our_columns(log_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training split's ``flagged``, ``evidence`` and ``loss`` at the last decision."""
    import csv

    tables = sorted(
        (log_dir / "sensitivity").glob("positions_epoch*_step*.csv"),
        key=lambda p: int(p.stem.split("_step")[1]),
    )
    flagged, evidence, loss = np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan)
    with tables[-1].open() as f:
        for row in csv.DictReader(f):
            if row["split"] == "train":
                i = int(row["sample"])
                flagged[i] = row["flagged"] == "True"
                evidence[i], loss[i] = float(row["evidence"]), float(row["loss"])
    return flagged, evidence, loss


def cross_validated(make: Callable[[], nn.Module], docs: Tensor, epochs: int, seed: int) -> Tensor:
    """Out-of-sample per-document loss from two models, each trained on one half."""
    n = len(docs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    out = torch.zeros(n)
    for fold, (train, held) in enumerate((halves, halves[::-1])):
        torch.manual_seed(seed + fold)
        net = make()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed + fold)
        for _ in range(epochs):
            for step in torch.randperm(len(train), generator=g).split(BATCH):
                d = docs[train[step]]
                loss = F.cross_entropy(net(d[:, :-1]).transpose(1, 2), d[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            for part in held.split(500):
                d = docs[part]
                nll = F.cross_entropy(net(d[:, :-1]).transpose(1, 2), d[:, 1:], reduction="none")
                out[part] = nll.mean(1)
    return out


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def prf(v: tuple[float, float, float, float]) -> str:
    return f"{v[0]:.2f} / {v[1]:.2f} / **{v[2]:.2f}**"


def run(
    name: str,
    make: Callable[[], nn.Module],
    data: tuple[Tensor, Tensor],
    kind: str,
    rate: float,
    epochs: int,
) -> list[str]:
    """One setting's table row."""
    clean, val = data
    docs, bad_t = corrupt(clean, rate, kind, seed=1) if rate else (clean, None)
    bad = bad_t.numpy() if bad_t is not None else np.zeros(len(docs), bool)
    _, log_dir = fit(make, docs, val, epochs, monitor=True)
    flagged, evidence, loss = our_columns(log_dir, len(docs))
    cv = cross_validated(make, docs, epochs, seed=2)
    cv_flags = (robust_z(cv) >= CUT).numpy()
    top = np.zeros(len(docs), bool)
    top[np.argsort(-cv.numpy())[: int(bad.sum())]] = True
    ours, theirs, oracle = scores(flagged, bad), scores(cv_flags, bad), scores(top, bad)
    log(f"{name} {kind} {rate}: ours F1 {ours[2]:.2f}, CV perplexity {theirs[2]:.2f}")
    return [
        name, kind if rate else "none", pct(rate), str(int(bad.sum())), str(stride_of(log_dir)),
        str(decisions_of(log_dir)),
        prf(ours), pct(ours[3]), f"{auroc(evidence, bad):.3f}",
        prf(theirs), pct(theirs[3]), f"{oracle[2]:.2f}" if rate else "–",
        f"{auroc(cv.numpy(), bad):.3f}", f"{auroc(loss, bad):.3f}",
    ]  # fmt: skip


def strides(args: argparse.Namespace) -> str:
    """The documents' flags at fixed strides (``position_stride``: every n-th token scored), on
    the first corpus with 5 % of its documents shuffled or replaced: why the monitor scores
    every token of a language model's documents (docs/tasks.md, "What scoring costs, and every
    n-th position")."""
    count = 1500 if args.small else 4000
    epochs = 3 if args.small else EPOCHS
    docs = documents(stdlib_tokens((count + 500) * (LENGTH + 1)))
    clean, val = docs[:count], docs[count : count + 500]
    lines = [
        "| corpus, model | corruption | rate | every n-th token | ours P / R / F1 "
        "| ours clean flagged | ours AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        corrupted, bad_t = corrupt(clean, 0.05, kind, seed=1)
        bad = bad_t.numpy()
        for stride in (1, 2, 4):
            options = {"position_stride": stride, "budget": None}  # every decision made
            log_dir = fit(CausalTransformer, corrupted, val, epochs, True, options)[1]
            flagged, evidence, _ = our_columns(log_dir, len(corrupted))
            ours = scores(flagged, bad)
            lines.append(
                f"| stdlib, transformer | {kind} | {pct(0.05)} | {stride} | {prf(ours)} "
                f"| {pct(ours[3])} | {auroc(evidence, bad):.3f} |"
            )
            log(lines[-1])
    lines += [
        "",
        f"`python benchmarks/lm_noise.py --strides{' --small' if args.small else ''}`: {count} "
        f"training documents of {LENGTH + 1} tokens, {epochs} epochs, batch {BATCH}, one seed, "
        "the monitor at its defaults but for `position_stride` and `budget=None` (a decision "
        f"at every validation). Machine: {platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few documents: a smoke test")
    parser.add_argument("--out", default=None, help="results tag, or a path ending in .md")
    parser.add_argument(
        "--strides", action="store_true", help="the flags at fixed strides instead (its own file)"
    )
    args = parser.parse_args()
    tag = args.out or ("small" if args.small else "cpu")
    out = Path(tag) if tag.endswith(".md") else Path(__file__).parent / "results"
    stem = "lm_strides" if args.strides else "lm_noise"
    out = out if tag.endswith(".md") else out / f"{stem}_{tag}.md"
    if args.strides:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(strides(args))
        return log(f"wrote {out}")
    start = time.perf_counter()
    count = 1500 if args.small else 4000
    epochs = 3 if args.small else EPOCHS
    corpora: list[tuple[str, Callable[[int], list[str]], Callable[[], nn.Module]]] = [
        ("stdlib, transformer", stdlib_tokens, CausalTransformer)
    ]
    if FORTUNES.is_dir():
        corpora.append(("fortunes, LSTM", fortune_tokens, Lstm))
    else:
        log(f"{FORTUNES} not found (apt-get install fortunes): the second corpus is left out")
    if args.small:
        corpora = corpora[:1]
    rows, notes, cost = [], [], ""
    for c, (name, read, make) in enumerate(corpora):
        docs = documents(read((count + 500) * (LENGTH + 1)))
        data = (docs[:count], docs[count : count + 500])
        settings = [("none", 0.0)] + (
            [("replace", 0.1)] if args.small else [(k, r) for k in KINDS for r in RATES]
        )
        rows += [run(name, make, data, kind, rate, epochs) for kind, rate in settings]
        notes.append(f"{name}: {len(docs)} documents of {LENGTH + 1} tokens")
        if c == 0:  # costs on the first corpus's clean documents
            repeats = 1 if args.small else 2
            plain, monitored, cv = [], [], []
            for _ in range(repeats):  # alternating, the fastest of each
                plain.append(fit(make, data[0], data[1], epochs, monitor=False)[0])
                monitored.append(fit(make, data[0], data[1], epochs, monitor=True)[0])
                start_cv = time.perf_counter()
                cross_validated(make, data[0], epochs, seed=2)
                cv.append(time.perf_counter() - start_cv)
            fastest = min(plain)
            cost = (
                f"| {name} | {fastest:.0f} s | {min(monitored) / fastest:.2f}× "
                f"| {min(cv) / fastest:.2f}× |"
            )
    lines = [
        "| corpus, model | corruption | rate | corrupted | ours: every n-th token "
        "| ours: decisions | ours P / R / F1 | ours clean flagged | ours AUROC "
        "| CV perplexity P / R / F1 | CV clean flagged | CV oracle F1 | CV AUROC "
        "| training loss AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| corpus, model | plain run | with the monitor | perplexity (2-fold CV) |",
        "|---|---|---|---|",
        cost,
        "",
        f"`python benchmarks/lm_noise.py{' --small' if args.small else ''}`: {count} training "
        f"documents ({'; '.join(notes)}), 500 for validation, vocabulary {VOCAB}, {epochs} "
        f"epochs, batch {BATCH}, one seed. Costs: the fastest of "
        f"{1 if args.small else 2} runs each, plain, monitored and cross-validated alternating, "
        "clean documents. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; the whole benchmark "
        f"{(time.perf_counter() - start) / 60:.0f} min.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
