"""Locks and leftovers, round 2 (issue 30): a lock is never empty, an empty or damaged one is
taken over when old and explained when young, a full disk while locking leaves nothing, one
training per run directory, and a failed training leaves its directory as at its last checkpoint
(nothing, in a fresh one). Table cases of the same topic: tests/test_bad_inputs.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from floodfilling import locks, volumes
from floodfilling.cli import main
from floodfilling.testing import voronoi_volume
from floodfilling.training.train import TrainOptions, read_metrics, train

TINY = ["--depth", "1", "--features", "4", "--fov", "7", "--deltas", "2", "--min-size", "200", "--threads", "1",
        "--device", "cpu", "-q", "--no-tensorboard"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("locks2_data")
    raw, labels = voronoi_volume()
    with h5py.File(d / "vol.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
    return d / "vol.h5"


def train_args(data, out, *extra):
    return ["train", "--image", f"{data}:raw", "--labels", f"{data}:labels", "--out", str(out), *TINY, *extra]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ffn: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def spec(tmp_path: Path) -> volumes.VolumeSpec:
    return volumes.parse_volume_spec(f"{tmp_path / 'o.h5'}:seg")


def aged(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- 1. a lock is never empty; an empty or damaged one is taken over when old ---------------------

@pytest.mark.parametrize("content", ["", "{half a l"])
def test_old_empty_or_damaged_lock_is_taken_over_with_a_warning(tmp_path, caplog, content):
    lock = tmp_path / "o.h5.lock"
    lock.write_text(content)
    aged(lock, 3600)
    with caplog.at_level(logging.WARNING):
        path = locks.acquire(spec(tmp_path))
    assert path == lock
    held = json.loads(lock.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert any("taking over" in r.getMessage() and str(lock) in r.getMessage() for r in caplog.records)
    locks.release(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_young_empty_lock_is_waited_for_then_explained(tmp_path):
    lock = tmp_path / "o.h5.lock"
    lock.write_text("")
    t0 = time.monotonic()
    with pytest.raises(locks.LockError) as exc:
        locks.acquire(spec(tmp_path))
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert "empty" in msg and f"delete {lock}" in msg and "\n" not in msg
    assert lock.read_text() == ""  # left to its creator
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5.lock"]


def test_young_empty_lock_filled_by_its_creator_is_a_live_holder(tmp_path):
    """An empty lock (written by an older creator) gets its line within the wait: the holder is named."""
    lock = tmp_path / "o.h5.lock"
    lock.write_text("")

    def fill():
        time.sleep(0.3)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "now"}) + "\n")

    t = threading.Thread(target=fill)
    t.start()
    try:
        with pytest.raises(locks.LockError, match="is being written by another run \\(pid 1 on"):
            locks.acquire(spec(tmp_path))
    finally:
        t.join()


@pytest.mark.parametrize("fail", ["write", "fsync", "link"])
def test_full_disk_while_locking_leaves_nothing(tmp_path, monkeypatch, fail):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail, no_space)
    with pytest.raises(locks.LockError.__mro__[1]) as exc:  # errors.VolumeError
        locks.acquire(spec(tmp_path))
    monkeypatch.undo()
    assert "no space left on device" in str(exc.value) and "o.h5.lock" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty lock, no temporary
    # and the next run takes the lock as if nothing happened
    locks.release(locks.acquire(spec(tmp_path)))


def test_no_hard_links_falls_back_to_exclusive_creation(tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    p = tmp_path / "x.lock"
    assert locks.create_exclusive(p, b"one\n") and p.read_bytes() == b"one\n"
    assert not locks.create_exclusive(p, b"two\n") and p.read_bytes() == b"one\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.lock"]
    # a failed write removes the file it created
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        locks.create_exclusive(tmp_path / "y.lock", b"x")
    monkeypatch.setattr(os, "write", real_write)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.lock"]


def test_exclusive_creation_has_one_winner(tmp_path):
    p = tmp_path / "claim"
    wins = []
    barrier = threading.Barrier(8)

    def go(i):
        barrier.wait()
        if locks.create_exclusive(p, f"{i}\n".encode()):
            wins.append(i)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(wins) == 1 and p.read_text() == f"{wins[0]}\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["claim"]


def test_lock_temporaries_of_a_killed_creator_are_removed(tmp_path):
    left = tmp_path / "o.h5.lock.tmp-4242-abcd"
    left.write_text("{}")
    aged(left, 3600)
    young = tmp_path / "o.h5.lock.tmp-4343-abcd"  # a creator at work right now: left alone
    young.write_text("{}")
    locks.release(locks.acquire(spec(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name]


def test_block_claims_are_never_empty(tmp_path, monkeypatch):
    """The block runner's claims (and every refinement stage's) go through the same creation
    (distributed/bookkeeper.py); their temporaries are made in the workdir, not among the claims
    that `ffn status` lists."""
    from floodfilling.distributed import bookkeeper

    claims = tmp_path / "claims"
    claims.mkdir()
    stage = bookkeeper.Stage("blocks", tmp_path, claims, 1, lambda i: tmp_path / "done.h5", lambda i: "seg_0_0_0")

    class worker:  # the block runner's claimer, as it makes it
        @staticmethod
        def Claims(_plan, rank, size):
            return stage.claimer("r", rank, size)

    Plan = object

    monkeypatch.setattr(os, "write", lambda fd, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        worker.Claims(Plan(), 0, 1).next()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["claims"]  # no empty claim, no temporary
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.extend(p.name for p in claims.iterdir())  # what a reader of claims/ sees meanwhile
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    assert worker.Claims(Plan(), 0, 1).next() is not None
    assert seen == [] and (claims / "seg_0_0_0").read_text().split()[0] == "r"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["claims", "seg_0_0_0"]
    assert worker.Claims(Plan(), 0, 1).next() is None  # claimed


# -- 2. one training per run directory ----------------------------------------------------------------

def test_a_second_training_of_a_run_directory_fails_at_once(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock = out / "train.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "earlier"}) + "\n")
        t0 = time.monotonic()
        assert main(train_args(data, out, "--max-steps", "2")) == 2
        assert time.monotonic() - t0 < 30
        err = one_error(capsys)
        assert f"run directory {out}" in err and f"pid {holder.pid}" in err and f"delete {lock}" in err
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # the holder's files untouched
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; released at the end
    assert main(train_args(data, out, "--max-steps", "2")) == 0
    assert not (out / "train.lock").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [2]


def test_two_trainings_at_once_one_fails(data, tmp_path):
    """Two real processes on one run directory: one trains, the other fails at once (before
    the fix both exited 0 and metrics.csv held every step twice)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "floodfilling.cli", *train_args(data, out, "--max-steps", "60", "--log-every", "1",
                                                                  "--checkpoint-every", "20")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = []
    for p in procs:
        errs.append(p.communicate(timeout=300)[1])
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errs
    err = [e for p, e in zip(procs, errs) if p.returncode == 2][0]
    assert err.startswith("ffn: error: run directory") and "is being written by another run" in err, err
    steps = [r["step"] for r in read_metrics(out / "metrics.csv")]
    assert steps == list(range(1, 61)), steps
    assert not (out / "train.lock").exists()


def test_init_from_a_locked_run_directory_is_allowed(data, tmp_path):
    src = tmp_path / "src"
    assert main(train_args(data, src, "--max-steps", "1")) == 0
    (src / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "x"}) + "\n")
    res = train(TrainOptions(image=f"{data}:raw", labels=f"{data}:labels", out=str(tmp_path / "b"), init=str(src),
                             max_steps=1, min_size=200, threads=1, device="cpu", tensorboard=False))
    assert res.steps == 1 and (src / "train.lock").exists()


# -- 3. a failed training leaves its directory as at its last checkpoint -------------------------------

NAN = ["--optimizer", "sgd", "--lr", "1e30", "--clip", "0", "--log-every", "1"]


def test_nan_loss_in_a_fresh_run_leaves_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data, out, "--max-steps", "50", *NAN)) == 2
    err = one_error(capsys)
    assert "loss became" in err
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    # in a directory that existed (with a file of the user's): that file only
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(train_args(data, out, "--max-steps", "50", *NAN, "--keep-every", "1")) == 2
    one_error(capsys)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.txt"]


def test_failure_after_a_checkpoint_keeps_the_rows_up_to_it(data, tmp_path, capsys, monkeypatch):
    from floodfilling.training import train as train_mod

    out = tmp_path / "run"
    common = ["--log-every", "1", "--checkpoint-every", "3", "--keep-every", "1"]
    real_append = train_mod.append_metrics

    def append(path, row):  # Ctrl-C at step 5, after the checkpoint at step 3
        real_append(path, row)
        if row["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "append_metrics", append)
    assert main(train_args(data, out, "--max-steps", "6", *common)) == 130
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]
    assert sorted(p.name for p in (out / "models").iterdir()) == [f"model-000000{i}.npz" for i in (1, 2, 3)]
    assert not (out / "train.lock").exists()
    monkeypatch.setattr(train_mod, "append_metrics", real_append)
    assert main(train_args(data, out, "--max-steps", "6", *common, "--resume")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


def test_resume_does_not_duplicate_rows_of_a_killed_run(data, tmp_path):
    """A run killed after its checkpoint wrote rows past it: the resume drops and rewrites them once."""
    out = tmp_path / "run"
    common = ["--log-every", "1", "--checkpoint-every", "2"]
    assert main(train_args(data, out, "--max-steps", "4", *common)) == 0
    rows = read_metrics(out / "metrics.csv")
    with open(out / "metrics.csv", "a") as f:  # what a kill at step 6 left (checkpoint at 4)
        for s in (5, 6):
            f.write(",".join([str(s)] + ["0"] * (len(rows[0]) - 1)) + "\n")
    assert main(train_args(data, out, "--max-steps", "6", *common, "--resume")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


def test_failed_lock_leaves_no_run_directory(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a" / "b" / "run"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_space)
    assert main(train_args(data, out, "--max-steps", "1")) == 2
    assert "no space left on device" in one_error(capsys)
    assert list(tmp_path.iterdir()) == []


# -- 4/5. export and demo: a lock, and nothing left by an error -------------------------------------------

def test_export_locks_its_layer_and_an_error_leaves_nothing(tmp_path, capsys):
    pytest.importorskip("cloudvolume")
    f = tmp_path / "v.h5"
    seg = np.arange(40 * 40 * 40, dtype=np.int32).reshape(40, 40, 40) % 7
    seg[-1, -1, -1] = -3  # found while writing: the layer is half written at that point
    with h5py.File(f, "w") as h:
        h["seg"] = seg
        h["ok"] = np.abs(seg).astype(np.uint32)
    dest = tmp_path / "layer"
    assert main(["export", f"{f}:seg", str(dest), "--type", "segmentation"]) == 2
    assert "negative labels" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5"]
    # an existing layer survives a failed overwrite
    assert main(["export", f"{f}:ok", str(dest)]) == 0
    capsys.readouterr()
    info = (dest / "info").read_bytes()
    assert main(["export", f"{f}:seg", str(dest), "--type", "segmentation", "--overwrite"]) == 2
    one_error(capsys)
    assert (dest / "info").read_bytes() == info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer", "v.h5"]
    # a live holder of the layer's lock: named, left alone
    lock = tmp_path / "layer.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "x"}) + "\n")
    assert main(["export", f"{f}:ok", str(dest), "--overwrite"]) == 2
    err = one_error(capsys)
    assert "pid 1" in err and f"delete {lock}" in err
    assert (dest / "info").read_bytes() == info


_TAKE_WORKDIR = """
import sys, time
from pathlib import Path
from floodfilling.geometry import BlockError
from floodfilling.distributed.workdir import take_lock
wd, go = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < go:
    pass
try:
    take_lock(wd, sys.argv[3], 1)
except BlockError:
    sys.exit(3)
time.sleep(1.5)  # hold it while the other one tries
"""


def test_two_block_jobs_starting_at_once_on_one_workdir_one_fails(tmp_path):
    """The workdir lock (``run.json``) is created race-free: two jobs that start at the same
    moment cannot both pass (the check-then-write of main let both through)."""
    wd = tmp_path / "wd"
    go = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _TAKE_WORKDIR, str(wd), str(go), f"run{i}"],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for i in range(2)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 3], codes
