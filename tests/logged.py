"""What a run logged to TensorBoard, read back from its event files under the monitor's keys
(the Trainer's run and one run per split, as the monitor writes them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sens.reporting import keys, paths
from lightning_sens.reporting.paths import split_run
from lightning_sens.reporting.writers import read_scalars


@dataclass(frozen=True)
class Logged:
    """scalars: key → [(step, value)]; images: key → number of images; histograms, texts: keys;
    runs: the split runs that exist."""

    scalars: dict[str, list[tuple[int, float]]]
    images: dict[str, int]
    histograms: set[str]
    texts: set[str]
    runs: set[str]

    def values(self, key: str) -> list[float]:
        return [value for _, value in self.scalars[key]]

    def steps(self, key: str) -> list[int]:
        return [step for step, _ in self.scalars[key]]


def read_logged(log_dir: Path) -> Logged:
    images: dict[str, int] = {}
    histograms: set[str] = set()
    texts: set[str] = set()
    runs: set[str] = set()
    folders: list[tuple[str | None, Path]] = [(None, log_dir)]
    folders += [(split, split_run(log_dir, split)) for split in keys.RUNS]
    for split, folder in folders:
        if not folder.is_dir():
            continue
        if split is not None:
            runs.add(split)
        events = EventAccumulator(
            str(folder), size_guidance={"images": 0, "histograms": 0, "tensors": 0}
        )
        events.Reload()
        tags = events.Tags()
        for tag in tags["images"]:
            images[keys.unroute(split, tag)] = len(events.Images(tag))
        histograms |= {keys.unroute(split, tag) for tag in tags["histograms"]}
        texts |= {keys.unroute(split, tag.removesuffix("/text_summary")) for tag in tags["tensors"]}
    return Logged(read_scalars(log_dir), images, histograms, texts, runs)


def epoch_table(log_dir: Path, kind: str, epoch: int) -> Path:
    """The one table of ``kind`` (``"flags"`` or ``"layers"``) a run wrote for ``epoch``, where
    it made one decision in that epoch (its file is named by epoch and step)."""
    found = sorted(paths.folder(log_dir).glob(f"{kind}_epoch{epoch:04d}_step*.csv"))
    assert len(found) == 1, f"{kind} tables of epoch {epoch}: {found}"
    return found[0]


def epoch_figure(log_dir: Path, name: str, split: str, epoch: int) -> Path:
    """The one saved figure ``name`` of ``split`` for ``epoch`` (one decision in that epoch)."""
    found = sorted((paths.folder(log_dir) / "figures").glob(f"{name}_{split}_epoch{epoch:04d}_*"))
    assert len(found) == 1, f"{name} figures of epoch {epoch}: {found}"
    return found[0]
