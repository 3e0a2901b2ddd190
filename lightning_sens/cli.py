"""The ``lightning-sens`` command line: post-hoc evaluation of checkpoints, and the demo.

    lightning-sens evaluate CHECKPOINT... --output DIR [options] -- LIGHTNING_ARGS
    lightning-sens demo [--out runs/demo]

``LIGHTNING_ARGS`` name the model and data the Lightning way, as for ``LightningCLI``:
``--model pkg.Module --model.init_args.width 64 --data pkg.DataModule`` or ``--config cfg.yaml``.
"""

from __future__ import annotations

import argparse
import glob
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


class UsageError(Exception):
    """A problem with the command line: reported in one line, exit status 2."""


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


def _position(path: Path) -> tuple[int, int]:
    """(epoch, global step) stored in a Lightning checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UsageError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return int(state.get("epoch", 0)), int(state.get("global_step", 0))


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
    evaluate.add_argument("--train-probe-size", type=int, default=512)
    evaluate.add_argument("--exact-probe-size", type=int, default=32)
    evaluate.add_argument("--windows", type=int, nargs="*", default=[1, 3, 5, 7])
    evaluate.add_argument(
        "--exclude-layers", nargs="*", default=[], help="module names or glob patterns to skip"
    )
    evaluate.add_argument("--flag-rule", choices=["mad", "top_k"], default="mad")
    evaluate.add_argument("--flag-threshold", type=float, default=3.5)
    evaluate.add_argument("--top-k", type=int, default=10)
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
        description="A short real training run with SensitivityMonitor (a few minutes on 2 CPU "
        "cores), with some training labels corrupted so that the flags have something to find.",
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
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import default_collate
    from tqdm.auto import tqdm

    from lightning_sens.callbacks import SensitivityMonitor
    from lightning_sens.config import MonitorConfig
    from lightning_sens.core.inputs import to_device
    from lightning_sens.damage import QUANTIZATION_COLUMNS, quantization_report
    from lightning_sens.reporting.html import write_report
    from lightning_sens.reporting.tables import write_table

    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.output} exists and is not empty; pass --overwrite to replace it.")
    if not lightning_args:
        raise UsageError(
            "name the model and data after '--', e.g. -- --model pkg.MyModule --data "
            "pkg.MyDataModule, or -- --config config.yaml"
        )
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
    checkpoints = sorted(
        ((path, *_position(path)) for path in _find_checkpoints(args.checkpoints)),
        key=lambda item: (item[2], item[1], str(item[0])),
    )
    with warnings.catch_warnings():
        # Lightning's own use of jsonargparse APIs that jsonargparse deprecated: not the user's.
        warnings.simplefilter("ignore", DeprecationWarning)
        cli = LightningCLI(
            args=lightning_args,
            run=False,
            save_config_callback=None,
            seed_everything_default=False,
            trainer_defaults={"logger": False, "enable_checkpointing": False},
        )
    model, data = cli.model, cli.datamodule
    if data is None:
        raise UsageError(
            "evaluate needs a LightningDataModule: pass --data (or data: in --config)."
        )
    data.prepare_data()
    data.setup("fit")
    monitor = SensitivityMonitor(config, train_dataloader=data.train_dataloader())
    logger = TensorBoardLogger(args.output, name="", version="", default_hp_metric=False)
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
            default_root_dir=args.output,
        )
        trainer.validate(model, dataloaders=data.val_dataloader(), ckpt_path=path, verbose=False)
        done.append((path.name, epoch, step))
    last = checkpoints[-1][1]
    figures = sorted((args.output / "sensitivity" / "figures").glob(f"*_epoch{last:04d}.png"))
    table = args.output / "sensitivity" / f"flags_epoch{last:04d}.csv"
    report = args.output / "report.html"
    write_report(
        report, "lightning-sens evaluation", done, monitor.history, figures, table, config.to_dict()
    )
    print(f"Evaluated {len(done)} checkpoint(s). Report: {report}")
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
        path = args.output / "quantization.csv"
        write_table(rows, path, QUANTIZATION_COLUMNS)
        print(_quantization_text(rows, checkpoints[-1][0].name, count))
        print(f"Quantisation table: {path}")
    print(f"Flag tables and figures: {args.output / 'sensitivity'}")
    print(f"View the curves with: tensorboard --logdir {args.output}")
    return 0


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
    try:
        if args.command == "evaluate":
            return _evaluate(args, lightning_args)
        from lightning_sens.demo import run_demo

        return run_demo(args.out, args.max_epochs, args.dataset, args.corrupt, args.seed)
    except UsageError as error:
        print(f"lightning-sens: error: {error}", file=sys.stderr)
        return 2
