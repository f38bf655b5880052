"""Writes into existing files keep the file (issue 30): its mode, owner and group, its hard links,
and a symbolic link is written through to its file (the link stays a link); a new file gets the
process's default mode (umask). A write of a result removes, in the same write, the companions
of an earlier result of that name it does not write (``seg_forward`` of a refined run beside a
plain one, ``seg_overlaps`` of an in-memory run beside a block run), and keeps every other
dataset. A file with several hard links is written in place, journalled: a copy cut short is
completed by the next writer. The one-line errors about outputs are in tests/test_bad_inputs.py
(section "round 2 (issue 30): output files").

The tests run as root in CI, where a file's mode never stops a write: what needs an
unprivileged user is checked with ``os.access`` patched, and said so.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat

import h5py
import numpy as np
import pytest

from floodfilling import disk, results, storage
from floodfilling.cli import main
from floodfilling.errors import VolumeError
from floodfilling.testing import demo_crop, mean_flood_model

SHAPE = (32, 48, 48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("identity")
    raw, labels = demo_crop(SHAPE)
    with h5py.File(d / "crop.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
    mean_flood_model(d / "tiny.npz")
    return d


def quiet(data):
    return ["--model", str(data / "tiny.npz"), "-q", "--threads", "1", "--device", "cpu",
            "--set", "min_segment_size=10"]


def segment(data, out, *extra):
    rc = main(["segment", f"{data}/crop.h5:raw", out, *quiet(data), *extra])
    assert rc == 0, f"segment {out} {extra}: rc={rc}"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def names(path) -> set[str]:
    with h5py.File(path, "r") as f:
        return set(f)


def with_other(path, name="keep_me"):
    """An HDF5 file holding an unrelated dataset (never touched by a write of another name)."""
    with h5py.File(path, "a") as f:
        f[name] = np.arange(10, dtype=np.int16)


def other_ok(path, name="keep_me"):
    with h5py.File(path, "r") as f:
        return np.array_equal(f[name][:], np.arange(10, dtype=np.int16))


# -- mode, owner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("perm", [0o600, 0o444, 0o640])
def test_adding_a_dataset_keeps_the_files_mode(tmp_path, perm):
    p = tmp_path / "a.h5"
    storage.write_arrays(p, {"x": np.zeros((2, 2, 2), np.uint8)})
    os.chmod(p, perm)
    storage.write_arrays(p, {"y": np.ones((2, 2, 2), np.uint8)})
    assert mode(p) == perm  # 600 stayed private (was 644: world-readable), 444 read-only
    assert names(p) == {"x", "y"}


def test_segment_into_a_private_file_keeps_it_private(data, tmp_path):
    out = tmp_path / "o.h5"
    with_other(out)
    os.chmod(out, 0o600)
    segment(data, f"{out}:seg")
    assert mode(out) == 0o600
    assert other_ok(out) and "seg" in names(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_and_group_are_kept(tmp_path):
    p = tmp_path / "a.h5"
    storage.write_arrays(p, {"x": np.zeros((2, 2, 2), np.uint8)})
    os.chown(p, 1234, 4321)
    storage.write_arrays(p, {"y": np.ones((2, 2, 2), np.uint8)})
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_a_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        storage.write_arrays(tmp_path / "n.h5", {"x": np.zeros((2, 2, 2), np.uint8)})
        disk.atomic_write_bytes(tmp_path / "n.json", b"{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "n.h5") == 0o640
    assert mode(tmp_path / "n.json") == 0o640


def test_a_read_only_file_is_refused_for_a_user_who_may_not_write_it(tmp_path, monkeypatch):
    """Root may write any file, so an unprivileged user is stood in for by ``os.access``."""
    p = tmp_path / "ro.h5"
    storage.write_arrays(p, {"x": np.zeros((2, 2, 2), np.uint8)})
    os.chmod(p, 0o444)
    before = p.read_bytes()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, m, **kw: False if os.fspath(path) == str(p) and m & os.W_OK
                        else real_access(path, m, **kw))
    with pytest.raises(VolumeError, match=r"cannot write .*ro\.h5: permission denied \(the file's mode is 444"):
        storage.write_arrays(p, {"y": np.ones((2, 2, 2), np.uint8)})
    from floodfilling import outputs

    with pytest.raises(VolumeError, match="permission denied"):
        outputs.check_output(f"{p}:y", overwrite=True)
    assert p.read_bytes() == before and not list(tmp_path.glob("*.tmp-*"))


def test_a_zarr_array_replaced_keeps_its_directorys_mode(tmp_path):
    pytest.importorskip("zarr")
    store = tmp_path / "v.zarr"
    storage.write_arrays(store, {"seg": np.zeros((4, 4, 4), np.uint32)})
    os.chmod(store / "seg", 0o700)
    storage.write_arrays(store, {"seg": np.ones((4, 4, 4), np.uint32)}, overwrite=True)
    assert mode(store / "seg") == 0o700


# -- symbolic links --------------------------------------------------------------------------------

def test_segment_writes_through_a_symbolic_link(data, tmp_path):
    real = tmp_path / "store" / "real.h5"
    real.parent.mkdir()
    with_other(real)
    os.chmod(real, 0o640)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    segment(data, f"{link}:seg")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert "seg" in names(real) and other_ok(real) and mode(real) == 0o640
    assert not list(tmp_path.rglob("*.tmp-*")) and not list(tmp_path.rglob("*.lock"))


def test_a_relative_link_chain_is_written_through(tmp_path):
    (tmp_path / "d").mkdir()
    storage.write_arrays(tmp_path / "d" / "real.h5", {"x": np.zeros((2, 2, 2), np.uint8)})
    (tmp_path / "d" / "mid.h5").symlink_to("real.h5")
    (tmp_path / "top.h5").symlink_to("d/mid.h5")
    storage.write_arrays(tmp_path / "top.h5", {"y": np.ones((2, 2, 2), np.uint8)})
    assert (tmp_path / "top.h5").is_symlink() and (tmp_path / "d" / "mid.h5").is_symlink()
    assert names(tmp_path / "d" / "real.h5") == {"x", "y"}


def test_a_dangling_link_is_refused_and_nothing_created(tmp_path):
    link = tmp_path / "l.h5"
    link.symlink_to(tmp_path / "nowhere.h5")
    with pytest.raises(VolumeError, match="which does not exist"):
        storage.write_arrays(link, {"x": np.zeros((2, 2, 2), np.uint8)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.h5"]


def test_json_files_written_atomically_keep_link_and_mode(tmp_path):
    """The atomic writes of small files (manifests, reports, resume states, model files) keep
    the file too."""
    real = tmp_path / "report.json"
    real.write_text("{}")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    disk.atomic_write_bytes(link, b'{"a": 1}')
    assert link.is_symlink() and real.read_text() == '{"a": 1}' and mode(real) == 0o600


# -- hard links ------------------------------------------------------------------------------------

def test_segment_keeps_hard_links(data, tmp_path):
    out = tmp_path / "o.h5"
    with_other(out)
    os.link(out, tmp_path / "other_name.h5")
    ino = os.stat(out).st_ino
    segment(data, f"{out}:seg")
    assert os.stat(out).st_ino == ino and os.stat(out).st_nlink == 2
    assert "seg" in names(tmp_path / "other_name.h5") and other_ok(tmp_path / "other_name.h5")
    assert not [p.name for p in tmp_path.iterdir() if ".journal-" in p.name or ".tmp-" in p.name]


def test_prepare_keeps_mode_link_and_hard_link(data, tmp_path):
    real = tmp_path / "coords.h5"
    with_other(real)
    os.chmod(real, 0o600)
    os.link(real, tmp_path / "hard.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    assert main(["prepare", f"{data}/crop.h5:labels", str(link), "--radius", "4", "--min-size", "10"]) == 0
    assert link.is_symlink() and mode(real) == 0o600 and os.stat(real).st_nlink == 2
    assert {"partitions", "coords", "keep_me"} <= names(tmp_path / "hard.h5")


def test_a_cut_short_in_place_copy_is_reported_and_completed_by_the_next_writer(tmp_path, monkeypatch, caplog):
    p = tmp_path / "h.h5"
    storage.write_arrays(p, {"x": np.zeros((8, 8, 8), np.uint8)})
    os.link(p, tmp_path / "h2.h5")
    real_copy = shutil.copyfileobj

    def half_then_full_disk(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", half_then_full_disk)
    with pytest.raises(VolumeError) as exc:
        storage.write_arrays(p, {"y": np.ones((8, 8, 8), np.uint8)})
    msg = str(exc.value)
    journals = list(tmp_path.glob("h.h5.journal-*"))
    assert len(journals) == 1 and str(journals[0]) in msg and "no space left" in msg and "\n" not in msg
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    # the lock's cleanup (remove_temporaries) completes the journal, never deletes it
    with caplog.at_level(logging.WARNING):
        assert disk.remove_temporaries(p) == 0
    assert "completed an interrupted in-place write" in caplog.text
    assert not list(tmp_path.glob("*.journal-*"))
    assert names(tmp_path / "h2.h5") == {"x", "y"} and os.stat(p).st_nlink == 2


def test_a_journal_left_by_a_killed_writer_is_completed_before_the_next_write(tmp_path):
    p = tmp_path / "h.h5"
    storage.write_arrays(p, {"x": np.zeros((8, 8, 8), np.uint8)})
    os.link(p, tmp_path / "h2.h5")
    full = tmp_path / "new.h5"
    storage.write_arrays(full, {"x": np.zeros((8, 8, 8), np.uint8), "y": np.ones((8, 8, 8), np.uint8)})
    dead = 2**22 + 12345  # no such process (beyond the default pid_max)
    os.replace(full, f"{p}.journal-{dead}")  # killed mid-copy: the journal complete, the file not
    with open(p, "r+b") as f:
        f.truncate(300)
    storage.write_arrays(p, {"z": np.full((2, 2, 2), 3, np.uint8)})
    assert names(tmp_path / "h2.h5") == {"x", "y", "z"} and not list(tmp_path.glob("*.journal-*"))


# -- stale companions ------------------------------------------------------------------------------

def test_plain_overwrite_removes_the_forward_of_a_refined_result(data, tmp_path):
    """An earlier ``--refine`` result (seg, seg_origins, seg_overlaps, seg_forward) replaced by a
    plain run: seg_forward (the flood of the old result) is gone; other datasets stay."""
    out = tmp_path / "o.h5"
    with_other(out)
    with_other(out, "seg_forwarded")  # a name that only starts like a companion: kept
    segment(data, f"{out}:seg", "--refine", "--refine-model", "hand")
    assert {"seg", "seg_origins", "seg_overlaps", "seg_forward"} <= names(out)
    segment(data, f"{out}:seg", "--overwrite")
    assert names(out) == {"seg", "seg_origins", "seg_overlaps", "keep_me", "seg_forwarded"}


def test_agglomerate_overwrite_drops_the_forward_too(tmp_path):
    """Any result write (here the library's, as agglomerate and demo use it) drops the companions
    of the result it replaces that it does not write, and keeps what it writes."""
    out = tmp_path / "o.h5"
    z = np.zeros(SHAPE, np.uint32)
    results.write_result(out, "seg", z, results.origins_table({}), {"model": "old"}, overwrite=False,
                         overlaps=np.zeros(0, results.OVERLAP_DTYPE), extra={"seg_forward": z + 7})
    table = np.zeros(0, [("a", "<u8"), ("b", "<u8")])
    results.write_result(out, "seg", z, results.origins_table({}), {"model": "new"}, overwrite=True,
                         extra={"seg_agglomeration": table})
    assert names(out) == {"seg", "seg_origins", "seg_agglomeration"}


def test_stale_companions_need_overwrite(data, tmp_path, capsys):
    out = tmp_path / "o.h5"
    with h5py.File(out, "w") as f:
        f["seg_forward"] = np.zeros(SHAPE, np.uint32)
    before = out.read_bytes()
    rc = main(["segment", f"{data}/crop.h5:raw", f"{out}:seg", *quiet(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "seg_forward exists and belongs to a result seg" in err and "--overwrite" in err
    assert out.read_bytes() == before


def test_block_run_removes_the_overlaps_of_an_in_memory_result(data, tmp_path):
    out = tmp_path / "o.h5"
    with_other(out)
    segment(data, f"{out}:seg")
    assert "seg_overlaps" in names(out)
    os.chmod(out, 0o600)
    segment(data, f"{out}:seg", "--overwrite", "--block", "16,24,24", "--workdir", str(tmp_path / "work"))
    assert names(out) == {"seg", "seg_origins", "keep_me"}  # a plain block run records no overlaps
    assert mode(out) == 0o600 and other_ok(out)


def test_block_run_writes_through_a_link_and_keeps_hard_links(data, tmp_path):
    real = tmp_path / "real.h5"
    with_other(real)
    os.link(real, tmp_path / "hard.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    segment(data, f"{link}:seg", "--block", "16,24,24", "--workdir", str(tmp_path / "work"))
    assert link.is_symlink() and os.stat(real).st_nlink == 2
    assert {"seg", "seg_origins", "keep_me"} <= names(tmp_path / "hard.h5")
    assert not [p.name for p in tmp_path.iterdir() if ".journal-" in p.name or ".tmp-" in p.name]


def test_zarr_results_drop_stale_companions(tmp_path):
    pytest.importorskip("zarr")
    store = tmp_path / "v.zarr"
    z = np.zeros((4, 4, 4), np.uint32)
    results.write_result(store, "seg", z, results.origins_table({}), {"model": "old"}, overwrite=False,
                         overlaps=np.zeros(0, results.OVERLAP_DTYPE), extra={"seg_forward": z})
    storage.write_arrays(store, {"raw": np.zeros((4, 4, 4), np.uint8)})
    results.write_result(store, "seg", z + 1, results.origins_table({}), {"model": "new"}, overwrite=True)
    left = sorted(p.name for p in store.iterdir() if not p.name.startswith(".") and p.name != "zarr.json")
    assert left == ["raw", "seg", "seg_origins"]


def test_consensus_drops_the_companions_of_the_result_it_replaces(data, tmp_path):
    a = tmp_path / "a.h5"
    segment(data, f"{a}:seg")
    out = tmp_path / "c.h5"
    with_other(out)
    z = np.zeros(SHAPE, np.uint32)
    results.write_result(out, "seg", z, results.origins_table({}), {"model": "old"}, overwrite=False,
                         overlaps=np.zeros(0, results.OVERLAP_DTYPE), extra={"seg_forward": z})
    os.chmod(out, 0o600)
    assert main(["consensus", f"{a}:seg", f"{data}/crop.h5:labels", f"{out}:seg", "--overwrite"]) == 0
    assert names(out) == {"seg", "seg_origins", "keep_me"} and mode(out) == 0o600


def test_segment_into_a_file_left_incomplete_by_a_killed_in_place_copy(data, tmp_path, caplog):
    """The kill came between the journal and the end of its copy: ``ffn segment`` into the file
    completes the copy first (before its checks read the file), then writes; both names see it."""
    p = tmp_path / "o.h5"
    with_other(p)
    os.link(p, tmp_path / "o2.h5")
    full = tmp_path / "full.h5"
    shutil.copy(p, full)
    with_other(full, "from_the_journal")
    os.replace(full, f"{p}.journal-{2**22 + 54321}")  # a pid that is gone
    with open(p, "r+b") as f:
        f.truncate(200)
    with caplog.at_level(logging.WARNING):
        segment(data, f"{p}:seg")
    assert "completed an interrupted in-place write" in caplog.text
    assert {"seg", "keep_me", "from_the_journal"} <= names(tmp_path / "o2.h5") and os.stat(p).st_nlink == 2


def test_zarr_block_run_removes_stale_companions_and_keeps_the_arrays_mode(data, tmp_path):
    pytest.importorskip("zarr")
    store = tmp_path / "v.zarr"
    segment(data, f"{store}/seg")  # in memory: seg, seg_origins, seg_overlaps
    storage.write_arrays(store, {"raw": np.zeros((4, 4, 4), np.uint8)})
    os.chmod(store / "seg", 0o700)
    segment(data, f"{store}/seg", "--overwrite", "--block", "16,24,24", "--workdir", str(tmp_path / "work"))
    left = sorted(p.name for p in store.iterdir() if p.name not in ("zarr.json", ".zgroup", ".zattrs"))
    assert left == ["raw", "seg", "seg_origins"]  # no seg_overlaps, no hidden leftovers
    assert mode(store / "seg") == 0o700
