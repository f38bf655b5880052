"""Shared fixtures: the shared/ data folder (beside the repo, or $FFN_SHARED), the bundled model,
and the device lane.

Device lane: tests marked ``device`` run the device-path exactness checks on the torch device
named by ``$FFN_TEST_DEVICE`` (default ``cpu``, which the normal ``pytest -q`` runs), through
the ``test_device`` fixture::

    FFN_TEST_DEVICE=cuda pytest -m device      # or xpu, cuda:1, ...
    FFN_TEST_DEVICE=cuda FFN_TEST_REPORT=device.json pytest -m device   # + bf16 figures as JSON

A device that is not available is a usage error at start-up (exit code 4), not a lane of skips.
Helpers of the lane's tests (bf16 support, the JSON report) are in device_lane.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("FFN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEVICE_ENV = "FFN_TEST_DEVICE"  # the device lane's torch device (default cpu)


def _lane_device():
    """The torch.device named by $FFN_TEST_DEVICE (default cpu); a pytest.UsageError naming the
    variable when torch cannot use it."""
    from floodfilling.model import select_device

    name = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    try:
        return select_device(name)
    except ValueError as exc:
        raise pytest.UsageError(f"{DEVICE_ENV}={name}: {exc} (run the device lane where that device exists: "
                                f"{DEVICE_ENV}=cuda|xpu|cpu pytest -m device)") from None


def pytest_configure(config):
    if os.environ.get(DEVICE_ENV):
        _lane_device()  # fail at start-up, before any test, when the device is unavailable


@pytest.fixture(scope="session")
def test_device():
    """The device lane's torch.device ($FFN_TEST_DEVICE, default cpu). On cuda, exact mode for
    every test that runs the network directly: no TF32 (the predictor also turns it off) and
    deterministic cuDNN algorithms, none picked by benchmarking (the same algorithm for the
    same shapes in every run; a different batch size may still get another algorithm)."""
    import torch

    dev = _lane_device()
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return dev


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data" / "fib25_train_250.h5").exists():
        pytest.skip(f"shared data folder {SHARED} not found (set FFN_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def fib25(shared_dir):
    """(raw uint8, labels uint32) of the 250^3 FIB-25 cube."""
    import h5py

    with h5py.File(shared_dir / "data" / "fib25_train_250.h5", "r") as f:
        return f["raw"][:], f["labels"][:]


@pytest.fixture(scope="session")
def fib25_image(fib25):
    """The cube normalised as the reference does: (x - 128) / 33, float32."""
    return ((fib25[0].astype(np.float32) - 128) / 33).astype(np.float32)


@pytest.fixture(scope="session")
def bundled():
    """(network, ModelInfo) of the bundled FIB-25 model on the CPU."""
    from floodfilling.model import load_model

    return load_model(None, "cpu")


@pytest.fixture(scope="session")
def bundled_device(bundled, test_device):
    """(network, ModelInfo) of the bundled model for the device lane: the ``bundled`` network
    itself on cpu, a copy on any other device (``bundled`` stays on the cpu)."""
    import copy

    net, info = bundled
    return (net, info) if test_device.type == "cpu" else (copy.deepcopy(net).to(test_device), info)
