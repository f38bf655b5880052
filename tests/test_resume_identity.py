"""What a resumed run reuses is of the same image and options (issue 30, round 2).

Blocks, their reconciliation, the refinement files of a block run (``--workdir``) and the
in-memory resume state are tied to the digest of the image's voxels in the run's box: an
image rewritten in place, even with the same statistics, is refused, never mixed. Resume
states are per output dataset. A failing block run gives back its locks. ``ffn status``
tells a dead run from a running one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_helpers import fails, run
from floodfilling.cli import main
from floodfilling.demo import demo_crop_path
from floodfilling.testing import mean_flood_model

SHAPE = (32, 56, 56)
BLOCK = ["--block", "16,28,28"]
# fixed statistics: an image whose voxels are rearranged has the same normalisation
FIXED = ["--normalise", "fixed", "--image-mean", "120", "--image-std", "30"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume_identity")
    with h5py.File(demo_crop_path(), "r") as src, h5py.File(d / "crop.h5", "w") as f:
        f["raw"] = src["raw"][: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.uint8)
        f["other"] = src["raw"][-SHAPE[0]:, -SHAPE[1]:, -SHAPE[2]:].astype(np.uint8)
    mean_flood_model(d / "tiny.npz")
    return d


def image_copy(data: Path, tmp_path: Path, name: str = "img.h5") -> Path:
    p = tmp_path / name
    p.write_bytes((data / "crop.h5").read_bytes())
    return p


def flip_in_place(img: Path) -> None:
    """The same voxels in another order (same histogram, mean and std), written in place."""
    with h5py.File(img, "r+") as f:
        a = f["raw"][:]
        f["raw"][...] = a[:, ::-1, :]


def seg(data: Path, image: str, out: str, *extra) -> list[str]:
    return ["segment", image, out, "--model", str(data / "tiny.npz"), "-q", "--device", "cpu", "--threads", "1",
            *FIXED, *map(str, extra)]


def killed(*a, **k):
    """Stands in for a step of the run: the process is "killed" there (Ctrl-C, exit 130)."""
    raise KeyboardInterrupt


def killed_after_last_save(data, image: str, out: str, capsys, monkeypatch) -> None:
    """``ffn segment image out`` killed after its last resume-state save (before the write)."""
    from floodfilling.inference import segment as seg_mod

    with monkeypatch.context() as m:
        m.setattr(seg_mod, "write_result", killed)
        assert run(seg(data, image, out, "--checkpoint-interval", "1e-9"), capsys)[0] == 130


def read(path: Path, ds: str = "seg") -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[ds][:]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.name.endswith(".lock") or ".tmp" in p.name
                  or p.name == "run.json")


# -- 1. a changed image is never reused ----------------------------------------------------------

def test_block_workdir_of_a_changed_image_is_refused(data, tmp_path, capsys):
    img = image_copy(data, tmp_path)
    wd = tmp_path / "wd"
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'a.h5'}:seg", *BLOCK, "--workdir", wd), capsys)[0] == 0
    flip_in_place(img)
    # the same command into a new output: the blocks of the old image are not reused
    fails(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", wd), capsys,
          str(wd), "image_digest", "the image's voxels changed", "--overwrite")
    assert not (tmp_path / "b.h5").exists() and not leftovers(tmp_path)
    # --overwrite discards them and segments the new image: as a fresh run of it
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", wd, "--overwrite"),
               capsys)[0] == 0
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'c.h5'}:seg", *BLOCK, "--workdir", tmp_path / "wd2"),
               capsys)[0] == 0
    assert np.array_equal(read(tmp_path / "b.h5"), read(tmp_path / "c.h5"))
    assert not np.array_equal(read(tmp_path / "a.h5"), read(tmp_path / "b.h5"))


def test_complete_block_output_of_a_changed_image_is_not_complete(data, tmp_path, capsys):
    """A rerun after the output was written is "already complete" only for the same image."""
    img = image_copy(data, tmp_path)
    out = f"{tmp_path / 'a.h5'}:seg"
    assert run(seg(data, f"{img}:raw", out, *BLOCK), capsys)[0] == 0
    assert run(seg(data, f"{img}:raw", out, *BLOCK), capsys)[0] == 0  # nothing to do
    flip_in_place(img)
    fails(seg(data, f"{img}:raw", out, *BLOCK), capsys, "a.h5")


def test_in_memory_resume_of_a_changed_image_is_refused(data, tmp_path, capsys, monkeypatch):
    from floodfilling.inference import segment as seg_mod

    img = image_copy(data, tmp_path)

    monkeypatch.setattr(seg_mod, "write_result", killed)  # killed after the last state save
    out = f"{tmp_path / 'o.h5'}:seg"
    assert run(seg(data, f"{img}:raw", out, "--checkpoint-interval", "1e-9"), capsys)[0] == 130
    state = tmp_path / "o.h5.seg.resume.npz"
    assert state.exists()
    monkeypatch.undo()
    flip_in_place(img)
    fails(seg(data, f"{img}:raw", out), capsys, str(state), "image_digest", "the image changed")
    assert state.exists()


def test_refine_stage_of_a_changed_image_is_refused(data, tmp_path, capsys, monkeypatch):
    """Killed while refining (block run and in-memory run): the gap cores and floods on disk, or
    the finished flood's state, are not reused for a changed image."""
    from floodfilling.inference import refine as rf
    from floodfilling.inference import segment as seg_mod

    img = image_copy(data, tmp_path)
    wd = tmp_path / "wd"

    with monkeypatch.context() as m:
        m.setattr(rf, "fill_tile", killed)  # after the gap cores and floods were saved
        assert run(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand"),
                   capsys)[0] == 130
    rdirs = list(wd.glob("refine-*"))
    assert len(rdirs) == 1 and (rdirs[0] / "centres.npy").exists()
    assert not leftovers(tmp_path)  # the interrupted run gave back its locks
    with monkeypatch.context() as m:
        m.setattr(seg_mod, "refined_result", killed)  # the flood's final state is saved before refining
        assert run(seg(data, f"{img}:raw", f"{tmp_path / 'm.h5'}:seg", "--refine", "--refine-model", "hand"), capsys)[0] == 130
    assert (tmp_path / "m.h5.seg.resume.npz").exists()

    flip_in_place(img)
    fails(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand"), capsys,
          "image_digest")
    fails(seg(data, f"{img}:raw", f"{tmp_path / 'm.h5'}:seg", "--refine", "--refine-model", "hand"), capsys, "image_digest")
    # with --overwrite: the new image's result, as a fresh run
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand",
                   "--overwrite"), capsys)[0] == 0
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'f.h5'}:seg", *BLOCK, "--workdir", tmp_path / "wf", "--refine", "--refine-model", "hand"),
               capsys)[0] == 0
    for ds in ("seg", "seg_forward"):
        assert np.array_equal(read(tmp_path / "b.h5", ds), read(tmp_path / "f.h5", ds)), ds


def test_block_manifest_records_flood_options_and_digest(data, tmp_path, capsys):
    from floodfilling.boxes import BBox
    from floodfilling.config import OPTION_STAGES
    from floodfilling.source import image_source

    img = image_copy(data, tmp_path)
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'a.h5'}:seg", *BLOCK, "--workdir", tmp_path / "wd",
                   "--bbox", "0,0,0:32,56,40"), capsys)[0] == 0
    man = json.loads((tmp_path / "wd" / "manifest.json").read_text())
    assert set(man["config"]) == {k for k, s in OPTION_STAGES.items() if s == "flood"}
    assert man["image_digest"] == image_source(f"{img}:raw", BBox((0, 0, 0), (32, 56, 40))).digest()
    # the digest is of the box only: a change outside it is not a change of this run
    with h5py.File(img, "r+") as f:
        f["raw"][0, 0, 50] = 255 - f["raw"][0, 0, 50]
    assert run(seg(data, f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *BLOCK, "--workdir", tmp_path / "wd",
                   "--bbox", "0,0,0:32,56,40"), capsys)[0] == 0


def test_image_digest_reads_slabs(data, tmp_path, monkeypatch):
    """The block digest reads the box in slabs (bounded memory), the same for any slab share."""
    from floodfilling import source as source_mod
    from floodfilling.source import image_source

    spec = f"{data / 'crop.h5'}:raw"
    whole = image_source(spec).digest()
    monkeypatch.setattr(source_mod, "DIGEST_SLAB_BYTES", 56 * 56 * 5)  # 5 planes a slab
    assert len(source_mod.digest_slabs(SHAPE, 1)) == 7
    parts = [image_source(spec).slab_digests(r, 3) for r in range(3)]
    assert source_mod.combine_digests(parts) == image_source(spec).digest()
    assert sorted(k for p in parts for k in p) == list(range(7))
    assert whole != image_source(f"{data / 'crop.h5'}:other").digest()


# -- 2. resume state per output dataset ---------------------------------------------------------

def test_resume_state_is_per_dataset(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.h5"
    killed_after_last_save(data, f"{data / 'crop.h5'}:raw", f"{out}:segA", capsys, monkeypatch)
    assert (tmp_path / "out.h5.segA.resume.npz").exists()
    # another image into another dataset of the same file: its own state, no "image changed"
    assert run(seg(data, f"{data / 'crop.h5'}:other", f"{out}:segB"), capsys)[0] == 0
    assert (tmp_path / "out.h5.segA.resume.npz").exists()
    # segA resumes from its state, and equals an uninterrupted run
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{out}:segA"), capsys)[0] == 0
    assert not (tmp_path / "out.h5.segA.resume.npz").exists()
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'ref.h5'}:seg"), capsys)[0] == 0
    assert np.array_equal(read(out, "segA"), read(tmp_path / "ref.h5"))
    with h5py.File(out, "r") as f:
        assert {"segA", "segB"} <= set(f)


def test_old_named_resume_state_is_adopted_only_by_its_own_run(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.h5"
    killed_after_last_save(data, f"{data / 'crop.h5'}:raw", f"{out}:segA", capsys, monkeypatch)
    legacy = tmp_path / "out.h5.resume.npz"  # as an earlier version named it
    os.replace(tmp_path / "out.h5.segA.resume.npz", legacy)
    # a run of another image (another dataset) leaves it alone
    assert run(seg(data, f"{data / 'crop.h5'}:other", f"{out}:segB"), capsys)[0] == 0
    assert legacy.exists()
    # its own run resumes from it
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{out}:segA"), capsys)[0] == 0
    assert not legacy.exists() and not (tmp_path / "out.h5.segA.resume.npz").exists()
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'ref.h5'}:seg"), capsys)[0] == 0
    assert np.array_equal(read(out, "segA"), read(tmp_path / "ref.h5"))


# -- 3. a failing block run gives back its locks -------------------------------------------------

@pytest.mark.parametrize("where", ["reconcile", "refine", "write"])
def test_block_error_releases_the_locks(data, tmp_path, capsys, monkeypatch, where):
    from floodfilling.distributed import labels, output
    from floodfilling.inference import refine as rf

    def boom(*a, **k):
        raise ValueError("boom: a late error")

    target = {"reconcile": (labels, "reconcile"), "refine": (rf, "fill_tile"), "write": (output, "commit")}[where]
    monkeypatch.setattr(*target, boom)
    wd = tmp_path / "wd"
    fails(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand"),
          capsys, "boom")
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert not (tmp_path / "o.h5").exists()
    assert not list((wd / "claims").iterdir())
    assert len(list((wd / "blocks").glob("*.h5"))) == 8  # the finished blocks stay for the rerun
    monkeypatch.undo()
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand"),
               capsys)[0] == 0


def test_refine_summary_counts_the_refined_objects(data, tmp_path, capsys):
    out = tmp_path / "o.h5"
    argv = [a for a in seg(data, f"{data / 'crop.h5'}:raw", f"{out}:seg", "--refine", "--refine-model", "hand") if a != "-q"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    refined, flood = read(out), read(out, "seg_forward")
    n_ref, n_flood = len(np.unique(refined[refined > 0])), len(np.unique(flood[flood > 0]))
    assert n_ref != n_flood  # (the refinement adds or rejoins objects on this crop)
    assert f": {n_ref} objects (the flood: {n_flood})" in line, line


# -- 4. ffn status of a dead run ----------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_status_of_a_run_killed_while_refining(data, tmp_path, capsys, monkeypatch):
    from floodfilling.distributed.status import block_status, format_status
    from floodfilling.inference import refine as rf

    wd = tmp_path / "wd"

    with monkeypatch.context() as m:
        m.setattr(rf, "fill_tile", killed)
        assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", *BLOCK, "--workdir", wd,
                       "--refine", "--refine-model", "hand"), capsys)[0] == 130
    # as a SIGKILL leaves it: the workdir lock of a process that is gone
    pid = dead_pid()
    (wd / "run.json").write_text(json.dumps({"run_id": "x", "host": socket.gethostname(), "pid": pid, "ranks": 1,
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    st = block_status(wd)
    assert st["state"] == "stopped" and st["job_dead"] and st["eta_s"] is None
    text = format_status(st)
    assert "refining:" not in text and "refinement stopped at" in text
    assert f"pid {pid}" in text and "killed or failed" in text and "rerun the same" in text
    assert main(["status", str(wd)]) == 0
    assert "stopped" in capsys.readouterr().out


def test_status_of_a_dead_block_run_has_no_time_left(data, tmp_path, capsys, monkeypatch):
    from floodfilling.distributed import worker
    from floodfilling.distributed.status import block_status, format_status

    wd = tmp_path / "wd"
    real = worker.blockstore.write_block
    n = {"written": 0}

    def write_then_die(*a, **k):
        if n["written"] == 3:
            raise KeyboardInterrupt
        n["written"] += 1
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(worker.blockstore, "write_block", write_then_die)
        assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", *BLOCK, "--workdir", wd),
                   capsys)[0] == 130
    pid = dead_pid()
    (wd / "run.json").write_text(json.dumps({"run_id": "x", "host": socket.gethostname(), "pid": pid, "ranks": 1,
                                             "started": "then"}))
    st = block_status(wd)
    assert st["blocks_done"] == 3 and st["blocks_left"] == 5
    assert st["state"] == "stopped" and st["eta_s"] is None
    text = format_status(st)
    assert "min left" not in text and "stopped" in text and "rerun the same" in text
    # no job at all (the failed run gave back its lock) and nothing running: stopped too
    (wd / "run.json").unlink()
    st = block_status(wd)
    assert st["state"] == "stopped" and st["eta_s"] is None and "no run holds" in format_status(st)
    # a live job: running, with an estimate
    (wd / "run.json").write_text(json.dumps({"run_id": "x", "host": socket.gethostname(), "pid": os.getpid(),
                                             "ranks": 1, "started": "now"}))
    st = block_status(wd)
    assert st["state"] == "running" and st["eta_s"] is not None and "min left" in format_status(st)


def test_mpi_error_on_every_rank_releases_the_locks(data, tmp_path, capsys):
    """Under ``mpiexec -n 2`` (every rank aborts on the damaged gap centres file): rank 0 gives
    back the output's lock and the workdir lock before aborting."""
    import shutil

    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found")
    wd = tmp_path / "wd"
    assert run(seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'a.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand"),
               capsys)[0] == 0
    with h5py.File(tmp_path / "a.h5", "r") as f:
        rdir = wd / f"refine-{str(f['seg'].attrs['block_manifest'])[:16]}"
    for sub in ("floods", "tiles"):
        (rdir / sub).mkdir(parents=True)
    (rdir / "centres.npy").write_bytes(b"these are not gap centres\n")
    cmd = [exe, "-n", "2", sys.executable, "-m", "floodfilling.cli",
           *seg(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", *BLOCK, "--workdir", wd, "--refine", "--refine-model", "hand")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "centres.npy" in r.stderr and "delete it" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o.h5").exists() and not leftovers(tmp_path), leftovers(tmp_path)
