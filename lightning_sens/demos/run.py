"""``lightning-sens demo``: a short real training run with SensitivityMonitor watching.

A small CNN (:mod:`lightning_sens.demos.models`) is trained on real images
(:mod:`lightning_sens.demos.data`). A few percent of the training labels are deliberately
corrupted; the monitor scores every training sample from the logits of its training step (no
extra pass), estimates how many labels of each class are wrong, and flags that many. At the end,
the demo reports the precision and recall of the flags against the labels it corrupted, and
prints the ``lightning-sens evaluate`` command that measures its checkpoints again.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_sens.callbacks import SensitivityMonitor
from lightning_sens.config import MonitorConfig
from lightning_sens.demos.data import CLASS_NAMES, DemoData
from lightning_sens.demos.models import SmallCNN
from lightning_sens.reporting import paths
from lightning_sens.reporting.html import write_report
from lightning_sens.reporting.tables import write_table

__all__ = ["evaluate_command", "flagged_per_epoch", "run_demo"]


def flagged_per_epoch(log_dir: Path, corrupted: Tensor) -> list[tuple[int, int, int]]:
    """(epoch, training samples flagged, how many of them have a corrupted label) per epoch of
    the run logged under ``log_dir``."""
    bad = set(corrupted.tolist())
    out = []
    for table in paths.flag_tables(log_dir):
        with table.open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
        flagged = {int(r["sample"]) for r in rows if r["flagged"] == "True"}
        out.append((int(rows[0]["epoch"]), len(flagged), len(flagged & bad)))
    return out


# The demo's monitor; the evaluate command it prints passes the same sizes.
_MONITOR: dict[str, Any] = {"train_probe_size": 256, "exact_probe_size": 16}


def _class_path(cls: type) -> str:
    """Where LightningCLI imports ``cls`` from: the module that defines it.

    >>> _class_path(SmallCNN)
    'lightning_sens.demos.models.SmallCNN'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def _config(path: Path, model: dict[str, object], data: dict[str, object]) -> None:
    """A LightningCLI config naming the demo's model and data (``--config`` of evaluate)."""
    import yaml

    config = {
        "model": {"class_path": _class_path(SmallCNN), "init_args": model},
        "data": {"class_path": _class_path(DemoData), "init_args": data},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _write_corrupted(path: Path, corrupted: Tensor, true: Tensor, given: Tensor) -> None:
    """The corrupted labels (sample, true label, given label): the demo's precision and recall
    can be checked against the flag tables."""
    rows = [
        {"sample": i, "true_label": int(true[i]), "given_label": int(given[i])}
        for i in sorted(corrupted.tolist())
    ]
    write_table(rows, path, ("sample", "true_label", "given_label"))


def evaluate_command(out: Path) -> list[str]:
    """The ``lightning-sens evaluate`` command that measures the demo's checkpoints again."""
    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in _MONITOR.items()]
    return [
        "lightning-sens",
        "evaluate",
        str(out / "checkpoints"),
        "--output",
        str(out / "evaluate"),
        *sizes,
        "--",
        "--config",
        str(out / "config.yaml"),
    ]


def run_demo(out: Path, max_epochs: int | None, dataset: str, corrupt: float, seed: int) -> int:
    """Train, monitor, and print where the logs are, what the flags found, and how to evaluate
    the saved checkpoints again."""
    import shlex

    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(seed, verbose=False)
    data = DemoData(dataset, corrupt, seed, str(out / "data"))
    data.setup("fit")
    assert data.train_set is not None
    assert data.val_set is not None
    train_set, val_set = data.train_set, data.val_set
    x_train, y_train = train_set.tensors
    corrupted = data.corrupted
    epochs = max_epochs or (8 if data.dataset_name == "digits" else 3)
    print(
        f"Demo: {data.dataset_name}, {len(y_train)} training samples ({len(corrupted)} labels "
        f"corrupted), {len(data.val_set)} validation samples, {epochs} epochs."
    )
    logger = TensorBoardLogger(out, name="training", version="", default_hp_metric=False)
    # A showcase: every part every epoch (budget=None), so that three short epochs show every
    # figure. In a real run the default budget keeps the monitor within 5 % of training time.
    config = MonitorConfig(**_MONITOR, save_figures=True, budget=None)
    monitor = SensitivityMonitor(config)
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        save_top_k=-1,
        every_n_epochs=1,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor, checkpoints],
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=10,
    )
    model = SmallCNN(channels=x_train.shape[1])
    trainer.fit(model, datamodule=data)
    _config(
        out / "config.yaml",
        {"channels": int(x_train.shape[1]), "lr": model.lr},
        {
            "dataset": data.dataset_name,
            "corrupt": corrupt,
            "seed": seed,
            "root": str((out / "data").resolve()),  # the same downloads from any folder
        },
    )

    _write_corrupted(out / "corrupted.csv", corrupted, data.true_labels, y_train)
    print(f"Flagged training labels ({len(corrupted)} of {len(y_train)} were corrupted):")
    folder = Path(logger.log_dir)
    per_epoch = flagged_per_epoch(folder, corrupted)
    for epoch, flagged, hits in per_epoch:
        print(f"  epoch {epoch:2d}: {flagged:4d} flagged, {hits:4d} of them corrupted")
    if per_epoch:
        _, flagged, hits = per_epoch[-1]
        precision = hits / flagged if flagged else float("nan")
        recall = hits / len(corrupted) if len(corrupted) else float("nan")
        print(
            f"Last epoch: precision {precision:.2f} ({hits} of {flagged} flags are corrupted "
            f"labels), recall {recall:.2f} ({hits} of {len(corrupted)} corrupted labels found)."
        )
    last = (int(monitor.history[-1]["epoch"]), int(monitor.history[-1]["step"]))
    figures = paths.figures(folder, *last)
    rows = [(f"epoch {int(h['epoch'])}", int(h["epoch"]), int(h["step"])) for h in monitor.history]
    report = out / "report.html"
    table = paths.flag_table(folder, *last)
    write_report(
        report,
        f"lightning-sens demo: {data.dataset_name}",
        rows,
        monitor.history,
        figures,
        table,
        monitor.config.to_dict(),
        thumbnails=lambda split, i: (val_set if split == "val" else train_set)[i][0],
        class_names=CLASS_NAMES.get(data.dataset_name),
    )
    print(
        f"Monitoring took {100 * monitor.budget.cost_share:.0f} % of the training time "
        "(budget=None for this demo: every part every epoch; the default budget=0.05 keeps it "
        "within 5 %)."
    )
    print(f"Report: {report}")
    print(f"Flag tables and figures: {folder / 'sensitivity'}")
    print(f"Checkpoints, one per epoch: {out / 'checkpoints'}")
    print(f"The corrupted labels (to check the flags against): {out / 'corrupted.csv'}")
    print(f"View the curves: tensorboard --logdir {out}")
    print("Measure the checkpoints again (the validation curves come out the same):")
    print(f"  {shlex.join(evaluate_command(out))}")
    return 0
