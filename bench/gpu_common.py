"""Helpers of bench/gpu_check.py: device synchronisation and peak memory, child processes,
the mirrored FIB-25 volume, the tiny flooding model."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_model, fib25_crop  # noqa: E402


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu":
        torch.xpu.synchronize(dev)


def reset_peak(dev) -> None:
    import torch

    if dev.type in ("cuda", "xpu"):
        getattr(torch, dev.type).reset_peak_memory_stats(dev)


def peak_memory(dev) -> dict:
    import torch

    out = {"host_peak_rss_mib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type in ("cuda", "xpu"):
        mod = getattr(torch, dev.type)
        out["device_max_allocated_mib"] = mod.max_memory_allocated(dev) / 2**20
        if hasattr(mod, "max_memory_reserved"):
            out["device_max_reserved_mib"] = mod.max_memory_reserved(dev) / 2**20
    return out


def device_info(dev) -> dict:
    import torch

    info = {"device": str(dev), "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, total_memory_gib=p.total_memory / 2**30, device_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    elif dev.type == "xpu":
        p = torch.xpu.get_device_properties(dev)
        info.update(name=p.name, total_memory_gib=p.total_memory / 2**30, device_count=torch.xpu.device_count())
    else:
        info.update(name="cpu", device_count=1)
    return info


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def tiny_model(tmp: Path):
    from floodfilling.model import load_model
    from floodfilling.testing import mean_flood_model

    path = mean_flood_model(tmp / "tiny.npz")
    return path, load_model(str(path), "cpu")


def run_child(mode: str, spec: dict, deadline: float, tmp: Path, launcher=()) -> dict:
    path = tmp / f"{mode}-spec.json"
    path.write_text(json.dumps(spec))
    cmd = [*launcher, *([] if launcher else [sys.executable]), str(HERE / "gpu_check.py"), "--child", mode, str(path)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{mode} run stopped at the section's time budget") from None
    if p.returncode != 0:
        raise RuntimeError(f"{mode} child exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mirrored(edge: int) -> np.ndarray:
    """The FIB-25 cube mirrored (np.pad reflect) to edge^3, or its central edge^3 crop."""
    raw = fib25_crop(250)
    if edge <= 250:
        return np.ascontiguousarray(fib25_crop(edge))
    return np.pad(raw, [(0, edge - 250)] * 3, mode="reflect")
