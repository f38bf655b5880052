"""Training checkpoints: ``OUT/checkpoint/state.pt`` (what a resume reads: step, weights,
optimizer, every rank's example stream and RNG states) and ``model.npz`` (the weights, loadable
by ``segment(model=OUT)``), each written atomically; the resume key check."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import disk
from ..model import ConvStack3D, save_model
from .options import TrainError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
MODEL_FILE = "model.npz"
# Options that must be equal for a resume to continue the same computation.
RESUME_KEYS = ["depth", "features", "fov", "deltas", "batch", "seed", "world", "optimizer", "momentum", "augment",
               "image", "labels", "coords", "min_size", "thresholds", "init", "volumes"]


KEPT_DIR = "models"  # OUT/models/model-STEP.npz: the weights every keep_every steps


def kept_model_path(out: Path, step: int) -> Path:
    """Where the weights of ``step`` are kept (``keep_every``): ``out/models/model-0000050.npz``."""
    return Path(out) / KEPT_DIR / f"model-{int(step):07d}.npz"


def save_kept_model(out: Path, step: int, net: ConvStack3D, meta: dict[str, Any]) -> None:
    """The weights of ``step`` as :func:`kept_model_path` (atomically, as model.npz)."""
    path = kept_model_path(out, step)
    with disk.disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, net, meta)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def save_checkpoint(ckdir: Path, net: ConvStack3D, opt: torch.optim.Optimizer, step: int, ranks: list[dict],
                    resume_key: dict[str, Any], meta: dict[str, Any]) -> None:
    """Writes state.pt then model.npz, each atomically (serialised in memory first, so a full
    disk is a one-line error that leaves no temporary file and the previous checkpoint intact)."""
    with disk.disk_errors(ckdir):
        ckdir.mkdir(parents=True, exist_ok=True)
    state = {"format": 1, "step": int(step), "model": net.state_dict(), "optimizer": opt.state_dict(),
             "ranks": ranks, "resume_key": resume_key, "meta": meta, "time": time.time()}
    buf = io.BytesIO()
    torch.save(state, buf)
    disk.atomic_write_bytes(ckdir / STATE_FILE, buf.getvalue())
    save_model(ckdir / MODEL_FILE, net, meta)


def load_checkpoint(ckdir: Path) -> dict[str, Any]:
    p = ckdir / STATE_FILE
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise TrainError(f"{p}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None


def check_resume_key(saved: dict[str, Any], mine: dict[str, Any], path: Path) -> None:
    for k in RESUME_KEYS:
        a, b = saved.get(k), mine.get(k)
        if json.dumps(a) != json.dumps(b):
            what = "another architecture" if k in ("depth", "features", "fov", "deltas") else "another set-up"
            if k == "init":  # the parent model's sha256
                raise TrainError(f"{path}: checkpoint was fine-tuned from the model with sha256 {a or 'none (no init)'}"
                                 f", this run from {b or 'none (no init)'} ({what}); give the same init=MODEL or "
                                 f"another out=DIR")
            raise TrainError(f"{path}: checkpoint was trained with {k} {a}, this run asks for {k}={b} ({what}); "
                             f"use the same options or another out=DIR")
