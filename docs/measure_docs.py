"""Every number in the README and the docs, measured by one script a reader can rerun.

    python docs/measure_docs.py           # run the demo and the examples, write numbers.json
    python docs/measure_docs.py --render  # render the docs from the existing numbers.json only
    python docs/measure_docs.py --check   # exit 1 if a span differs from what numbers.json gives

It runs, on this machine and timing each by wall clock: the README's main command
(``lightning-sens demo --out <tmp>/demo``), ``python examples/quickstart.py`` and
``python examples/paper/reproduce.py --small --out <tmp>``, each in a fresh temporary folder.
What it measures goes to ``docs/numbers.json`` (with the CPU, core count, torch version and date);
the sentences are then written from that file into the marked spans of the docs,
``<!-- numbers:NAME -->…<!-- /numbers:NAME -->``, and nowhere else. Rerun it when behaviour
changes; ``tests/test_numbers.py`` fails when a span and the JSON disagree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
JSON = ROOT / "docs" / "numbers.json"
# The files whose spans this script writes (paths relative to the repository root).
FILES = ("README.md", "docs/quickstart.md", "docs/paper.md", "examples/paper/README.md")
SPAN = re.compile(r"<!-- numbers:([\w-]+) -->(.*?)<!-- /numbers:\1 -->", re.DOTALL)
OPENING = re.compile(r"<!-- numbers:([\w-]+) -->")
DATASETS = {
    "fashion-mnist": "Fashion-MNIST",
    "digits": "scikit-learn's digits",
    "mnist": "MNIST",
    "cifar10": "CIFAR10",
}


# --- measuring -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The CPU model (from /proc/cpuinfo), core count, GPU if any, versions and date."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "load_average_before": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    """Wall-clock seconds of ``command`` run in ``cwd``, and its stdout."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def parse_demo(stdout: str) -> dict[str, Any]:
    """The numbers the demo prints (see ``lightning_sens.demos.run.run_demo``)."""
    head = re.search(
        r"^Demo: (?P<dataset>[\w-]+), (?P<train>\d+) training samples \((?P<corrupted>\d+) labels "
        r"corrupted\), (?P<val>\d+) validation samples, (?P<epochs>\d+) epochs\.",
        stdout,
        re.MULTILINE,
    )
    last = re.search(
        r"^Last epoch: precision (?P<precision>\S+) \((?P<hits>\d+) of (?P<flagged>\d+) flags.*?"
        r"recall (?P<recall>\S+) \(\d+ of \d+ corrupted",
        stdout,
        re.MULTILINE,
    )
    if head is None or last is None:
        raise ValueError(f"unexpected demo output:\n{stdout}")
    per_epoch = [
        [int(e), int(f), int(h)]
        for e, f, h in re.findall(
            r"^\s+epoch\s+(\d+):\s+(\d+) flagged,\s+(\d+) of them corrupted", stdout, re.MULTILINE
        )
    ]
    cost = re.search(r"^Monitoring took (\d+) %", stdout, re.MULTILINE)
    return {
        "dataset": head["dataset"],
        "train": int(head["train"]),
        "corrupted": int(head["corrupted"]),
        "val": int(head["val"]),
        "epochs": int(head["epochs"]),
        "per_epoch": per_epoch,
        "flagged": int(last["flagged"]),
        "hits": int(last["hits"]),
        "precision": float(last["precision"]),
        "recall": float(last["recall"]),
        "monitor_share_percent": int(cost[1]) if cost else None,
    }


def measure() -> dict[str, Any]:
    """Run the three programs, each in a fresh temporary folder, and return what they measured."""
    python = sys.executable
    console = Path(python).parent / "lightning-sens"
    numbers: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {  # name: (the command as the docs show it, the command run here)
            "demo": (
                "lightning-sens demo --out runs/demo",
                [str(console), "demo", "--out", str(Path(tmp) / "demo")],
            ),
            "quickstart": (
                "python examples/quickstart.py",
                [python, str(ROOT / "examples" / "quickstart.py")],
            ),
            "paper_small": (
                "python examples/paper/reproduce.py --small --out /tmp/paper",
                [python, str(ROOT / "examples" / "paper" / "reproduce.py"), "--small", "--out",
                 str(Path(tmp) / "paper")],
            ),
        }  # fmt: skip
        for name, (shown, command) in runs.items():
            cwd = Path(tmp) / f"{name}-cwd"  # a fresh folder for whatever the program writes
            cwd.mkdir()
            seconds, stdout = _timed(command, cwd)
            numbers[name] = {"command": shown, "seconds": round(seconds, 1)}
            if name == "demo":
                numbers[name].update(parse_demo(stdout))
            print(f"{name}: {seconds:.1f} s", file=sys.stderr)
    return numbers


# --- rendering -------------------------------------------------------------------------------


def about(seconds: float, data: dict[str, Any]) -> str:
    """A wall-clock time, rounded honestly, and where it was measured."""
    if seconds < 10:
        text = f"about {max(1, round(seconds))} s"
    elif seconds < 120:
        text = f"about {5 * round(seconds / 5)} s"
    elif seconds < 600:
        text = f"about {math.floor(seconds / 60 + 0.5)} minutes"
    else:
        text = f"about {5 * round(seconds / 300)} minutes"
    cores = data["machine"]["cores"]
    where = f"{cores} CPU core{'s' if cores != 1 else ''}"
    gpu = data["machine"].get("gpu")
    return f"{text} on {where}" + (f" and a {gpu}" if gpu else "")


def _demo_result(data: dict[str, Any]) -> str:
    d = data["demo"]
    name = DATASETS.get(d["dataset"], d["dataset"])
    return (
        f"Measured by `docs/measure_docs.py` on {name}, {d['train']:,} training samples "
        f"({d['corrupted']:,} labels corrupted), {d['val']:,} validation samples, {d['epochs']} "
        f"epochs: after the last epoch {d['flagged']:,} flagged, {d['hits']:,} of them corrupted, "
        f"precision {d['precision']:.2f} and recall {d['recall']:.2f}"
    )


def _machine(data: dict[str, Any]) -> str:
    m = data["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cores']} CPU cores ({m['cpu']}{gpu}), torch {m['torch']}, {m['date']}"


# One renderer per span name; each reads only numbers.json.
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "demo-time": lambda data: about(data["demo"]["seconds"], data),
    "demo-result": _demo_result,
    "quickstart-time": lambda data: about(data["quickstart"]["seconds"], data),
    "paper-small-time": lambda data: about(data["paper_small"]["seconds"], data),
    "machine": _machine,
}


def span_names(text: str) -> list[str]:
    """The names of the spans opened in ``text``, in order."""
    return OPENING.findall(text)


def render_text(text: str, data: dict[str, Any]) -> str:
    """``text`` with every span's content written from ``data``."""
    spans = SPAN.findall(text)
    if len(spans) != len(span_names(text)):
        raise ValueError("a <!-- numbers:NAME --> span is not closed by <!-- /numbers:NAME -->")

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        if name not in RENDERERS:
            raise KeyError(f"no renderer for the span {name!r}")
        return f"<!-- numbers:{name} -->{RENDERERS[name](data)}<!-- /numbers:{name} -->"

    return SPAN.sub(replace, text)


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(JSON.read_text(encoding="utf-8"))
    return data


def render(data: dict[str, Any], write: bool = True) -> list[str]:
    """Render every file's spans; return the files whose text changed (written if ``write``)."""
    changed = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        new = render_text(text, data)
        if new != text:
            changed.append(name)
            if write:
                path.write_text(new, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--render", action="store_true", help="render from numbers.json only")
    group.add_argument("--check", action="store_true", help="fail if a span is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = render(load(), write=False)
        for name in stale:
            print(
                f"out of date: {name} (run python docs/measure_docs.py --render)", file=sys.stderr
            )
        return 1 if stale else 0
    if not args.render:
        data = measure()
        JSON.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for name in render(load()):
        print(f"rendered {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
