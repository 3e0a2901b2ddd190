"""Examples are documentation that runs: their small modes, with TensorBoard output read back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # few-batch runs warn about workers
def test_monitor_digits_writes_tensorboard_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load("monitor_digits")
    assert example.main(["--max-epochs", "2", "--out", str(tmp_path)]) == 0

    events = EventAccumulator(
        str(tmp_path), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    )
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("true", "pred"):
        for q in (75, 80, 85, 90, 95, 98, 99, 100):
            assert f"sensitivity/val_{name}/log_fi_q{q}" in scalars
        assert f"sensitivity/val_{name}/log_fi" in events.Tags()["histograms"]
    assert {"train/loss", "val/loss", "val/acc", "sensitivity/train/corrupted_in_top"} <= scalars
    layer_keys = {t for t in scalars if t.startswith("sensitivity/layer_scale_log_fi/")}
    assert layer_keys == {f"sensitivity/layer_scale_log_fi/net.{i}" for i in (0, 1, 3, 4, 7)}
    assert "sensitivity/probe/mean_pixel_relative_fi" in events.Tags()["images"]

    holds = events.Scalars("sensitivity/probe/closed_form_holds")
    assert len(holds) == 2  # one value per validation epoch, sanity check excluded
    assert all(0.0 <= e.value <= 1.0 for e in holds)
    quantiles = [
        events.Scalars(f"sensitivity/val_pred/log_fi_q{q}")[-1].value for q in (75, 90, 100)
    ]
    assert quantiles == sorted(quantiles)

    out = capsys.readouterr().out
    assert "corrupted labels rank in the top" in out
    assert f"tensorboard --logdir {tmp_path}" in out
