"""Where the monitor writes its files under a run's log folder, in one place.

The callback writes them, and the command line, the demo and the report read them back::

    <log_dir>/sensitivity/
        flags_epoch0003_step0000752.csv    every sample scored by the decision at epoch 3,
                                           step 752 (flag_table)
        layers_epoch0003_step0000752.csv   its per-layer table (layer_table)
        positions_epoch0003_step0000752.csv  outputs with many positions: every sample
                                           scored, its positions reduced (position_table)
        figures/manhattan_val_epoch0003_step0000752.png   with save_figures (figure)
        train/, val/, train_all/           TensorBoard's run of each split (split_run)

A decision is named by its epoch and its global step, so that several in one epoch (a
``val_check_interval`` below 1, the end of ``fit``) never overwrite each other; the names sort
in the order they were made.
"""

from __future__ import annotations

from pathlib import Path

from lightning_sens.reporting.keys import PREFIX

__all__ = [
    "figure",
    "figures",
    "flag_table",
    "flag_tables",
    "folder",
    "layer_table",
    "position_table",
    "split_run",
    "stamp",
]


def folder(log_dir: Path | str) -> Path:
    """The monitor's folder of a run: ``<log_dir>/sensitivity``."""
    return Path(log_dir) / PREFIX


def split_run(log_dir: Path | str, split: str) -> Path:
    """The TensorBoard run of one split: ``<log_dir>/sensitivity/<split>``."""
    return folder(log_dir) / split


def stamp(epoch: int, step: int) -> str:
    """A decision's part of a file name: ``epoch0003_step0000752``."""
    return f"epoch{epoch:04d}_step{step:07d}"


def flag_table(log_dir: Path | str, epoch: int, step: int) -> Path:
    """The flag table of one decision: every scored sample, its scores and its flag."""
    return folder(log_dir) / f"flags_{stamp(epoch, step)}.csv"


def flag_tables(log_dir: Path | str) -> list[Path]:
    """Every decision's flag table, in the order they were made."""
    return sorted(folder(log_dir).glob("flags_epoch*.csv"))


def position_table(log_dir: Path | str, epoch: int, step: int) -> Path:
    """The positions table of one decision (outputs with many positions): every scored
    sample and its positions' scores reduced."""
    return folder(log_dir) / f"positions_{stamp(epoch, step)}.csv"


def layer_table(log_dir: Path | str, epoch: int, step: int) -> Path:
    """The per-layer table of one decision."""
    return folder(log_dir) / f"layers_{stamp(epoch, step)}.csv"


def figure(log_dir: Path | str, name: str, split: str, epoch: int, step: int) -> Path:
    """One saved figure (``save_figures``): ``figures/<name>_<split>_<stamp>.png``."""
    return folder(log_dir) / "figures" / f"{name}_{split}_{stamp(epoch, step)}.png"


def figures(log_dir: Path | str, epoch: int, step: int) -> list[Path]:
    """The figures saved for one decision, by name."""
    return sorted((folder(log_dir) / "figures").glob(f"*_{stamp(epoch, step)}.png"))
