"""The ``lightning-sens`` command line: post-hoc evaluation of checkpoints, and the demo.

    lightning-sens evaluate CHECKPOINT... --output DIR [options] -- LIGHTNING_ARGS
    lightning-sens demo [--out runs/demo]

``LIGHTNING_ARGS`` name the model and data the Lightning way, as for ``LightningCLI``:
``--model pkg.Module --model.init_args.width 64 --data pkg.DataModule`` or ``--config cfg.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from lightning_sens.cli_checks import UsageError
from lightning_sens.config import MonitorConfig
from lightning_sens.flagging import FlagRule

__all__ = ["main"]


def _find_checkpoints(specs: Sequence[str]) -> list[Path]:
    """Files, directories (searched recursively for *.ckpt) and globs, without repeats."""
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(path.rglob("*.ckpt"))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise UsageError(f"no checkpoint found at {spec!r} (a file, a directory or a glob).")
        found.update(dict.fromkeys(m.resolve() for m in matches))
    return list(found)


def _state_dict(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UsageError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return state


def _read(path: Path) -> tuple[Path, int, int, dict[str, Any]]:
    """(path, epoch, global step, {shapes, hparams}) of a Lightning checkpoint."""
    from lightning_sens.cli_checks import shapes_of

    state = _state_dict(path)
    hparams = state.get("hyper_parameters")
    entry = {
        "shapes": shapes_of(state["state_dict"]),
        "hparams": dict(hparams) if isinstance(hparams, dict) else {},
    }
    return path, int(state.get("epoch", 0)), int(state.get("global_step", 0)), entry


def _lightning_cli(arguments: list[str]) -> Any:
    """LightningCLI on the arguments after '--'; its errors (a usage dump and a multi-line
    message on stderr, then SystemExit) reduced to one line."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_sens.cli_checks import check_class_paths, lightning_error

    check_class_paths(arguments)
    stderr = io.StringIO()
    log = logging.getLogger("lightning.pytorch")  # the unused Trainer's "GPU available: ..."
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            # Lightning's own use of jsonargparse APIs that jsonargparse deprecated: not the user's.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
            return LightningCLI(
                args=arguments,
                run=False,
                save_config_callback=None,
                seed_everything_default=False,
                trainer_defaults={"logger": False, "enable_checkpointing": False},
            )
    except SystemExit as exit:
        if exit.code in (0, None):
            raise
        raise UsageError(f"after '--': {lightning_error(stderr.getvalue())}") from None
    finally:
        log.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sens",
        description="Sensitivity (Shu & Zhu's influence measure FI) of Lightning models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser(
        "evaluate",
        help="measure saved checkpoints",
        description="Run SensitivityMonitor's measurements on each checkpoint, ordered by step; "
        "write TensorBoard events, flag tables, PNG figures and an HTML report. After '--', "
        "name the model and data as for LightningCLI (--model, --data, or --config).",
    )
    evaluate.add_argument("checkpoints", nargs="+", help="checkpoint files, directories or globs")
    evaluate.add_argument("--output", type=Path, required=True, help="folder for the results")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output")
    evaluate.add_argument("--device", default="auto", help="accelerator: auto, cpu, gpu, ...")
    evaluate.add_argument("--limit-batches", type=int, default=None, help="validation batches")
    defaults = MonitorConfig()  # the monitor's defaults are evaluate's
    evaluate.add_argument("--train-probe-size", type=int, default=defaults.train_probe_size)
    evaluate.add_argument("--exact-probe-size", type=int, default=defaults.exact_probe_size)
    evaluate.add_argument("--windows", type=int, nargs="*", default=[1, 3, 5, 7])
    evaluate.add_argument(
        "--exclude-layers", nargs="*", default=[], help="module names or glob patterns to skip"
    )
    evaluate.add_argument(
        "--flag-rule", choices=get_args(FlagRule), default=defaults.flag_rule, help="docs/flags.md"
    )
    evaluate.add_argument("--flag-threshold", type=float, default=defaults.flag_threshold)
    evaluate.add_argument("--top-k", type=int, default=defaults.top_k)
    evaluate.add_argument("--scan-train-set", action="store_true")
    evaluate.add_argument(
        "--quantization",
        action="store_true",
        help="also rank the last checkpoint's Linear/Conv layers by the damage (expected KL) "
        "that rounding their weights would do; writes quantization.csv",
    )
    evaluate.add_argument(
        "--bits", type=int, nargs="+", default=[4, 8], help="widths for --quantization"
    )
    evaluate.add_argument(
        "--damage-samples",
        type=int,
        default=64,
        help="validation samples the quantisation report averages over",
    )
    evaluate.add_argument(
        "--measure-damage",
        action="store_true",
        help="with --quantization: also quantise each layer alone and measure the actual KL",
    )
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on real data with the monitor",
        description="A short real training run with SensitivityMonitor, with some training "
        "labels corrupted so that the flags have something to find; it saves a checkpoint per "
        "epoch and prints the evaluate command that measures them again.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--max-epochs", type=int, default=None)
    demo.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "digits", "fashion-mnist", "mnist", "cifar10"],
        help="auto: Fashion-MNIST from /usr/share/datasets if present, else scikit-learn's digits",
    )
    demo.add_argument("--corrupt", type=float, default=0.03)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _evaluate(args: argparse.Namespace, lightning_args: list[str]) -> int:
    from lightning_sens.callbacks.monitor import default_batch_fn
    from lightning_sens.cli_checks import check_data, check_fit, first_batch
    from lightning_sens.config import MonitorConfig
    from lightning_sens.core.inputs import default_forward, logits_of

    output: Path = args.output
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder.")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"{output} exists and is not empty; pass --overwrite to replace it.")
    if not lightning_args:
        raise UsageError(
            "name the model and data after '--', e.g. -- --model pkg.MyModule --data "
            "pkg.MyDataModule, or -- --config config.yaml"
        )
    try:
        config = MonitorConfig(
            train_probe_size=args.train_probe_size,
            exact_probe_size=args.exact_probe_size,
            windows=tuple(args.windows),
            exclude_layers=tuple(args.exclude_layers),
            flag_rule=args.flag_rule,
            flag_threshold=args.flag_threshold,
            top_k=args.top_k,
            scan_train_set=args.scan_train_set,
            save_figures=True,
            strict=True,
        )
    except ValueError as error:  # the monitor's options
        raise UsageError(str(error)) from None
    checkpoints = sorted(
        (_read(path) for path in _find_checkpoints(args.checkpoints)),
        key=lambda item: (item[2], item[1], str(item[0])),
    )
    cli = _lightning_cli(lightning_args)
    model, data = cli.model, cli.datamodule
    if data is None:
        raise UsageError(
            "evaluate needs a LightningDataModule: pass --data (or data: in --config)."
        )
    data.prepare_data()
    data.setup("fit")
    # Before any work and before the output folder: do the checkpoints and the data fit the model?
    check_fit(model, [(path, entry) for path, _, _, entry in checkpoints])
    loader = data.val_dataloader()
    warning = check_data(
        model,
        first_batch(loader[0] if isinstance(loader, list | tuple) else loader),
        default_batch_fn,
        lambda module, inputs: logits_of(default_forward(module, inputs)),
        lambda index: _state_dict(checkpoints[index][0])["state_dict"],
        len(checkpoints),
    )
    if warning:
        print(f"lightning-sens: warning: {warning}", file=sys.stderr)
    # Results go to a hidden sibling folder, renamed to --output only when all went well.
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.partial-{os.urandom(4).hex()}"
    work.mkdir()
    try:
        lines = _run(args, config, [item[:3] for item in checkpoints], model, data, work)
        _publish(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print("\n".join(lines))
    if warning:  # again, now that Lightning's output has scrolled it away
        print(f"lightning-sens: warning: {warning}", file=sys.stderr)
    return 0


def _publish(work: Path, output: Path) -> None:
    """Rename ``work`` to ``output``, replacing an earlier ``output`` only now."""
    if not output.exists():
        os.replace(work, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.replace(output, old / output.name)
    try:
        os.replace(work, output)
    except BaseException:
        os.replace(old / output.name, output)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _run(
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
    from lightning_sens.damage import QUANTIZATION_COLUMNS, quantization_report
    from lightning_sens.reporting.html import write_report
    from lightning_sens.reporting.tables import write_table

    monitor = SensitivityMonitor(config, train_dataloader=data.train_dataloader())
    logger = TensorBoardLogger(work, name="", version="", default_hp_metric=False)
    done = []
    for path, epoch, step in tqdm(checkpoints, desc="checkpoints", disable=len(checkpoints) < 2):
        monitor.position = (epoch, step)
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            logger=logger,
            callbacks=[monitor],
            limit_val_batches=args.limit_batches,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=work,
        )
        trainer.validate(model, dataloaders=data.val_dataloader(), ckpt_path=path, verbose=False)
        done.append((path.name, epoch, step))
    last = checkpoints[-1][1]
    figures = sorted((work / "sensitivity" / "figures").glob(f"*_epoch{last:04d}.png"))
    table = work / "sensitivity" / f"flags_epoch{last:04d}.csv"
    report = work / "report.html"
    datasets = {"train": data.train_dataloader().dataset, "val": data.val_dataloader().dataset}
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
    )
    output: Path = args.output
    lines = [f"Evaluated {len(done)} checkpoint(s). Report: {output / 'report.html'}"]
    if args.quantization:
        loader = data.val_dataloader()
        count = min(args.damage_samples, len(loader.dataset))
        samples = [loader.dataset[i] for i in range(count)]
        inputs, _, _ = monitor.batch_fn((loader.collate_fn or default_collate)(samples))
        device = next(model.parameters()).device
        rows = quantization_report(
            model,
            to_device(inputs, device),
            args.bits,
            args.measure_damage,
            monitor.forward_fn,
            config.chunk_size,
        )
        write_table(rows, work / "quantization.csv", QUANTIZATION_COLUMNS)
        lines.append(_quantization_text(rows, checkpoints[-1][0].name, count))
        lines.append(f"Quantisation table: {output / 'quantization.csv'}")
    logger.finalize("success")  # every event file closed before the folder is renamed
    lines.append(f"Flag tables and figures: {output / 'sensitivity'}")
    lines.append(f"View the curves with: tensorboard --logdir {output}")
    return lines


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    split = arguments.index("--") if "--" in arguments else len(arguments)
    ours, lightning_args = arguments[:split], arguments[split + 1 :]
    args = _parser().parse_args(ours)
    here = Path.cwd()  # as `python -m` does: the user's modules import from the current folder
    if not any(Path(entry or ".").resolve() == here for entry in sys.path):
        sys.path.insert(0, str(here))
    try:
        if args.command == "evaluate":
            return _evaluate(args, lightning_args)
        from lightning_sens.demo import run_demo

        return run_demo(args.out, args.max_epochs, args.dataset, args.corrupt, args.seed)
    except UsageError as error:
        print(f"lightning-sens: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightning-sens: interrupted.", file=sys.stderr)
        return 130
