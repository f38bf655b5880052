"""Nothing lost: inputs are never replaced by an output, a full or read-only disk is a one-line
error with nothing left behind, one writer per output, resume refuses a changed image.

Runs the real CLI entry point in-process on a small crop of the bundled FIB-25 volume with the
tiny hand-set model (a few seconds per run)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli_helpers import fails, run
from floodfilling import locks, volumes
from floodfilling.demo import demo_crop_path
from floodfilling.testing import mean_flood_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    with h5py.File(demo_crop_path(), "r") as src, h5py.File(d / "crop.h5", "w") as f:
        f.create_dataset("raw", data=src["raw"][:32, :56, :56], chunks=(16, 28, 28), compression="gzip")
        f["raw"].attrs["resolution_zyx_nm"] = [8, 8, 8]
        f.create_dataset("labels", data=src["labels"][:32, :56, :56])
        f.create_group("volumes").create_dataset("raw", data=src["raw"][:32, :56, :56])
        f.attrs["note"] = "root attribute"
    mean_flood_model(d / "tiny.npz")
    return d


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def datasets(path: Path) -> dict[str, str]:
    """Every dataset of an HDF5 file with a digest of its values (its content, whatever the layout)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = hashlib.sha256(np.ascontiguousarray(obj[()]).tobytes()).hexdigest()
        f.visititems(visit)
    return out


def seg_args(data, image, out, *extra):
    return ["segment", image, out, "--model", data / "tiny.npz", "-q", *extra]


# -- 1. no input is ever destroyed ------------------------------------------------------------------

def test_output_into_the_input_file_keeps_every_dataset(data, tmp_path, capsys):
    f = tmp_path / "in.h5"
    f.write_bytes((data / "crop.h5").read_bytes())
    before = datasets(f)
    assert run(seg_args(data, f"{f}:raw", f"{f}:seg"), capsys)[0] == 0
    after = datasets(f)
    assert {k: after[k] for k in before} == before  # raw, labels, volumes/raw untouched
    assert {"seg", "seg_origins", "seg_overlaps"} <= set(after)
    with h5py.File(f, "r") as h:
        assert h.attrs["note"] == "root attribute" and list(h["raw"].attrs["resolution_zyx_nm"]) == [8, 8, 8]
        assert h["raw"].compression == "gzip" and h["raw"].chunks == (16, 28, 28)
    # the output exists now: refused without --overwrite, replaced alone with it
    fails(seg_args(data, f"{f}:raw", f"{f}:seg"), capsys, f"{f}:seg exists; pass --overwrite")
    assert run(seg_args(data, f"{f}:raw", f"{f}:seg", "--overwrite", "--set", "min_segment_size=50"), capsys)[0] == 0
    again = datasets(f)
    assert {k: again[k] for k in before} == before
    assert again["seg"] != after["seg"]  # the new run's segmentation (smaller objects kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]  # no lock, temp or resume state left


@pytest.mark.parametrize("link", ["symlink", "hardlink", "relative"])
def test_output_never_replaces_an_input_dataset(data, tmp_path, capsys, link):
    f = tmp_path / "in.h5"
    f.write_bytes((data / "crop.h5").read_bytes())
    other = tmp_path / "other.h5"
    if link == "symlink":
        other.symlink_to(f)
    elif link == "hardlink":
        os.link(f, other)
    else:  # the same file under another spelling of its path
        other = tmp_path / "sub" / ".." / "in.h5"
        (tmp_path / "sub").mkdir()
    before = digest(f)
    fails(seg_args(data, f"{f}:raw", f"{other}:raw", "--overwrite"), capsys, "would replace the input", ":raw")
    fails(seg_args(data, f"{f}:volumes/raw", f"{other}:volumes", "--overwrite"), capsys, "would replace the input")
    # a group is never replaced by an output, input or not: it holds other datasets
    fails(seg_args(data, f"{f}:raw", f"{other}:volumes", "--overwrite"), capsys, "is a group (holding volumes/raw)")
    assert digest(f) == before


def test_companion_datasets_never_replace_an_input(data, tmp_path, capsys):
    f = tmp_path / "in.h5"
    with h5py.File(data / "crop.h5", "r") as src, h5py.File(f, "w") as h:
        h["seg_origins"] = src["raw"][...]  # an image that happens to carry a companion's name
    before = digest(f)
    fails(seg_args(data, f"{f}:seg_origins", f"{f}:seg", "--overwrite"), capsys,
          f"output {f}:seg_origins would replace the input {f}:seg_origins")
    assert digest(f) == before


def test_seed_origins_consensus_and_within_inputs_are_protected(data, tmp_path, capsys):
    a = tmp_path / "a.h5"
    assert run(seg_args(data, f"{data / 'crop.h5'}:raw", f"{a}:seg"), capsys)[0] == 0
    before = digest(a)
    fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{a}:seg", "--overwrite", "--set", "seed_policy=invert_origins",
                   "--set", f"seed_origins={a}:seg"), capsys, "would replace the input")
    fails(["consensus", f"{a}:seg", f"{a}:seg", f"{a}:seg", "--overwrite"], capsys, "would replace the input")
    fails(["agglomerate", f"{data / 'crop.h5'}:raw", f"{a}:seg", f"{a}:seg", "--model", data / "tiny.npz",
           "--overwrite"], capsys, "would replace the input")
    b = tmp_path / "b.h5"
    b.write_bytes(a.read_bytes())
    fails(["agglomerate", f"{data / 'crop.h5'}:raw", f"{b}:seg", f"{a}:agg", "--within", f"{a}:seg_origins",
           "--model", data / "tiny.npz"], capsys)  # (not a volume: refused either way)
    fails(["agglomerate", f"{data / 'crop.h5'}:raw", f"{b}:seg", f"{a}:seg", "--within", f"{a}:seg",
           "--model", data / "tiny.npz", "--overwrite"], capsys, "would replace the input")
    assert digest(a) == before
    # consensus into the first input's file: a new dataset beside it
    assert run(["consensus", f"{a}:seg", f"{b}:seg", f"{a}:cons"], capsys)[0] == 0
    after = datasets(a)
    with h5py.File(b, "r") as h:
        assert after["seg"] == hashlib.sha256(h["seg"][...].tobytes()).hexdigest()
    assert {"seg", "seg_origins", "seg_overlaps", "cons", "cons_origins"} <= set(after)


def test_zarr_output_beside_its_input(data, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    store = tmp_path / "v.zarr"
    with h5py.File(data / "crop.h5", "r") as src:
        g = zarr.open_group(str(store), mode="w")
        g.create_array("raw", shape=src["raw"].shape, dtype="u1", chunks=(16, 28, 28))[...] = src["raw"][...]
        raw = src["raw"][...]
    fails(seg_args(data, f"{store}/raw", f"{store}/raw", "--overwrite"), capsys, "would replace the input")
    assert run(seg_args(data, f"{store}/raw", f"{store}/seg"), capsys)[0] == 0
    assert run(seg_args(data, f"{store}/raw", f"{store}/seg", "--overwrite"), capsys)[0] == 0
    g = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(g["raw"][...], raw)
    assert sorted(g.array_keys()) == ["raw", "seg"]


def test_block_output_into_the_input_file(data, tmp_path, capsys):
    f = tmp_path / "in.h5"
    f.write_bytes((data / "crop.h5").read_bytes())
    before = datasets(f)
    fails(seg_args(data, f"{f}:raw", f"{f}:raw", "--overwrite", "--block", "16,28,28"), capsys,
          "would replace the input")
    assert run(seg_args(data, f"{f}:raw", f"{f}:seg", "--block", "16,28,28"), capsys)[0] == 0
    after = datasets(f)
    assert {k: after[k] for k in before} == before and "seg" in after
    assert not list(tmp_path.glob("in.h5.lock")) and not list(tmp_path.glob("in.h5.tmp-*"))


def test_prepare_into_the_labels_file(data, tmp_path, capsys):
    f = tmp_path / "in.h5"
    f.write_bytes((data / "crop.h5").read_bytes())
    before = datasets(f)
    argv = ["prepare", f"{f}:labels", f, "--radius", "4", "--min-size", "10"]
    assert run(argv, capsys)[0] == 0
    after = datasets(f)
    assert {k: after[k] for k in before} == before and {"partitions", "coords"} <= set(after)
    fails(argv, capsys, f"{f}:partitions exists; pass --overwrite")
    assert run(argv + ["--overwrite", "--seed", "1"], capsys)[0] == 0
    again = datasets(f)
    assert {k: again[k] for k in before} == before and again["coords"] != after["coords"]
    g = tmp_path / "lab.h5"
    with h5py.File(g, "w") as h:
        h["coords"] = np.zeros((4, 4, 4), np.uint32)  # labels stored under a name prepare writes
    fails(["prepare", f"{g}:coords", g, "--overwrite"], capsys, f"output {g}:coords would replace the input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "lab.h5"]


def test_non_hdf5_file_at_the_output_is_never_replaced(data, tmp_path, capsys):
    out = tmp_path / "notes.h5"
    out.write_text("my notes, not an HDF5 file\n")
    fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{out}:seg", "--overwrite"), capsys,
          f"{out}: exists and is not an HDF5 file")
    assert out.read_text() == "my notes, not an HDF5 file\n"


# -- 3./4. I/O errors name the file; a full disk is an error, not a crash ---------------------------

@contextlib.contextmanager
def small_fs(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` mounted at ``path`` (root only; the test is skipped, saying why, where
    mounting is not permitted)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small file system here to fill it ({r.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(data, tmp_path, capsys):
    with small_fs(tmp_path / "fs", "96k") as fs:
        fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{fs}/out.h5:seg", "--checkpoint-interval", "0"), capsys,
              f"no space left on device while writing {fs}/out.h5")
        assert list(fs.iterdir()) == []
        fails(["consensus", f"{data / 'crop.h5'}:labels", f"{data / 'crop.h5'}:labels", f"{fs}/c.h5:seg"], capsys,
              f"no space left on device while writing {fs}/c.h5")
        assert list(fs.iterdir()) == []
        fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{fs}/b.h5:seg", "--block", "16,28,28", "--workdir",
                       tmp_path / "work"), capsys, f"no space left on device while writing {fs}/b.h5")
        assert list(fs.iterdir()) == []
        fails(["prepare", f"{data / 'crop.h5'}:labels", f"{fs}/p.h5", "--radius", "4", "--min-size", "10"], capsys,
              f"no space left on device while writing {fs}/p.h5")
        assert list(fs.iterdir()) == []


def test_full_disk_keeps_the_earlier_resume_state(data, tmp_path, capsys):
    # room for one resume state (~0.45 MB) but not for its successor beside it
    with small_fs(tmp_path / "fs", "700k") as fs:
        out = fs / "out.h5"
        fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{out}:seg", "--checkpoint-interval", "1e-9"), capsys,
              f"no space left on device while writing {fs}/out.h5.seg.resume.npz")
        names = sorted(p.name for p in fs.iterdir())
        assert names == ["out.h5.seg.resume.npz"], names  # the earlier state, intact; no temporary, no lock
        with np.load(fs / "out.h5.seg.resume.npz") as z:
            assert int(z["seed_index"]) > 0
        state = (fs / "out.h5.seg.resume.npz").read_bytes()
    # the same run on a disk with room resumes from that state and finishes
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "out.h5.seg.resume.npz").write_bytes(state)
    assert run(seg_args(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'big' / 'out.h5'}:seg"), capsys)[0] == 0
    ref = tmp_path / "ref.h5"
    assert run(seg_args(data, f"{data / 'crop.h5'}:raw", f"{ref}:seg"), capsys)[0] == 0
    assert datasets(tmp_path / "big" / "out.h5")["seg"] == datasets(ref)["seg"]


def test_read_only_and_not_a_directory(data, tmp_path, capsys):
    with small_fs(tmp_path / "ro", "64k", read_only=True) as ro:
        rc, err = run(seg_args(data, f"{data / 'crop.h5'}:raw", f"{ro}/out.h5:seg"), capsys)
        assert rc == 2 and err == f"ffn: error: cannot write {ro}/out.h5:seg: read-only file system", err
        rc, err = run(["consensus", f"{data / 'crop.h5'}:labels", f"{data / 'crop.h5'}:labels",
                       f"{ro}/sub/c.h5:seg"], capsys)
        assert rc == 2 and "read-only file system" in err and "\n" not in err, err
    (tmp_path / "afile").write_text("x")
    fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'afile' / 'out.h5'}:seg"), capsys,
          f"{tmp_path / 'afile'} exists and is not a directory")
    fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{tmp_path / 'afile' / 'x' / 'out.h5'}:seg"), capsys,
          f"{tmp_path / 'afile'} exists and is not a directory")


def test_corrupt_chunk_names_the_file(data, tmp_path, capsys):
    f = tmp_path / "bad.h5"
    f.write_bytes((data / "crop.h5").read_bytes())
    with h5py.File(f, "r") as h:
        info = h["raw"].id.get_chunk_info(3)
    raw = bytearray(f.read_bytes())
    raw[info.byte_offset:info.byte_offset + info.size] = b"\xff" * info.size
    f.write_bytes(bytes(raw))
    fails(seg_args(data, f"{f}:raw", f"{tmp_path / 'o.h5'}:seg"), capsys, f"{f}:raw: cannot read")
    assert not (tmp_path / "o.h5").exists()


# -- 6. runs know about each other ----------------------------------------------------------------

def lock_file(path: Path, pid: int, host: str | None = None) -> None:
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "earlier"}) + "\n")


def test_second_writer_fails_at_once_and_stale_locks_are_taken_over(data, tmp_path, capsys):
    out = tmp_path / "out.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file(tmp_path / "out.h5.lock", holder.pid)
        fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{out}:seg"), capsys,
              f"output {out}:seg is being written by another run (pid {holder.pid} on {socket.gethostname()}",
              f"delete {tmp_path / 'out.h5.lock'}")
        fails(["consensus", f"{data / 'crop.h5'}:labels", f"{data / 'crop.h5'}:labels", f"{out}:c"], capsys,
              "is being written by another run")
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, and so are the temporaries of its killed write
    (tmp_path / "out.h5.tmp-4242").write_bytes(b"half a file")
    (tmp_path / "out.h5.seg.resume.npz.tmp-4242.npz").write_bytes(b"half a state")
    assert run(seg_args(data, f"{data / 'crop.h5'}:raw", f"{out}:seg"), capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    # a lock held on another host cannot be checked: respected, and the message says what to delete
    lock_file(tmp_path / "out.h5.lock", 1, host="some-other-node")
    fails(seg_args(data, f"{data / 'crop.h5'}:raw", f"{out}:seg", "--overwrite"), capsys, "some-other-node",
          f"delete {tmp_path / 'out.h5.lock'}")


def test_lock_paths_and_release():
    assert locks.lock_path_for(volumes.parse_volume_spec("/d/o.h5:seg")) == Path("/d/o.h5.lock")
    assert locks.lock_path_for(volumes.parse_volume_spec("/d/v.zarr/a/seg")) == Path("/d/v.zarr.a_seg.lock")


def test_resume_refuses_a_changed_image(data, tmp_path, capsys, monkeypatch):
    from floodfilling.inference import segment as seg_mod

    img = tmp_path / "img.h5"
    img.write_bytes((data / "crop.h5").read_bytes())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(seg_mod, "write_result", interrupted)  # killed after the last state save
    rc, err = run(seg_args(data, f"{img}:raw", f"{tmp_path / 'o.h5'}:seg", "--checkpoint-interval", "1e-9"), capsys)
    assert rc == 130 and (tmp_path / "o.h5.seg.resume.npz").exists()
    monkeypatch.undo()
    with h5py.File(img, "r+") as h:
        h["raw"][5, 5, 5] = 255 - h["raw"][5, 5, 5]
    fails(seg_args(data, f"{img}:raw", f"{tmp_path / 'o.h5'}:seg"), capsys, "differs in image_digest")
    assert (tmp_path / "o.h5.seg.resume.npz").exists()  # kept for the user to decide
    assert run(seg_args(data, f"{img}:raw", f"{tmp_path / 'o.h5'}:seg", "--overwrite"), capsys)[0] == 0
