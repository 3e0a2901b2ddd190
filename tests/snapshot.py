"""Everything a monitored training run logs, as one comparable record.

The monitor's refactors must not change a logged value. :func:`monitored_run` trains the demo's
CNN on the digits for two epochs, in float64 (so that the record does not depend on the CPU's
vector width or thread count) and with the monitor doing every part (budget=None: nothing depends
on the clock), in two configurations that between them take every path: training steps scored
with the counterfactual rule and the training-set scan, then the training probe with the
MAD rule. :func:`snapshot` reads back what was written: every scalar
and histogram at every step, the images' tags and sizes, the texts, and the CSV tables.

``tests/test_snapshot.py`` compares a fresh run with ``tests/data/monitor_snapshot.json``. After a
change that is *meant* to change what is logged, record it again and say why in the commit::

    python -m tests.snapshot --record --out <an empty folder>
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sens import MonitorConfig, SensitivityMonitor
from lightning_sens.reporting import keys
from lightning_sens.reporting.paths import split_run
from lightning_sens.reporting.writers import read_scalars

RECORD = Path(__file__).parent / "data" / "monitor_snapshot.json"
# What depends on the clock, not on the model: left out of the record.
TIMED = ("cost_share",)
RUNS: dict[str, dict[str, Any]] = {
    "steps": {
        "train_probe_size": 128,
        "exact_probe_size": 8,
        "scan_train_set": True,
        "flag_rule": "counterfactual",
    },
    "probe": {
        "train_probe_size": 96,
        "exact_probe_size": 6,
        "score_training_steps": False,
        "flag_rule": "mad",
        "windows": (1, 3),
    },
}


def monitored_run(out: Path, name: str) -> tuple[Path, list[dict[str, float]]]:
    """Two epochs of the demo's CNN on the digits (5 % of the labels corrupted), monitored."""
    from lightning_sens.demos.data import DemoData
    from lightning_sens.demos.models import SmallCNN

    pl.seed_everything(0, verbose=False)
    data = DemoData("digits", 0.05, 0, str(out / "data"))
    logger = TensorBoardLogger(out, name=name, version="", default_hp_metric=False)
    monitor = SensitivityMonitor(MonitorConfig(**RUNS[name], save_figures=True, budget=None))
    trainer = pl.Trainer(
        max_epochs=2,
        logger=logger,
        callbacks=[monitor],
        enable_model_summary=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        accelerator="cpu",
        deterministic=True,
        precision="64-true",
        log_every_n_steps=5,
    )
    trainer.fit(SmallCNN(channels=1), datamodule=data)
    return Path(logger.log_dir), monitor.history


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _table(rows: list[list[str]]) -> dict[str, Any]:
    """A CSV table, compact: its header, its first rows, a digest of its integer and text
    columns (exact), and per float column the count of nan, sum, sum of squares, min and max of
    the rest (compared to ``rel``: a change in one value of a few thousand shows)."""
    header, body = rows[0], [[_number(x) for x in row] for row in rows[1:]]
    exact, floats = [], {}
    for name, values in zip(header, zip(*body, strict=True), strict=True):
        if any(isinstance(v, float) for v in values):
            finite = [float(v) for v in values if not math.isnan(float(v))]
            floats[name] = [
                len(values) - len(finite),
                math.fsum(finite),
                math.fsum(v * v for v in finite if math.isfinite(v)),
                min(finite, default=0.0),
                max(finite, default=0.0),
            ]
        else:
            exact.append(name)
    text = json.dumps([[row[header.index(name)] for row in body] for name in exact])
    return {
        "header": header,
        "rows": len(body),
        "head": body[:5],
        "exact": hashlib.sha256(text.encode()).hexdigest(),
        "floats": floats,
    }


def snapshot(log_dir: Path, history: list[dict[str, float]]) -> dict[str, Any]:
    """What one run wrote, JSON-ready (floats as floats; nan and inf as strings)."""
    scalars = {
        key: [[step, value] for step, value in points]
        for key, points in sorted(read_scalars(log_dir).items())
        if not key.endswith(TIMED)
    }
    histograms: dict[str, list[list[float]]] = {}
    images: dict[str, list[list[int]]] = {}
    texts: dict[str, list[str]] = {}
    folders: list[tuple[str | None, Path]] = [(None, log_dir)]
    folders += [(split, split_run(log_dir, split)) for split in keys.RUNS]
    for split, folder in folders:
        if not folder.is_dir():
            continue
        events = EventAccumulator(
            str(folder), size_guidance={"images": 0, "histograms": 0, "tensors": 0}
        )
        events.Reload()
        tags = events.Tags()
        for tag in tags["histograms"]:
            histograms[keys.unroute(split, tag)] = [
                [e.step, e.histogram_value.num, e.histogram_value.min, e.histogram_value.max,
                 e.histogram_value.sum]
                for e in events.Histograms(tag)
            ]  # fmt: skip
        for tag in tags["images"]:
            images[keys.unroute(split, tag)] = [
                [e.step, e.height, e.width] for e in events.Images(tag)
            ]
        for tag in tags["tensors"]:
            key = keys.unroute(split, tag.removesuffix("/text_summary"))
            texts[key] = [
                b.decode() for e in events.Tensors(tag) for b in e.tensor_proto.string_val
            ]
    tables = {}
    for path in sorted((log_dir / "sensitivity").glob("*.csv")):
        with path.open(newline="") as stream:
            tables[path.name] = _table(list(csv.reader(stream)))
    figures = sorted(p.name for p in (log_dir / "sensitivity" / "figures").glob("*.png"))
    history = [{k: v for k, v in row.items() if not k.endswith(TIMED)} for row in history]
    record = {
        "scalars": scalars,
        "histograms": dict(sorted(histograms.items())),
        "images": dict(sorted(images.items())),
        "texts": dict(sorted(texts.items())),
        "tables": tables,
        "figures": figures,
        "history": history,
    }
    return json.loads(json.dumps(record, default=str, allow_nan=True))


def differences(got: Any, want: Any, where: str = "", rel: float = 1e-6) -> list[str]:
    """Where ``got`` differs from ``want``: structure exactly, numbers to ``rel`` (the scalars
    and histograms pass through float32 in the event files; nan equals nan)."""
    if isinstance(want, dict) and isinstance(got, dict):
        found = []
        if set(got) != set(want):
            found.append(
                f"{where}: keys added {sorted(set(got) - set(want))}, "
                f"missing {sorted(set(want) - set(got))}"
            )
        for key in sorted(set(got) & set(want)):
            found += differences(got[key], want[key], f"{where}/{key}", rel)
        return found
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} entries, recorded {len(want)}"]
        found = []
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            found += differences(g, w, f"{where}[{i}]", rel)
        return found
    numbers = (int, float)
    if isinstance(want, numbers) and isinstance(got, numbers) and not isinstance(want, bool):
        if math.isnan(want) and math.isnan(got):
            return []
        if math.isclose(got, want, rel_tol=rel, abs_tol=1e-12):
            return []
        return [f"{where}: {got!r}, recorded {want!r}"]
    return [] if got == want else [f"{where}: {got!r}, recorded {want!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write {RECORD.name}")
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: runs would mix their event files")
    record = {name: snapshot(*monitored_run(args.out, name)) for name in RUNS}
    if args.record:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")
    else:
        found = differences(record, json.loads(RECORD.read_text()))
        print("\n".join(found) or "the same as recorded")


if __name__ == "__main__":
    main()
