"""Shared by the benchmarks: where shared/ is and a stable machine id for result file names."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("FFN_SHARED", HERE.parent.parent / "shared"))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_id() -> str:
    """Slugified CPU model + core count, e.g. ``intel-xeon-processor-2c``."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    slug = re.sub(r"-(r|tm)-", "-", f"-{slug}-").strip("-")
    return f"{slug}-{os.cpu_count()}c"


def fib25_crop(size: int):
    """The central ``size``^3 crop of the 250^3 FIB-25 cube's raw uint8 image (whole cube
    from 250)."""
    import h5py

    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw = f["raw"][:]
    if size >= 250:
        return raw
    o = (250 - size) // 2
    return raw[o:o + size, o:o + size, o:o + size]
