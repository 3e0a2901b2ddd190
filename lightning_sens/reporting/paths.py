"""Where the monitor writes its files under a run's log folder, in one place.

The callback writes them, and the command line, the demo and the report read them back::

    <log_dir>/sensitivity/
        flags_epoch0003.csv      every scored sample of epoch 3 (flag_table)
        layers_epoch0003.csv     the per-layer table of epoch 3 (layer_table)
        figures/manhattan_val_epoch0003.png   with save_figures (figure)
        train/, val/, train_all/ TensorBoard's run of each split (split_run)
"""

from __future__ import annotations

from pathlib import Path

from lightning_sens.reporting.keys import PREFIX

__all__ = ["figure", "figures", "flag_table", "flag_tables", "folder", "layer_table", "split_run"]


def folder(log_dir: Path | str) -> Path:
    """The monitor's folder of a run: ``<log_dir>/sensitivity``."""
    return Path(log_dir) / PREFIX


def split_run(log_dir: Path | str, split: str) -> Path:
    """The TensorBoard run of one split: ``<log_dir>/sensitivity/<split>``."""
    return folder(log_dir) / split


def flag_table(log_dir: Path | str, epoch: int) -> Path:
    """The flag table of one epoch: every scored sample, its scores and its flag."""
    return folder(log_dir) / f"flags_epoch{epoch:04d}.csv"


def flag_tables(log_dir: Path | str) -> list[Path]:
    """Every epoch's flag table, in epoch order."""
    return sorted(folder(log_dir).glob("flags_epoch*.csv"))


def layer_table(log_dir: Path | str, epoch: int) -> Path:
    """The per-layer table of one epoch."""
    return folder(log_dir) / f"layers_epoch{epoch:04d}.csv"


def figure(log_dir: Path | str, name: str, split: str, epoch: int) -> Path:
    """One saved figure (``save_figures``): ``figures/<name>_<split>_epoch<E>.png``."""
    return folder(log_dir) / "figures" / f"{name}_{split}_epoch{epoch:04d}.png"


def figures(log_dir: Path | str, epoch: int) -> list[Path]:
    """The figures saved for one epoch, by name."""
    return sorted((folder(log_dir) / "figures").glob(f"*_epoch{epoch:04d}.png"))
