"""Benchmark: which tagged sentences carry wrong tags, flagged by a default
``SensitivityMonitor()`` during training, against cleanlab's token-classification filter on
cross-validated probabilities.

Real text with real tags: the Python standard library's top-level ``*.py`` files (in name
order), cut by Python's own ``tokenize`` into tokens, each tagged with its role, some of which
only the context tells: ``keyword``, ``definition`` (the name after ``def`` or ``class``),
``call`` (a name before ``(``), ``attribute`` (a name after ``.``), ``name`` (any other name),
``number``, ``string``, ``operator``, ``comment``, ``newline``. The ``VOCAB − 1`` most frequent
token strings make the vocabulary (one more for the rest); windows of ``LENGTH`` tokens are the
sentences. A bidirectional GRU tags every token.

A share of the training sentences is corrupted: 1 to 3 of their tokens get another tag, drawn
at random (``random``) or the tag most often confused with theirs (``similar``: a name for a
call, an attribute for a name, ...).

Ours: a Lightning ``Trainer`` with ``SensitivityMonitor()`` at its defaults; the flags are the
positions table's ``flagged`` column of the training split at the last decision, its AUROC the
``evidence`` column's. cleanlab: ``cleanlab.token_classification.filter.find_label_issues`` on
2-fold cross-validated probabilities, a sentence flagged when any of its tokens is an issue; its
AUROC ranks by ``get_label_quality_scores``' sentence score. ``loss``: the cross-validated
per-sentence loss, a ranking only. Costs, on the clean tags: the run with the monitor and
cleanlab's two trainings and filter over a plain run (plain and monitored runs alternate, the
fastest of each counts).

Usage: pip install -e ".[bench]"; python benchmarks/token_noise.py [--small] [--out TAG]
(without cleanlab installed, its columns are nan)
writes benchmarks/results/token_noise_<TAG>.md (TAG: ``cpu``; ``small`` with ``--small``), or the
path TAG where it ends in .md.
"""

from __future__ import annotations

import argparse
import io
import keyword
import platform
import sys
import sysconfig
import time
import tokenize
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from segmentation_noise import auroc, decisions_of, our_flags, scores, stride_of
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sens import SensitivityMonitor

VOCAB = 2048
LENGTH = 32
TAGS = (
    "keyword", "definition", "call", "attribute", "name", "number", "string", "operator",
    "comment", "newline",
)  # fmt: skip
SIMILAR = {"call": "name", "name": "attribute", "attribute": "call", "definition": "name",
           "keyword": "name", "number": "string", "string": "comment", "comment": "string",
           "operator": "newline", "newline": "operator"}  # fmt: skip
EPOCHS = 6
BATCH = 64
RATES = (0.05, 0.1, 0.2)
KINDS = ("random", "similar")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tagged(source: str) -> list[tuple[str, str]]:
    """(token string, tag) of every token of one Python source; [] where it does not tokenize."""
    out: list[tuple[str, str]] = []
    try:
        found = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    kept = [
        t for t in found if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    ]
    for i, t in enumerate(kept):
        before = kept[i - 1].string if i else ""
        after = kept[i + 1].string if i + 1 < len(kept) else ""
        if t.type == tokenize.NAME:
            if keyword.iskeyword(t.string):
                tag = "keyword"
            elif before in ("def", "class"):
                tag = "definition"
            elif after == "(":
                tag = "call"
            elif before == ".":
                tag = "attribute"
            else:
                tag = "name"
        elif t.type == tokenize.NUMBER:
            tag = "number"
        elif "STRING" in tokenize.tok_name.get(t.type, ""):  # f-strings come in three parts
            tag = "string"
        elif t.type == tokenize.COMMENT:
            tag = "comment"
        elif t.type in (tokenize.NEWLINE, tokenize.NL):
            tag = "newline"
        else:
            tag = "operator"
        out.append((t.string if t.type != tokenize.STRING else "<string>", tag))
    return out


def corpus(sentences: int) -> tuple[Tensor, Tensor, int]:
    """``sentences`` windows of ``LENGTH`` token ids and their tags, and how many files."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    pairs: list[tuple[str, str]] = []
    files = 0
    for path in sorted(folder.glob("*.py")):
        pairs += tagged(path.read_text(errors="replace"))
        files += 1
        if len(pairs) >= sentences * LENGTH:
            break
    pairs = pairs[: sentences * LENGTH]
    common = [w for w, _ in Counter(w for w, _ in pairs).most_common(VOCAB - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0: any other token
    tag = {t: i for i, t in enumerate(TAGS)}
    ids = torch.tensor([index.get(w, 0) for w, _ in pairs]).view(-1, LENGTH)
    tags = torch.tensor([tag[t] for _, t in pairs]).view(-1, LENGTH)
    return ids, tags, files


def corrupt(tags: Tensor, rate: float, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """``rate`` of the sentences with 1 to 3 of their tags replaced; returns them and which."""
    g = torch.Generator().manual_seed(seed)
    n = len(tags)
    out = tags.clone()
    for i in torch.randperm(n, generator=g)[: round(rate * n)].tolist():
        count = int(torch.randint(1, 4, (1,), generator=g))
        for t in torch.randperm(LENGTH, generator=g)[:count].tolist():
            old = int(tags[i, t])
            if kind == "similar":
                out[i, t] = TAGS.index(SIMILAR[TAGS[old]])
            else:
                out[i, t] = (old + int(torch.randint(1, len(TAGS), (1,), generator=g))) % len(TAGS)
    return out, (out != tags).any(1)


class Tagger(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * width, len(TAGS))

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(ids))[0])  # (B, T, K)


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Tagger()

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, tags = batch
        return F.cross_entropy(self(ids).transpose(1, 2), tags)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ids, tags = batch
        self.log("val_loss", F.cross_entropy(self(ids).transpose(1, 2), tags))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def fit(
    data: tuple[Tensor, Tensor, Tensor, Tensor], tags: Tensor, epochs: int, monitor: bool
) -> tuple[float, Path]:
    import tempfile

    from lightning.pytorch.loggers import TensorBoardLogger

    ids, _, val_ids, val_tags = data
    L.seed_everything(0, verbose=False)
    train = DataLoader(TensorDataset(ids, tags), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(val_ids, val_tags), batch_size=500)
    root = Path(tempfile.mkdtemp(prefix="token-noise-"))
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[SensitivityMonitor()] if monitor else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), train, val)
    return time.perf_counter() - start, Path(trainer.logger.log_dir)


def cross_validated(ids: Tensor, tags: Tensor, epochs: int, seed: int) -> Tensor:
    """Out-of-sample probabilities ``(N, T, K)`` from two taggers, each trained on one half."""
    n = len(tags)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    out = torch.zeros(n, LENGTH, len(TAGS))
    for fold, (train, held) in enumerate((halves, halves[::-1])):
        torch.manual_seed(seed + fold)
        net = Tagger()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed + fold)
        for _ in range(epochs):
            for step in torch.randperm(len(train), generator=g).split(BATCH):
                i = train[step]
                loss = F.cross_entropy(net(ids[i]).transpose(1, 2), tags[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out[held] = torch.softmax(net(ids[held]), -1)
    return out


def run(
    data: tuple[Tensor, Tensor, Tensor, Tensor], kind: str, rate: float, epochs: int
) -> tuple[list[str], float]:
    """One setting's table row, and how long cleanlab's cross-validation and filter took."""
    ids, clean = data[0], data[1]
    tags, bad_t = corrupt(clean, rate, kind, seed=1) if rate else (clean, None)
    bad = bad_t.numpy() if bad_t is not None else np.zeros(len(tags), bool)
    _, log_dir = fit(data, tags, epochs, monitor=True)
    flagged, evidence = our_flags(log_dir, len(tags))
    start = time.perf_counter()
    probs = cross_validated(ids, tags, epochs, seed=2)
    labels = [row.numpy() for row in tags]
    pred = [row.numpy() for row in probs]
    cl, theirs_auroc, theirs_seconds = (float("nan"),) * 4, float("nan"), float("nan")
    try:
        from cleanlab.token_classification.filter import find_label_issues
        from cleanlab.token_classification.rank import get_label_quality_scores
    except ImportError:  # the --small test runs with the test extra: its columns stay nan
        log("cleanlab is not installed (pip install -e '.[bench]'): its columns are nan")
    else:
        issues = find_label_issues(labels, pred, n_jobs=1)
        theirs_seconds = time.perf_counter() - start
        theirs = np.zeros(len(tags), bool)
        theirs[[i for i, _ in issues]] = True
        cl = scores(theirs, bad)
        theirs_auroc = auroc(-np.asarray(get_label_quality_scores(labels, pred)[0]), bad)
    loss = F.nll_loss(probs.clamp_min(1e-12).log().transpose(1, 2), tags, reduction="none")
    ours = scores(flagged, bad)
    log(f"{kind} {rate}: ours F1 {ours[2]:.2f} cleanlab {cl[2]:.2f}")

    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    return [
        kind if rate else "none", pct(rate), str(int(bad.sum())), str(stride_of(log_dir)),
        str(decisions_of(log_dir)),
        f"{ours[0]:.2f} / {ours[1]:.2f} / **{ours[2]:.2f}**", pct(ours[3]),
        f"{auroc(evidence, bad):.3f}",
        f"{cl[0]:.2f} / {cl[1]:.2f} / **{cl[2]:.2f}**", pct(cl[3]),
        f"{theirs_auroc:.3f}",
        f"{auroc(loss.mean(1).numpy(), bad):.3f}",
    ], theirs_seconds  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few sentences: a smoke test")
    parser.add_argument("--out", default=None, help="results tag, or a path ending in .md")
    args = parser.parse_args()
    tag = args.out or ("small" if args.small else "cpu")
    out = Path(tag) if tag.endswith(".md") else Path(__file__).parent / "results"
    out = out if tag.endswith(".md") else out / f"token_noise_{tag}.md"
    start = time.perf_counter()
    count = 1500 if args.small else 4000
    ids, tags, files = corpus(count + 500)
    data = (ids[:count], tags[:count], ids[count:], tags[count:])
    repeats = 1 if args.small else 3
    plain, monitored = [], []
    for _ in range(repeats):  # alternating, the fastest of each
        plain.append(fit(data, data[1], EPOCHS, monitor=False)[0])
        monitored.append(fit(data, data[1], EPOCHS, monitor=True)[0])
    settings = [("none", 0.0)] + (
        [("random", 0.1)] if args.small else [(k, r) for k in KINDS for r in RATES]
    )
    found = [run(data, kind, rate, EPOCHS) for kind, rate in settings]
    rows = [row for row, _ in found]
    fastest = min(plain)
    lines = [
        "| corruption | rate | wrong sentences | ours: every n-th position | ours: decisions "
        "| ours P / R / F1 | ours clean flagged | ours AUROC | cleanlab P / R / F1 "
        "| cleanlab clean flagged | cleanlab AUROC | CV loss AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| plain run | with the monitor | cleanlab (2-fold CV + filter) |",
        "|---|---|---|",
        f"| {fastest:.0f} s | {min(monitored) / fastest:.2f}× | {found[0][1] / fastest:.2f}× |",
        "",
        f"`python benchmarks/token_noise.py{' --small' if args.small else ''}`: {count} training "
        f"sentences of {LENGTH} tokens from {files} standard-library files, {EPOCHS} epochs, "
        f"batch {BATCH}, one seed. Costs: the fastest of {repeats} runs each, plain and "
        f"monitored alternating, on the clean tags. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; the whole benchmark "
        f"{(time.perf_counter() - start) / 60:.0f} min.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
