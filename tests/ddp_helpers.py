"""Runs a training call on two DDP ranks under ``mpiexec -n 2`` (tests marked ``mpi``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HEADER = """
import sys, torch
from floodfilling.training.options import TrainOptions, TrainVolume
from floodfilling.training.train import train
from floodfilling.training.distributed import detect_rank_world
out = sys.argv[1]
"""
FOOTER = """
rank, world, _ = detect_rank_world()
assert world == 2
torch.save(res.net.state_dict(), f"{out}/params-rank{rank}.pt")
"""


def train_on_two_ranks(tmp_path: Path, body: str) -> tuple[Path, dict]:
    """Runs ``body`` (Python that sets ``res = train(TrainOptions(out=out, ...))``) on two ranks;
    checks that both end with identical parameters; returns (the run directory, rank 0's
    parameters). Skips when mpiexec is missing."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'floodfilling[mpi]')")
    script = tmp_path / "ddp.py"
    script.write_text(HEADER + textwrap.dedent(body) + FOOTER)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = torch.load(out / "params-rank0.pt"), torch.load(out / "params-rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return out, a
