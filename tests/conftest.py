"""One suite for every machine: the device comes from LIGHTNING_SENS_TEST_DEVICE (default cpu).

Tests marked ``gpu`` run only where CUDA is present; tests marked ``slow`` only with --runslow.
``python -m tests.oldest_versions`` runs the Lightning-facing tests on the oldest Lightning and
torchmetrics the package declares (LIGHTNING_SENS_EXPECT).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under ``python -m tests.oldest_versions``: stop unless the releases imported are the ones
    it installed (a PYTHONPATH that did not take would test the newest ones instead)."""
    expected = os.environ.get("LIGHTNING_SENS_EXPECT")
    if not expected:
        return
    import lightning
    import torchmetrics

    found = f"lightning=={lightning.__version__} torchmetrics=={torchmetrics.__version__}"
    if found != expected:
        raise pytest.UsageError(f"expected {expected}, imported {found}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture
def device() -> torch.device:
    """The device under test (LIGHTNING_SENS_TEST_DEVICE, default cpu)."""
    name = os.environ.get("LIGHTNING_SENS_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"LIGHTNING_SENS_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)
