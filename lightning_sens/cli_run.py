"""``lightning-sens evaluate``'s work once the checks passed: every checkpoint through the
monitor, the report, the quantisation table, and the lines it prints."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_checkpoints"]


def run_checkpoints(
    args: argparse.Namespace,
    config: Any,
    checkpoints: list[tuple[Path, int, int]],
    model: Any,
    data: Any,
    work: Path,
) -> list[str]:
    """Evaluate the checkpoints into ``work``; the lines to print, naming the final paths."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import default_collate
    from tqdm.auto import tqdm

    from lightning_sens.callbacks import SensitivityMonitor
    from lightning_sens.core.inputs import to_device
    from lightning_sens.quantization import QUANTIZATION_COLUMNS, quantization_report
    from lightning_sens.reporting import paths
    from lightning_sens.reporting.html import write_report
    from lightning_sens.reporting.tables import write_table

    monitor = SensitivityMonitor(config, train_dataloader=data.train_dataloader(), post_hoc=True)
    logger = TensorBoardLogger(work, name="", version="", default_hp_metric=False)
    done = []
    progress = tqdm(checkpoints, desc="checkpoints", disable=len(checkpoints) < 2)
    for path, epoch, step in progress:
        monitor.position = (epoch, step)
        with _quiet_lightning():  # device lines, tips and hints, every checkpoint otherwise
            trainer = pl.Trainer(
                accelerator=args.device,
                devices=1,
                logger=logger,
                callbacks=[monitor, _at_checkpoint(epoch, step)],
                limit_val_batches=args.limit_batches,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,  # one bar over the checkpoints instead
                default_root_dir=work,
            )
            trainer.validate(
                model, dataloaders=data.val_dataloader(), ckpt_path=path, verbose=False
            )
        done.append((path.name, epoch, step))
        progress.write(_summary(path.name, epoch, step, monitor.history[-1]))
    last = checkpoints[-1][1:]
    figures = paths.figures(work, *last)
    table = paths.flag_table(work, *last)
    report = work / "report.html"
    datasets = {"train": data.train_dataloader().dataset, "val": data.val_dataloader().dataset}
    probe = f"a fixed probe of {config.train_probe_size} training samples"
    write_report(
        report,
        "lightning-sens evaluation",
        done,
        monitor.history,
        figures,
        table,
        config.to_dict(),
        thumbnails=lambda split, i: _picture(datasets.get(split, datasets["train"]), i),
        class_names=monitor.class_names,
        splits_note=(
            f"Splits: <em>train</em> is {probe}, scored in evaluation mode (checkpoints have no "
            "training steps to score), <em>val</em> every validation sample, the <em>full "
            "training-set scan</em> (--scan-train-set) the whole training set."
        ),
    )
    output: Path = args.output
    lines = [f"Evaluated {len(done)} checkpoint(s). Report: {output / 'report.html'}"]
    if args.quantization:
        loader = data.val_dataloader()
        count = min(args.damage_samples, len(loader.dataset))
        samples = [loader.dataset[i] for i in range(count)]
        inputs, labels, _ = monitor.reader.batch_fn((loader.collate_fn or default_collate)(samples))
        device = next(model.parameters()).device
        layout = monitor.reader.layout  # many positions per sample: the sampled trace
        mask = monitor.reader.mask(inputs, labels) if layout is not None else None
        rows = quantization_report(
            model,
            to_device(inputs, device),
            args.bits,
            args.measure_damage,
            monitor.reader.forward_fn,
            config.chunk_size,
            layout=layout,
            mask=None if mask is None else mask.to(device),
        )
        write_table(rows, work / "quantization.csv", QUANTIZATION_COLUMNS)
        lines.append(_quantization_text(rows, checkpoints[-1][0].name, count))
        lines.append(f"Quantisation table: {output / 'quantization.csv'}")
    logger.finalize("success")  # every event file closed before the folder is renamed
    tables = "Positions tables" if monitor.reader.layout is not None else "Flag tables and figures"
    lines.append(f"{tables}: {output / 'sensitivity'}")
    lines.append(f"View the curves with: tensorboard --logdir {output}")
    return lines


def _summary(name: str, epoch: int, step: int, metrics: dict[str, float]) -> str:
    """One line per checkpoint: validation loss and accuracy, flags per split."""
    from lightning_sens.reporting import keys

    parts = [f"{name} (epoch {epoch}, step {step}):"]
    if keys.loss("val") in metrics:
        parts.append(
            f"val loss {metrics[keys.loss('val')]:.3f}, accuracy "
            f"{100 * metrics[keys.accuracy('val')]:.1f} %;"
        )
    flags = [
        f"{int(metrics[keys.flag_count(split)])} {label}"
        for split, label in (("val", "val"), ("train", "train probe"), ("train_all", "scan"))
        if keys.flag_count(split) in metrics
    ]
    return " ".join([*parts, "flagged " + ", ".join(flags)])


def _at_checkpoint(epoch: int, step: int) -> Any:
    """A callback: Lightning logs the module's own metrics (``val/loss``) at the loops' step
    and epoch, which a fresh Trainer's ``validate`` leaves at 0; put them at the checkpoint's,
    where the monitor logs."""
    from lightning.pytorch import Callback

    from lightning_sens.callbacks.internals import log_at

    class AtCheckpoint(Callback):
        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            log_at(trainer, epoch, step)

    return AtCheckpoint()


@contextlib.contextmanager
def _quiet_lightning() -> Any:
    """Lightning's lines that say nothing about evaluate: the hint to pass the checkpoint's
    callbacks (evaluate passes its own on purpose), device and tip lines, deprecations."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Be aware that when using `ckpt_path`")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def _picture(dataset: object, index: int) -> torch.Tensor | None:
    """The image of sample ``index`` (its dataset index) for the report, or None."""
    sample = dataset[index]  # type: ignore[index]
    found = sample[0] if isinstance(sample, list | tuple) else None
    return found if isinstance(found, torch.Tensor) and found.dim() == 3 else None


def _quantization_text(rows: list[dict[str, object]], checkpoint: str, samples: int) -> str:
    """The quantisation report as an aligned text table, most damaging layer first."""
    lines = [
        f"Quantisation sensitivity of {checkpoint} ({samples} validation samples): expected "
        "KL(p || p_quantised) per sample, in nats, one layer quantised at a time",
        f"{'bits':>4}  {'steps':<8}{'rank':>4}  {'layer':<32}{'params':>10}"
        f"{'predicted':>12}{'measured':>12}",
    ]
    for row in rows:
        measured = float(row["measured_kl"])  # type: ignore[arg-type]
        lines.append(
            f"{row['bits']:>4}  {row['steps']!s:<8}{row['rank']:>4}  {row['layer']!s:<32}"
            f"{row['parameters']:>10}{float(row['predicted_kl']):>12.3g}"  # type: ignore[arg-type]
            f"{'-' if measured != measured else f'{measured:.3g}':>12}"
        )
    return "\n".join(lines)
