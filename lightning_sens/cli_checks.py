"""What ``lightning-sens evaluate`` checks before any work, each failure one line (exit status 2):
the class paths after ``--``, the Lightning arguments, the checkpoints' fit to the model, and
whether the model can read the data (docs/cli.md, "Errors")."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, default_collate

__all__ = [
    "UsageError",
    "check_class_paths",
    "check_data",
    "check_fit",
    "lightning_error",
    "shapes_of",
]

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_KINDS = {"model": "LightningModule", "data": "LightningDataModule"}
# Lines of jsonargparse's error that restate what the other lines say.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|"
    r"Expected a <class 'NoneType'>|Given value( type)?: |Expected a path but )"
)


class UsageError(Exception):
    """A problem with the command line: reported in one line, exit status 2."""


def _wanted(arguments: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The last class path named for model and data: name → (class path, where it was named),
    from ``--model X``, ``--model=X`` and the ``model:`` sections of ``--config`` files."""
    import yaml

    found: dict[str, tuple[str, str]] = {}
    for i, argument in enumerate(arguments):
        option, _, value = argument.partition("=")
        if not value and i + 1 < len(arguments):
            value = arguments[i + 1]
        if option in ("--model", "--data"):
            found[option[2:]] = (value, option)
        elif option in ("--config", "-c") and Path(value).is_file():
            try:
                loaded = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue  # jsonargparse says what is wrong with it
            for name in _KINDS:
                section = loaded.get(name) if isinstance(loaded, dict) else None
                if isinstance(section, dict):
                    section = section.get("class_path")
                if isinstance(section, str):
                    found[name] = (section, f"{name}: in {value}")
    return found


def check_class_paths(arguments: Sequence[str]) -> None:
    """Import each dotted class path the way jsonargparse will, and say in one line what is
    wrong with it: the module that cannot be imported, the class that it lacks (with the close
    matches among its LightningModule or LightningDataModule classes), or the wrong kind."""
    import lightning.pytorch as pl

    bases = {"model": pl.LightningModule, "data": pl.LightningDataModule}
    for name, (path, where) in _wanted(arguments).items():
        if not _DOTTED.fullmatch(path) or Path(path).exists():
            continue
        module_name, _, attribute = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise UsageError(
                f"{where}: cannot import module {module_name!r} (ModuleNotFoundError: {error}); "
                "run from the folder that contains it or install it."
            ) from None
        except Exception as error:
            raise UsageError(
                f"{where}: importing module {module_name!r} failed: "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from None
        found = getattr(module, attribute, None)
        base, kind = bases[name], _KINDS[name]
        if found is None:
            classes = [
                key
                for key, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, base) and value is not base
            ]
            close = difflib.get_close_matches(attribute, classes, n=3)
            hint = (
                f"did you mean {' or '.join(map(repr, close))}?"
                if close
                else f"its {kind} classes: {', '.join(classes) or 'none'}."
            )
            raise UsageError(f"{where}: module {module_name!r} has no class {attribute!r}; {hint}")
        if not (isinstance(found, type) and issubclass(found, base)):
            other = next((n for n, b in bases.items() if n != name), "")
            hint = (
                f" (it is a {_KINDS[other]}: pass it as --{other})"
                if isinstance(found, type) and issubclass(found, bases[other])
                else ""
            )
            raise UsageError(f"{where}: {path} is not a {kind}{hint}.")


def lightning_error(text: str) -> str:
    """jsonargparse's usage dump and multi-line error condensed to the error, in one line."""
    _, marker, error = text.rpartition("error:")
    if not marker:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "the Lightning arguments after '--' were refused"
    lines = [line.strip().lstrip("- ") for line in error.splitlines()]
    text = " ".join(line for line in lines if line and not _NOISE.match(line))
    given = next((line[13:] for line in lines if line.startswith("Given value: ")), "")
    if (
        given
        and "Got value" not in text
        and not given.startswith(("NestedArg(", "{", "Namespace("))
    ):
        text += f"; got {given!r}"
    return text


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Entry → shape (None for entries that are not tensors or have no shape yet)."""
    out: dict[str, tuple[int, ...] | None] = {}
    for key, value in state_dict.items():
        known = isinstance(value, Tensor) and not is_lazy(value)
        out[key] = tuple(value.shape) if known else None
    return out


def _names(found: Sequence[str]) -> str:
    return ", ".join(found[:3]) + (", …" if len(found) > 3 else "")


def check_fit(model: nn.Module, checkpoints: Sequence[tuple[Path, Mapping[str, Any]]]) -> None:
    """Every checkpoint's state_dict against the model's, as ``load_state_dict`` will compare
    them (missing keys are allowed where the module sets ``strict_loading = False``)."""
    own = shapes_of(model.state_dict())
    strict = getattr(model, "strict_loading", True) is not False
    wrong = []
    for path, entry in checkpoints:
        theirs = entry["shapes"]
        missing = [k for k in own if k not in theirs] if strict else []
        unexpected = [k for k in theirs if k not in own] if strict else []
        shapes = [
            f"{k}: checkpoint {theirs[k]}, model {own[k]}"
            for k in own
            if k in theirs and None not in (own[k], theirs[k]) and own[k] != theirs[k]
        ]
        parts = [
            f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_names(missing)})"
            * bool(missing),
            f"{len(unexpected)} unexpected ({_names(unexpected)})" * bool(unexpected),
            f"{len(shapes)} shape mismatch{'es' * (len(shapes) != 1)} ({_names(shapes)})"
            * bool(shapes),
        ]
        if any(parts):
            wrong.append((path, ", ".join(p for p in parts if p), entry["hparams"]))
    if wrong:
        path, problems, hparams = wrong[0]
        more = f" (and {len(wrong) - 1} more checkpoints)" * (len(wrong) > 1)
        saved = ", ".join(f"{k}={v!r:.30}" for k, v in list(hparams.items())[:6])
        kind = type(model)
        raise UsageError(
            f"checkpoint {path}{more} does not fit {kind.__module__}.{kind.__qualname__}: "
            f"{problems}; pass the --model (and its init args) the checkpoint was trained with"
            + (f" (it saved the init args {saved})." if saved else ".")
        )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def first_batch(loader: DataLoader) -> Any:
    """The loader's first batch, its samples fetched from the dataset (no workers started), or
    the loader's own first batch where the dataset cannot be indexed."""
    dataset = loader.dataset
    try:
        size = min(loader.batch_size or 2, len(dataset))  # type: ignore[arg-type]
        return (loader.collate_fn or default_collate)([dataset[i] for i in range(size)])
    except (TypeError, NotImplementedError, AttributeError):
        return next(iter(loader))


def check_data(
    model: nn.Module,
    batch: Any,
    batch_fn: Callable[[Any], Any],
    logits_fn: Callable[[nn.Module, Any], Any],
    weights: Callable[[int], Mapping[str, Any]],
    checkpoints: int,
    task: str = "auto",
    ignore_index: int | None = None,
) -> str | None:
    """Run the model with the first checkpoint's weights (``weights(0)``) on the first validation
    batch: raise if it cannot read the inputs, returns logits that do not meet the labels (one
    class per sample, or a class per token or pixel: docs/tasks.md) or labels outside the
    model's classes; return a warning where the last checkpoint's accuracy on the batch (over
    its positions, for many) is no better than chance (batches of 20 samples or more)."""
    from lightning_sens.callbacks.setup import describe_inputs, eval_mode
    from lightning_sens.core import read_layout

    try:
        inputs, labels, _ = batch_fn(batch)
    except Exception as error:
        raise UsageError(
            f"cannot read the first validation batch: {type(error).__name__}: {_first_line(error)}"
        ) from None
    described = describe_inputs(inputs)
    if not isinstance(labels, Tensor) or labels.dim() == 0:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise UsageError(f"the first validation batch has labels of shape {shape}, not (B, ...).")

    def logits(index: int) -> Tensor:
        model.load_state_dict(weights(index), strict=False)
        with eval_mode(model), torch.no_grad():
            return logits_fn(model, inputs)

    try:
        output = logits(0)
    except Exception as error:
        raise UsageError(
            f"the model cannot read the data: the first validation batch gives {described}; "
            f"the forward raised {type(error).__name__}: {_first_line(error)}"
        ) from None
    if not isinstance(output, Tensor):
        raise UsageError(
            f"the model returns {type(output).__name__} on the first validation batch "
            f"({described}), not logits."
        )
    try:
        layout = read_layout(output, labels, inputs, task, ignore_index)
    except (TypeError, ValueError) as error:
        raise UsageError(f"the first validation batch ({described}): {error}") from None
    if layout.dense:
        return _check_positions(output, labels, inputs, layout, logits, checkpoints, described)
    if output.dim() != 2 or len(output) != len(labels):
        raise UsageError(
            f"the model returns {tuple(output.shape)} on the first validation batch "
            f"({described}), not (B, K) logits for its {len(labels)} samples."
        )
    labels = labels.reshape(-1)
    classes = output.shape[1]
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise UsageError(f"the validation labels are {labels.dtype}, not class indices.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise UsageError(
            f"the validation labels range over [{low}, {high}] but the model returns K={classes} "
            f"logits (classes 0 to {classes - 1}): is --data the data this model was trained on?"
        )
    if len(labels) < 20:
        return None
    if checkpoints > 1:
        output = logits(checkpoints - 1)
    accuracy = float((output.argmax(-1) == labels.to(output.device)).float().mean())
    return _chance(accuracy, 1 / classes, f"{len(labels)} samples, {described}")


def _check_positions(
    output: Tensor,
    labels: Tensor,
    inputs: Any,
    layout: Any,
    logits: Callable[[int], Tensor],
    checkpoints: int,
    described: str,
) -> str | None:
    """:func:`check_data` for a model with many positions per sample."""
    from lightning_sens.core import position_scores

    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    mask = mask if isinstance(mask, Tensor) and mask.shape == labels.shape else None
    try:
        scores = position_scores(output, labels, layout, mask)
    except (TypeError, ValueError) as error:
        raise UsageError(f"the first validation batch ({described}): {error}") from None
    if len(labels) < 20:
        return None
    if checkpoints > 1:
        scores = position_scores(logits(checkpoints - 1), labels, layout, mask)
    counted = int(scores.valid.sum())
    accuracy = float(scores.correct.sum()) / max(counted, 1)
    classes = output.shape[layout.class_dim] if layout.task == "multiclass" else 2
    return _chance(accuracy, 1 / classes, f"{counted} positions, {described}")


def _chance(accuracy: float, chance: float, what: str) -> str | None:
    """The warning where ``accuracy`` is at most 1.5 × chance, else None."""
    if accuracy > 1.5 * chance:
        return None
    return (
        f"accuracy {accuracy:.3g} on the first validation batch ({what}) with the last "
        f"checkpoint, chance is 1/{round(1 / chance)}: is --data the data this model was "
        "trained on? (Pass the --config or --data of the training run; the demo writes its own "
        "to runs/demo/config.yaml.) The evaluation goes on, but its FI and flags describe a "
        "model that cannot classify these samples."
    )
