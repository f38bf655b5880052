"""Shared fixtures: the shared/ data folder (beside the repo, or $FFN_SHARED) and the bundled model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("FFN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


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
