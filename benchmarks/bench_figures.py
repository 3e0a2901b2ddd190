"""Benchmark: the time to draw one set of the monitor's figures, fixed layouts against the
constrained layout they replaced.

The set is what :func:`lightning_sens.reporting.images.epoch_images` returns for one epoch of
:class:`~lightning_sens.demos.tiny.TinyClassifier` (a 3 × 3 convolution, BatchNorm, a linear
layer; K = 10) trained for two epochs on scikit-learn's 8 × 8 digits (1,297 training and 500
validation images): per split (train, val) the Manhattan plot, the flagged samples (8 of the
``top_k=10`` flags), the layer heat map over 3 epochs, the layer strip and the FI maps of 8
probe samples (the edit-damage map and window 1; windows 3, 5 and 7 are at the closed form on
one-channel 8 × 8 images with K = 10, named in the title and not drawn), each rendered to a
(3, H, W) image: the call the monitor's figure thread makes.

Two variants, interleaved within each repeat (their order alternates) so that the drift of a
shared machine hits them alike:

- ``constrained`` (BASELINE, labelled so in the output): the drawing modules as they were at
  commit ``BASELINE_COMMIT`` (``canvas``, ``pictures``, ``figures``, ``sequences``, ``images`` of
  ``lightning_sens/reporting``), read with ``git show`` and loaded beside the current ones, with
  matplotlib's constrained layout. Everything else (engine, scores, keys) is today's code.
- ``fixed``: the current modules, margins computed from each figure's content.

Reported: the median over the repeats of the CPU time (of the drawing thread: what the figures
cost, whatever else the machine runs) and of the wall time of one whole set, their ratios to the
baseline, and the median CPU time per figure (from the end of the previous figure's rendering
to the end of its own: building and rendering). ``--save DIR`` also writes both variants'
PNGs for a look.

Usage: python benchmarks/bench_figures.py [--repeats 10] [--out FILE.md] [--save DIR]

docs/performance.md, "Drawing the figures (`benchmarks/bench_figures.py`)" shows a run of
``--repeats 10``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import Tensor, nn

import lightning_sens.reporting as reporting
from lightning_sens.core import sensitivity
from lightning_sens.damage import predict_damage
from lightning_sens.demos.data import load_images
from lightning_sens.demos.tiny import TinyClassifier
from lightning_sens.flagging import flag
from lightning_sens.reporting import images as fixed_images
from lightning_sens.reporting import keys
from lightning_sens.reporting.summary import split_scores

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose figures used matplotlib's constrained layout.
BASELINE_COMMIT = "a15aaa3613989cafbe66b20257f4d6c3b5190234"
# In import order: each module imports only those before it.
DRAWING = ("canvas", "pictures", "figures", "sequences", "images")
K, PROBE, IMAGES, EPOCHS = 10, 8, 8, 3


def baseline_images(commit: str = BASELINE_COMMIT) -> types.ModuleType:
    """``lightning_sens.reporting.images`` as it was at ``commit``, with the drawing modules it
    imports also from that commit. They are executed under their own names while the current
    modules are set aside, which are then put back: the two sets live side by side."""
    names = [f"{reporting.__name__}.{short}" for short in DRAWING]
    saved_modules = {name: sys.modules.get(name) for name in names}
    saved_attributes = {short: getattr(reporting, short, None) for short in DRAWING}
    loaded: dict[str, types.ModuleType] = {}
    try:
        for short, name in zip(DRAWING, names, strict=True):
            path = f"lightning_sens/reporting/{short}.py"
            source = subprocess.run(
                ["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                capture_output=True, text=True,
            ).stdout  # fmt: skip
            module = types.ModuleType(name)
            module.__file__ = f"{commit[:7]}:{path}"
            sys.modules[name] = module
            setattr(reporting, short, module)  # "from lightning_sens.reporting import figures"
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            loaded[short] = module
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for short, attribute in saved_attributes.items():
            setattr(reporting, short, attribute)
    return loaded["images"]


def figure_inputs() -> dict[str, Any]:
    """The arguments of ``epoch_images`` for one epoch of the tiny CNN on the digits."""
    torch.manual_seed(0)
    _, x_train, y_train, x_val, y_val = load_images("digits", Path("."))
    model = TinyClassifier(classes=K)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a trained model: its scores and maps look like a real run's
        for batch in torch.randperm(len(y_train)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimiser.step()
    model.eval()
    data = {"train": (x_train, y_train), "val": (x_val, y_val)}
    scores, decisions, probes, probe_ids, pictures = {}, {}, {}, {}, {}
    damage = {}
    with torch.no_grad():
        logits = {split: model(x) for split, (x, _) in data.items()}
    for split, (x, y) in data.items():
        scores[split] = split_scores(torch.arange(len(y)), y, logits[split])
        decisions[split] = flag(scores[split].log_fi_true, "top_k", top_k=10)
        probe_ids[split] = torch.arange(PROBE)
        probes[split] = sensitivity(model, x[:PROBE], y[:PROBE], input_target="pred",
                                    windows=(1, 3, 5, 7), channel_metric=True)  # fmt: skip
        parameters = probes[split].parameters
        assert parameters is not None
        damage[split] = predict_damage(model, parameters)
    wanted = fixed_images.pictured_samples(scores, decisions, probes, probe_ids, IMAGES)
    for (kind, split), ids in wanted.items():
        pictures[(kind, split)] = data[split][0][ids]
    history = [
        {
            "epoch": float(epoch),
            **{
                keys.layer_kl_noise(split, name): layer.noise[0.1] * (epoch + 1)
                for split in data
                for name, layer in damage[split].items()
            },
        }
        for epoch in range(EPOCHS)
    ]
    return {
        "scores": scores, "decisions": decisions, "probes": probes, "probe_ids": probe_ids,
        "history": history, "num_classes": K, "num_images": IMAGES, "pictures": pictures,
        "damage": damage, "noise": 0.1, "evidence_splits": ("train",),
    }  # fmt: skip


def timed_set(module: types.ModuleType, inputs: dict[str, Any]) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds of this thread, CPU seconds per figure in the order drawn) of
    one call of ``epoch_images``.

    CPU time is what the figures cost on a shared machine (waiting for a core is not counted);
    each figure's share runs from the end of the previous figure's rendering to the end of its
    own (``figure_to_image`` is wrapped for the call to note when each ends)."""
    drawing = module.figures
    render: Callable[..., Tensor] = drawing.figure_to_image
    ends: list[float] = []

    def noted(fig: Any, dpi: int = 100) -> Tensor:
        image = render(fig, dpi)
        ends.append(time.thread_time())
        return image

    drawing.figure_to_image = noted
    gc.collect()  # the garbage of earlier calls is collected outside the timing
    try:
        wall, start = time.perf_counter(), time.thread_time()
        module.epoch_images(**inputs)
        cpu, wall = time.thread_time() - start, time.perf_counter() - wall
    finally:
        drawing.figure_to_image = render
    return wall, cpu, [b - a for a, b in zip([start, *ends], ends, strict=False)]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table")
    parser.add_argument("--save", type=Path, default=None, help="write both variants' PNGs")
    args = parser.parse_args()
    inputs = figure_inputs()
    variants = {"constrained (baseline)": baseline_images(), "fixed": fixed_images}
    tags = list(fixed_images.epoch_images(**inputs))
    for name, module in variants.items():  # warm-up: fonts, caches, first imports
        images = module.epoch_images(**inputs)
        assert list(images) == tags, (name, list(images), tags)
        if args.save:
            from torchvision.io import write_png

            folder = args.save / name.split()[0]
            folder.mkdir(parents=True, exist_ok=True)
            for tag, image in images.items():
                write_png(image, str(folder / (tag.replace("/", "_") + ".png")))
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    parts: dict[str, list[list[float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            wall, cpu, each = timed_set(variants[name], inputs)
            walls[name].append(wall)
            cpus[name].append(cpu)
            parts[name].append(each)
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"{n} {cpus[n][-1]:.3f} s CPU ({walls[n][-1]:.3f} s wall)" for n in order
        ))  # fmt: skip

    base, new = list(variants)
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    wall = {name: statistics.median(values) for name, values in walls.items()}
    lines = [
        f"Measured on {cpu_model()} ({os.cpu_count()} cores, shared), Python "
        f"{platform.python_version()}, matplotlib {matplotlib.__version__}, torch "
        f"{torch.__version__}; one set = {len(tags)} figures, medians of {args.repeats} "
        "interleaved repeats (`python benchmarks/bench_figures.py`). CPU: the drawing thread's "
        "CPU time; wall: elapsed time, which on a shared machine includes waiting for a core.",
        "",
        "| figure set | CPU | CPU / baseline | min CPU | wall | wall / baseline |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {cpu[name]:.2f} s | {cpu[name] / cpu[base]:.2f} | "
            f"{min(cpus[name]):.2f} s | {wall[name]:.2f} s | {wall[name] / wall[base]:.2f} |"
            for name in variants
        ),
        "",
        f"| figure (median CPU) | {base} | {new} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for i, tag in enumerate(tags):
        old = statistics.median(each[i] for each in parts[base])
        now = statistics.median(each[i] for each in parts[new])
        lines.append(f"| `{tag}` | {old:.3f} s | {now:.3f} s | {now / old:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
