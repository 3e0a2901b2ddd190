"""benchmarks/label_noise.py: the small run end to end, the instance-dependent noise it draws, and
the models it trains."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "label_noise.py"


def _benchmark() -> ModuleType:
    """benchmarks/label_noise.py as a module (benchmarks/ is not a package)."""
    name = "label_noise_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_label_noise_benchmark_small_mode(tmp_path: Path) -> None:
    out = tmp_path / "label_noise.md"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)], check=True, timeout=600
    )
    lines = out.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| data"))
    column = {name.strip(): i for i, name in enumerate(header.split("|"))}
    rows = [line.split("|") for line in lines if line.startswith("| digits")]
    by_rate = {int(r[column["%"]]): r for r in rows}
    assert sorted(by_rate) == [0, 20]
    assert by_rate[0][column["noise"]].strip() == "none"
    flagged_clean = int(by_rate[0][column["flagged / bad"]].split("(")[0])
    assert flagged_clean <= 0.005 * 1297  # quiet on clean labels
    assert float(by_rate[20][column["F1"]].split()[0]) >= 0.85  # F1 at 20 % symmetric noise


def test_instance_noise_mislabels_the_hard_images_with_the_other_classes_probabilities() -> None:
    """Exactly rate × N wrong labels, never the true one, the same for the same seed; hard
    images (low p of their class) are chosen far more often, and each wrong label follows the
    separate model's probabilities over the other classes."""
    bench = _benchmark()
    n, k = 20_000, 4
    y = torch.arange(n) % k
    hard = torch.arange(n) < n // 2  # half the images: the model is unsure of them
    rows = torch.arange(n)
    probs = torch.zeros(n, k)
    probs[rows, y] = torch.where(hard, 0.4, 0.9)
    probs[rows, (y + 1) % k] = torch.where(hard, 0.4, 0.08)  # the likely confusion
    probs[rows, (y + 2) % k] = torch.where(hard, 0.2, 0.02)  # class y + 3: never
    p_true = probs[rows, y]

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return bench.instance_noise(y, probs, 0.2, torch.Generator().manual_seed(seed))

    noisy, bad = draw(0)
    assert int(bad.sum()) == int(0.2 * n)
    assert bool((noisy[bad] != y[bad]).all())
    assert torch.equal(noisy[~bad], y[~bad])
    again, _ = draw(0)
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy, draw(1)[0])
    # chosen with weights 1 − p(true class): the unsure half far more often
    weight = 1 - p_true
    expected_hard = float(weight[hard].sum() / weight.sum())
    assert float(bad[hard].float().sum() / bad.sum()) > expected_hard - 0.05
    easy_bad = bad & ~hard
    # the wrong label follows the other classes' probabilities: 0.08 : 0.02 : 0 on the
    # confident half, 0.4 : 0.2 : 0 on the unsure one
    likely = float((noisy[easy_bad] == (y[easy_bad] + 1) % k).float().mean())
    assert likely == pytest.approx(0.8, abs=0.05)
    assert int((noisy[bad] == (y[bad] + 3) % k).sum()) == 0  # probability 0
    hard_bad = bad & hard
    likely = float((noisy[hard_bad] == (y[hard_bad] + 1) % k).float().mean())
    assert likely == pytest.approx(2 / 3, abs=0.03)


@pytest.mark.parametrize("model", ["cnn", "cnn3", "mlp", "resnet"])
@pytest.mark.parametrize("side", [8, 28])
def test_every_benchmark_model_gives_logits_of_the_digits_and_fashion_mnist(
    model: str, side: int
) -> None:
    bench = _benchmark()
    net = bench.Net(model, outputs=11, side=side)
    assert net(torch.rand(3, 1, side, side)).shape == (3, 11)
    with pytest.raises(ValueError, match="model must be one of cnn, cnn3, mlp, resnet"):
        bench.network("vgg", 10, side)
