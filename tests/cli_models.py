"""A LightningModule and a LightningDataModule importable by class path, for the CLI tests.

The model and the data are :mod:`lightning_sens.demos.tiny`'s; the subclasses here give them
class paths in this module (``tests.cli_models.TinyModule``: the error messages tested name
them), init args saved in the checkpoints, and the variants the tests need. Only
``lightning_sens`` is imported: a test copies this file to another folder and imports it from
there.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_sens.demos import tiny


class TinyModule(tiny.TinyClassifier):
    """The tiny classifier, its init args saved in its checkpoints; logs nothing itself."""

    def __init__(self, width: int = 4, classes: int = 4) -> None:
        super().__init__(width, classes, log_loss=False)
        self.save_hyperparameters()


class TinyModule3D(TinyModule):
    """Returns (B, K, 1), not (B, K) logits."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[..., None]


class ExtraModule(TinyModule):
    """TinyModule with one more layer: TinyModule's checkpoints lack two of its keys."""

    def __init__(self, width: int = 4, classes: int = 4) -> None:
        super().__init__(width, classes)
        self.extra = nn.Linear(classes, classes)


class FailingModule(TinyModule):
    """Fails in its validation step: with an error, or as if interrupted (Ctrl+C)."""

    def __init__(self, width: int = 4, classes: int = 4, interrupt: bool = False) -> None:
        super().__init__(width, classes)
        self.interrupt = interrupt

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        raise KeyboardInterrupt if self.interrupt else RuntimeError("boom")


class TinyData(tiny.TinyData):
    """The tiny random images (64 training, 32 validation samples); with ``signal``, each class
    adds its own pattern (learnable); ``shift`` moves the validation labels by one class per
    unit (so that they disagree with what a model learnt)."""
