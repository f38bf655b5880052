"""``--set kernels=sycl``: ``ffn segment`` (plain, ``--refine``, ``--block --refine`` under
``mpiexec -n 2``) with every kernel call through the SYCL backend on the CPU's SYCL device gives
bit for bit what the OpenMP launcher gives; the bundled model floods reference objects of the
google/ffn run exactly through SYCL.

Skipped without the SYCL runtime outside CI, failed under ``CI`` (see test_sycl_kernels.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from floodfilling import kernels
from floodfilling.config import InferenceConfig
from floodfilling.inference.canvas import Canvas, CanvasState
from floodfilling.inference.predictor import Predictor
from test_distributed_refine import REFINE, SETS, read_all, refined  # noqa: F401
from test_distributed_run import BLOCK, HALO, data, mpiexec  # noqa: F401
from test_inference_parity import reference  # noqa: F401

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def sycl():
    from kernel_helpers import sycl_backend_or_skip

    sb = sycl_backend_or_skip()
    sb.select_device("cpu")
    yield sb
    sb.select_device(None)


@pytest.fixture
def no_openmp(monkeypatch):
    """Inside the test, the compiled extension may not be called: every kernel call must go
    through the SYCL backend (set when the run enters ``kernels.launcher("sycl")``)."""

    def forbidden():
        if kernels.launcher_name() == "sycl":
            raise AssertionError("an OpenMP kernel ran under kernels='sycl'")
        return kernels._kernels

    monkeypatch.setattr(kernels, "_native", forbidden)


def run_cli(*argv):
    from floodfilling.cli import main

    assert main(list(argv)) == 0


def datasets(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in f}
        out.update({f"{k}.attrs": {a: v for a, v in f[k].attrs.items() if a not in ("config", "seconds")}
                    for k in f})
    for k in [k for k in out if k.endswith("_origins")]:
        out[k] = out[k][["id", "z", "y", "x", "steps"]]  # seconds are timings
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        if k.endswith(".attrs"):
            continue
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("refine", [False, True])
def test_segment_through_sycl_equals_openmp(sycl, data, tmp_path, no_openmp, refine):  # noqa: F811
    argv = [f"{data / 'crop.h5'}:raw", "--model", str(data / "tiny.npz"), "--threads", "1", "-q",
            "--set", "min_segment_size=200"]
    if refine:
        argv += ["--refine", "--refine-model", "hand", *SETS[:6]]  # the tiny model's small gap cores (refine.halo is blocks-only)
    run_cli("segment", argv[0], f"{tmp_path / 'omp.h5'}:seg", *argv[1:])
    run_cli("segment", argv[0], f"{tmp_path / 'sycl.h5'}:seg", *argv[1:], "--set", "kernels=sycl")
    want, got = datasets(tmp_path / "omp.h5"), datasets(tmp_path / "sycl.h5")
    assert_same(got, want)
    assert want["seg"].max() >= 2  # several objects: commits, peaks and (refine) union-find ran
    if refine:
        counters = json.loads(str(got["seg.attrs"]["counters"]))
        assert counters["refine_gap_floods"] >= 1
    assert kernels.launcher_name() == "openmp"  # restored after the run


@pytest.mark.mpi
def test_block_refine_under_mpiexec_through_sycl_equals_openmp(sycl, data, refined, tmp_path):  # noqa: F811
    """Two ranks, blocks and their refinement, every kernel through SYCL: the single-process
    OpenMP block run's output (test_distributed_refine), bit for bit."""
    want, _ = read_all(refined[0])
    env = dict(os.environ, OMP_NUM_THREADS="1", FFN_SYCL_DEVICE="cpu")
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "floodfilling.cli", "-v", "segment",
           f"{data / 'crop.h5'}:raw", f"{tmp_path / 'out.h5'}:seg", "--block", BLOCK, "--halo", HALO,
           "--workdir", str(tmp_path / "work"), "--model", str(data / "tiny.npz"), "--threads", "1",
           "--set", "min_segment_size=200", "--refine", "--refine-model", "hand", *SETS, "--set", "kernels=sycl"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("kernels: sycl") >= 2, r.stderr[-3000:]  # each rank logged its launcher
    got, _ = read_all(tmp_path / "out.h5")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_reference_objects_through_sycl(sycl, k, fib25_image, reference, bundled, no_openmp):  # noqa: F811
    """The bundled model floods reference objects of google/ffn's FIB-25 run exactly (steps
    and voxels) with the FOV update, gather and commit on the SYCL device."""
    ref, origins = reference
    net, info = bundled
    with kernels.launcher("sycl"):
        state = CanvasState(segmentation=(ref * ((ref > 0) & (ref < k))).astype(np.int32), max_id=k - 1)
        cv = Canvas(fib25_image, np.zeros((0, 3)), InferenceConfig(), info.fov_zyx, info.deltas_zyx,
                    state=state)
        steps = cv.flood_one(tuple(origins[k]["seed_zyx"]), Predictor(net, info.fov_zyx))
    assert steps == origins[k]["steps"]
    assert np.array_equal(cv.segmentation == k, ref == k)


def test_missing_runtime_fails_before_work_in_one_line(monkeypatch, data, tmp_path, capsys):  # noqa: F811
    """(runs without the runtime too)"""
    from floodfilling import sycl_backend as sb

    monkeypatch.setattr(sb, "_STATE", {"lib": None, "backends": {}, "stats": {}, "selector": None})
    monkeypatch.setattr(sb, "_prefixes", lambda: [tmp_path])
    monkeypatch.delenv("FFN_SYCL_ROOT", raising=False)
    from cli_helpers import fails

    fails(["segment", f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", "--model",
                 str(data / "tiny.npz"), "--set", "kernels=sycl"], capsys, "kernels='sycl'", "floodfilling[sycl]")
    assert not (tmp_path / "o.h5").exists() and list(tmp_path.glob("o.h5*")) == []
    assert kernels.launcher_name() == "openmp"
