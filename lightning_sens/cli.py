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
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from lightning_sens.cli_checks import UsageError
from lightning_sens.cli_run import run_checkpoints
from lightning_sens.config import MonitorConfig

__all__ = ["EVALUATE_OPTIONS", "NOT_EXPOSED", "main"]


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


# The MonitorConfig fields that `evaluate` exposes, each as the flag `--` + its name with `-` for
# `_` (--train-probe-size), and the help evaluate gives it (what it means for checkpoints). Its
# type, default and choices are the field's: see _add_monitor_options.
EVALUATE_OPTIONS: dict[str, str] = {
    "train_probe_size": "training samples in the fixed probe (chosen with --seed) that every "
    "checkpoint scores: the train split",
    "exact_probe_size": "samples per split through the exact engine (maps, layers, ranks)",
    "windows": "window sizes of the input FI maps (odd)",
    "layers": "module names for per-layer FI (None: every module with trainable parameters)",
    "exclude_layers": "module names or glob patterns left out of the per-layer FI",
    "damage_noise": "rho of the per-layer curves: expected KL under Gaussian weight noise of "
    "rho x the layer's rms (docs/damage.md)",
    "damage_bits": "b of the per-layer curves: expected KL of rounding a layer's weights to b bits",
    "flag_rule": "how samples are flagged (docs/flags.md)",
    "flag_threshold": "robust z-score cut-off of the mad rule and of language models' documents",
    "top_k": "samples the top_k rule flags per split and checkpoint",
    "persistence": "n in 'flagged at m of the last n checkpoints'",
    "scan_train_set": "also score every training sample (the train_all split)",
    "scan_every_n_epochs": "with --scan-train-set: scan at every n-th checkpoint",
    "chunk_size": "samples per pass of the exact engine (None: the engine's default)",
    "num_images": "flagged samples and FI-map overlays drawn per figure",
    "class_names": "one name per class for the figures, tables and report (None: the "
    "validation dataset's classes attribute, else the class numbers)",
    "task": "how the logits meet the labels: auto (read from the first batch), binary, "
    "multiclass or multilabel (docs/tasks.md)",
    "ignore_index": "the label of token or pixel positions to skip (None: -100, and 255 where "
    "the model has at most 255 classes)",
    "position_quantile": "the upper quantile of a sample's positions' log FI logged beside "
    "their mean (models with many positions)",
    "position_flag_share": "flag a sample with many positions when an estimated share of at "
    "least this many of its positions carry wrong labels",
    "seed": "seed of the probe selection",
}

# The MonitorConfig fields that `evaluate` does not expose, and why; _FIXED sets some of them.
NOT_EXPOSED: tuple[tuple[str, str], ...] = (
    ("every_n_epochs", "evaluate measures every checkpoint it is given: pass fewer checkpoints"),
    ("score_training_steps", "checkpoints have no training steps to score: train is the probe"),
    ("log_images", "always on: the report shows the figures"),
    ("save_figures", "always on: the report embeds the figures' PNG files"),
    ("budget", "no training time to budget against: evaluate runs every part (fit only)"),
    ("position_stride", "no training time to budget against: evaluate scores every position"),
    ("strict", "always on: an error stops evaluate instead of leaving holes in the results"),
)
_FIXED: dict[str, Any] = {"save_figures": True, "strict": True}


def _flag(field: str) -> str:
    """The flag of a MonitorConfig field.

    >>> _flag("train_probe_size")
    '--train-probe-size'
    """
    return "--" + field.replace("_", "-")


def _parsed_as(field: str, hint: Any, default: object) -> dict[str, Any]:
    """add_argument's type, nargs, choices or action for a MonitorConfig field's type: values of
    the type the field holds (a tuple field takes a list, which MonitorConfig makes a tuple)."""
    optional = get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)
    if optional:
        (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
    if hint is bool and default is False:
        return {"action": "store_true"}
    if get_origin(hint) is Literal:
        return {"choices": get_args(hint)}
    if get_origin(hint) is tuple and get_args(hint)[1:] == (Ellipsis,):
        return {"type": get_args(hint)[0], "nargs": "+" if optional else "*"}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no evaluate flag for MonitorConfig.{field} of type {hint}")


def _add_monitor_options(parser: argparse.ArgumentParser) -> None:
    """The flags of EVALUATE_OPTIONS, typed and defaulted as MonitorConfig's fields."""
    hints = get_type_hints(MonitorConfig)
    defaults = MonitorConfig()  # the monitor's defaults are evaluate's
    group = parser.add_argument_group("monitor options (MonitorConfig's fields, docs/monitor.md)")
    for field, text in EVALUATE_OPTIONS.items():
        default = getattr(defaults, field)
        group.add_argument(
            _flag(field), default=default, help=text, **_parsed_as(field, hints[field], default)
        )


def _monitor_config(args: argparse.Namespace) -> MonitorConfig:
    """The MonitorConfig of evaluate's flags (UsageError for values MonitorConfig refuses)."""
    try:
        return MonitorConfig(
            **{field: getattr(args, field) for field in EVALUATE_OPTIONS}, **_FIXED
        )
    except ValueError as error:  # the monitor's options
        raise UsageError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sens",
        description="Sensitivity (Shu & Zhu's influence measure FI) of Lightning models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    _add_monitor_options(evaluate)
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a small CNN on real data with the monitor",
        description="A short real training run with SensitivityMonitor, with some training "
        "labels corrupted so that the flags have something to find; it saves a checkpoint per "
        "epoch and prints the evaluate command that measures them again.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the results")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    demo.add_argument(
        "--max-epochs", type=int, default=None, help="None: 3 on Fashion-MNIST, 8 on the digits"
    )
    demo.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "digits", "fashion-mnist", "mnist", "cifar10"],
        help="auto: Fashion-MNIST from /usr/share/datasets if present, else scikit-learn's digits",
    )
    demo.add_argument(
        "--corrupt",
        type=float,
        default=0.03,
        help="share of training labels moved to another class",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, labels and training")
    return parser


def _evaluate(args: argparse.Namespace, lightning_args: list[str]) -> int:
    from lightning_sens.callbacks.monitor import default_batch_fn
    from lightning_sens.cli_checks import check_data, check_fit, first_batch
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
    config = _monitor_config(args)
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
        config.task,
        config.ignore_index,
    )
    if warning:
        print(f"lightning-sens: warning: {warning}", file=sys.stderr)
    # Results go to a hidden sibling folder, renamed to --output only when all went well.
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.partial-{os.urandom(4).hex()}"
    work.mkdir()
    try:
        lines = run_checkpoints(args, config, [item[:3] for item in checkpoints], model, data, work)
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
        from lightning_sens.demos.run import run_demo

        if args.out.exists() and any(args.out.iterdir()):
            if not args.overwrite:
                raise UsageError(
                    f"{args.out} exists and is not empty (a second run would mix its logs and "
                    "checkpoints with the first); pass --overwrite to replace it, or another --out."
                )
            shutil.rmtree(args.out)
        return run_demo(args.out, args.max_epochs, args.dataset, args.corrupt, args.seed)
    except UsageError as error:
        print(f"lightning-sens: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightning-sens: interrupted.", file=sys.stderr)
        return 130
