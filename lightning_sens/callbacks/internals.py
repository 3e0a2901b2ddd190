"""Where the monitor reaches past Lightning's public API: every such place, in this one module.

Lightning offers no public way to

1. ask a Trainer, before ``fit`` sets its loops up, which loaders it will use (the set-up check
   reads one batch of each before the sanity check: :func:`planned_loader`);
2. see a training loader before its first iterator exists (the monitor records the indices the
   batch sampler deals, and must start before the loader's workers prefetch:
   :class:`LoaderTap`, which wraps the strategy's public ``process_dataloader`` that Lightning's
   loops call on every loader before they iterate it);
3. choose the step at which a fresh Trainer's ``validate`` logs the module's own metrics (post-hoc
   evaluation logs at each checkpoint's step: :func:`log_at`).

tests/test_lightning_internals.py checks each of them against the installed Lightning, so that a
release that changes one fails that test by name rather than degrading the monitor silently;
CI runs it on the newest and on the oldest Lightning the package declares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["LoaderTap", "log_at", "planned_loader"]


def planned_loader(loop: object) -> DataLoader | None:
    """The first loader a loop will use, asked from its source (the Trainer's own
    ``train_dataloader``/``val_dataloader`` hook, or the loader passed to ``fit``) before the loop
    sets it up; None where it has none. Reads the loop's private ``_data_source``."""
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    found = source.dataloader()
    found = found[0] if isinstance(found, list | tuple) and found else found
    return found if isinstance(found, DataLoader) else None


class LoaderTap:
    """Calls ``on_training_loader(loader)`` on every training loader the Trainer prepares, before
    Lightning creates its first iterator (and so before its workers prefetch a batch).

    Lightning passes every loader through ``trainer.strategy.process_dataloader`` right after it
    built it (also a loader it rebuilt with a distributed sampler, or reloaded with
    ``reload_dataloaders_every_n_epochs``) and before it iterates it. The tap replaces that
    method on this Trainer's strategy object only, and :meth:`remove` puts the strategy's own
    method back.
    """

    def __init__(self, trainer: Any, on_training_loader: Callable[[object], None]) -> None:
        self.strategy = trainer.strategy
        own = self.strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            processed = own(dataloader)
            if trainer.training:  # not the validation loaders of the sanity check or the loop
                on_training_loader(processed)
            return processed

        self._had_own = "process_dataloader" in vars(self.strategy)
        self._own = own
        self.strategy.process_dataloader = process_dataloader

    def remove(self) -> None:
        """Restore the strategy's method (idempotent)."""
        if self.strategy is None:
            return
        if self._had_own:
            self.strategy.process_dataloader = self._own
        else:
            vars(self.strategy).pop("process_dataloader", None)
        self.strategy = None


def log_at(trainer: Any, epoch: int, step: int) -> None:
    """Make the module's own ``self.log`` calls of a fresh Trainer's ``validate`` land at
    ``step`` and ``epoch``, where Lightning would have logged them during ``fit`` (writes the fit
    loop's private step counter)."""
    loop = trainer.fit_loop
    loop.epoch_loop._batches_that_stepped = step
    loop.epoch_progress.current.completed = epoch
