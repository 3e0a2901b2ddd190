"""Every place where the monitor reaches past Lightning's public API
(``lightning_sens/callbacks/internals.py``), checked against the installed Lightning.

A Lightning release that changes one of them fails here, by name, with the version that broke it:
the monitor would otherwise degrade without a word (the set-up check skipped, the training steps
unscored, evaluate's curves at step 0). CI runs this file on the newest Lightning and on the
oldest one pyproject.toml declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from lightning_sens.callbacks.internals import LoaderTap, log_at, planned_loader
from lightning_sens.demos.tiny import TinyClassifier, TinyData, tiny_loaders

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

VERSION = f"Lightning {lightning.__version__}"


def _trainer(tmp_path: Path, callback: pl.Callback, **options: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=options.pop("max_epochs", 1),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **options,
    )


class AtFitStart(pl.Callback):
    """What :func:`planned_loader` finds when fit starts, before the sanity check."""

    def __init__(self) -> None:
        self.found: dict[str, DataLoader | None] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loops = {"train": trainer.fit_loop, "val": trainer.fit_loop.epoch_loop.val_loop}
        self.found = {split: planned_loader(loop) for split, loop in loops.items()}


@pytest.mark.parametrize("source", ["loaders", "datamodule"])
def test_planned_loader_finds_the_loaders_before_fit_sets_them_up(
    tmp_path: Path, source: str
) -> None:
    seen = AtFitStart()
    trainer = _trainer(tmp_path, seen, limit_train_batches=1, limit_val_batches=1)
    if source == "loaders":
        train, val = tiny_loaders()
        trainer.fit(TinyClassifier(), train, val)
        assert seen.found == {"train": train, "val": val}, VERSION
    else:
        trainer.fit(TinyClassifier(), datamodule=TinyData())
        found = seen.found
        assert isinstance(found["train"], DataLoader), VERSION
        assert isinstance(found["val"], DataLoader), VERSION
        assert len(found["train"].dataset) == 64, VERSION  # type: ignore[arg-type]
        assert len(found["val"].dataset) == 32, VERSION  # type: ignore[arg-type]


class Tapped(pl.Callback):
    """Taps the loaders at fit start and records, in order, when each training loader reached
    the tap and when one of its iterators drew its first indices from the batch sampler."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.tap: LoaderTap | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tap = LoaderTap(trainer, self.seen)

    def seen(self, loader: object) -> None:
        self.events.append("tapped")
        assert isinstance(loader, DataLoader)
        sampler = loader.batch_sampler
        events, own = self.events, type(sampler).__iter__

        def iterate(this: Any) -> Any:
            for number, indices in enumerate(own(this)):
                if number == 0:
                    events.append("drawn")
                yield indices

        sampler.__class__ = type("Watched", (type(sampler),), {"__iter__": iterate})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append("train start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.tap is not None
        self.tap.remove()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_tap_sees_each_training_loader_before_its_first_iterator(
    tmp_path: Path, workers: int
) -> None:
    """The training loader passes the strategy's ``process_dataloader`` before any of its
    iterators draws from its sampler (with workers: before they prefetch, which is before
    training starts), also when the loaders are reloaded every epoch; validation loaders do not
    reach the tap; the strategy gets its own method back."""
    tapped = Tapped()
    trainer = _trainer(tmp_path, tapped, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    strategy = trainer.strategy
    train = tiny_loaders()[0]
    data = TinyData()
    data.train_dataloader = lambda: DataLoader(  # type: ignore[method-assign]
        train.dataset, batch_size=16, shuffle=True, num_workers=workers
    )
    trainer.fit(TinyClassifier(), datamodule=data)
    events = tapped.events
    taps = [i for i, event in enumerate(events) if event == "tapped"]
    assert len(taps) == 2, f"{VERSION}: {events}"  # epoch 0, and the reload of epoch 1
    assert taps[0] == 0, f"{VERSION}: {events}"
    assert "drawn" in events[taps[0] : taps[1]], f"{VERSION}: {events}"
    assert "drawn" in events[taps[1] :], f"{VERSION}: {events}"
    if workers:  # the workers prefetch as soon as the fit loop makes its iterator
        assert events.index("drawn") < events.index("train start"), f"{VERSION}: {events}"
    assert "process_dataloader" not in vars(strategy)


class Logs(pl.LightningModule):
    """Logs one value in validation, to see at which step Lightning writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyClassifier()

    def forward(self, x: Any) -> Any:
        return self.inner(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("value", 1.0)


class LogAt(pl.Callback):
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_at(trainer, epoch=3, step=120)


def test_log_at_moves_validate_to_the_checkpoints_step(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[LogAt()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(Logs(), tiny_loaders()[1], verbose=False)
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(","), strict=True))
    assert last["step"] == "120", f"{VERSION}: {rows}"
