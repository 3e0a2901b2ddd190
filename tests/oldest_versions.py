"""The Lightning-facing tests on the oldest Lightning and torchmetrics that pyproject.toml admits.

The package declares lower bounds; this runs what depends on them on exactly those releases, so
that a bound is only ever a version that CI has tested. It installs the two lower bounds (without
their dependencies: torch and the rest stay those of the environment) into a folder of their own,
puts it first on ``PYTHONPATH`` and runs the tests below with pytest; a test then fails unless
the versions it imports are the bounds (``LIGHTNING_SENS_EXPECT`` in tests/conftest.py)::

    python -m tests.oldest_versions            # from the repository root, in its environment
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lightning", "torchmetrics")
# What touches Lightning's and torchmetrics' API: the private reads, the training-step scores,
# the real project layouts, the set-up check and the state's gathering and resuming.
TESTS = (
    "tests/test_lightning_internals.py",
    "tests/test_layouts.py",
    "tests/test_train_scores.py",
    "tests/test_setup_check.py",
    "tests/test_tracking.py",
)


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """The ``>=`` bound of each of :data:`PACKAGES` in the project's dependencies."""
    text = pyproject.read_text()
    found = {}
    for name in PACKAGES:
        match = re.search(rf'"{name}>=([0-9][^",;\s]*)', text)
        if match is None:
            raise SystemExit(f"pyproject.toml declares no lower bound for {name}")
        found[name] = match.group(1)
    return found


def main() -> int:
    bounds = lower_bounds()
    with tempfile.TemporaryDirectory(prefix="lightning-sens-oldest-") as folder:
        pins = [f"{name}=={version}" for name, version in bounds.items()]
        print(f"Installing {' '.join(pins)} into {folder}", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder]
        subprocess.run([*pip, *pins], check=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([folder, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["LIGHTNING_SENS_EXPECT"] = " ".join(pins)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *TESTS]
        return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
