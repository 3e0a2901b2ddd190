"""SensitivityMonitor() at its defaults (but budget=None, so that every part runs), one short epoch,
on the architectures people train.

A CNN, a ViT, a text transformer fed dict batches, a Hugging Face BERT wrapped the usual way, and
an LSTM: every documented scalar is logged (read back from TensorBoard's event files), the flag
table is written, every figure is drawn, and no warning is raised but Lightning's own hints about
tiny loaders.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sens import SensitivityMonitor
from lightning_sens.reporting import keys
from tests import zoo
from tests.logged import epoch_table, read_logged

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
]

CLASSES = 3


class Classifier(pl.LightningModule):
    """Any model, trained with cross-entropy; batches are tuples or dicts with "labels"."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _logits_and_labels(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            output = self(**inputs)
            return getattr(output, "logits", output), batch["labels"]
        return self(batch[0]), batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, labels = self._logits_and_labels(batch)
        return nn.functional.cross_entropy(logits, labels)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, labels = self._logits_and_labels(batch)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Tokens(Dataset):
    """Token sequences as a tokenizer gives them: dicts of tensors, with "labels"."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 20, (size, 6), generator=g)
        self.mask = torch.ones(size, 6, dtype=torch.long)
        self.mask[::3, 4:] = 0
        self.ids[::3, 4:] = 0
        self.labels = torch.randint(0, CLASSES, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _tuples(make: Callable[[int], Tensor], size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(seed)
    x = make(size)
    y = torch.randint(0, CLASSES, (size,), generator=torch.Generator().manual_seed(seed))
    return [(x[i].float() if x.is_floating_point() else x[i], y[i]) for i in range(size)]


def _bert() -> nn.Module:
    pytest.importorskip("transformers")
    return zoo.hf_bert(CLASSES)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], Any]]] = {
    "cnn": (lambda: zoo.small_cnn(CLASSES), lambda n, s: _tuples(zoo.images(2, 6), n, s)),
    "vit": (lambda: zoo.vit(CLASSES), lambda n, s: _tuples(zoo.images(3, 8), n, s)),
    "text_transformer": (lambda: zoo.TextTransformer(CLASSES), Tokens),
    "hf_bert": (_bert, Tokens),
    "lstm": (
        lambda: zoo.Recurrent(nn.LSTM, CLASSES),
        lambda n, s: _tuples(zoo.ids(20, 5), n, s),
    ),
}


@pytest.mark.parametrize("name", list(CASES))  # any other warning is an error (pyproject)
def test_monitor_at_defaults(name: str, tmp_path: Path) -> None:
    build, data = CASES[name]
    pl.seed_everything(0)
    module = Classifier(build().float())
    train = DataLoader(data(48, 0), batch_size=16, shuffle=True)
    val = DataLoader(data(24, 1), batch_size=8)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=[SensitivityMonitor(budget=None)],  # the fixed schedule: no timing in tests
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, train, val)

    run = tmp_path / "tb" / "version_0"
    logged = read_logged(run)
    scalars = set(logged.scalars)
    expected = {
        keys.curve(t, s, stat) for t in keys.TARGETS for s in keys.SPLITS for stat in keys.STATS
    }
    expected.add(keys.gap())
    layers = {
        n: m
        for n, m in module.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    }
    for split in keys.SPLITS:
        expected |= {keys.flag_count(split), keys.persistent_count(split)}
        expected |= {keys.closed_form_holds(split), keys.map_relative(split, 1)}
        expected |= {keys.layers_at_closed_form(split)}
        for layer, m in layers.items():
            expected.add(keys.layer_kl_noise(split, layer))
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) and m.weight.requires_grad:
                expected.add(keys.layer_kl_quant(split, layer, 4))
    missing = expected - scalars
    assert not missing, sorted(missing)
    for split in keys.SPLITS:
        for figure in ("manhattan", "flagged", "layer_heatmap", "layer_strip", "fi_maps"):
            assert keys.image(figure, split) in logged.images, (figure, split)
    with epoch_table(run, "flags", 0).open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["sample"]) for r in rows if r["split"] == "val") == list(range(24))
    assert {r["split"] for r in rows} == {"train", "val"}
