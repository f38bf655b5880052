"""Tests of floodfilling.volumes, boxes, disk and storage: specs, bounding boxes, lazy reading, atomic writes."""

from __future__ import annotations

import os
import importlib.util
import sys
import types

import h5py
import numpy as np
import pytest

from floodfilling.boxes import BBox
from floodfilling.disk import atomic_path, atomic_write_bytes
from floodfilling.errors import VolumeError
from floodfilling.storage import write_hdf5_atomic, write_volume
from floodfilling.volumes import Volume, VolumeSpec, open_volume, parse_volume_spec


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if ".tmp-" in p)


# --------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize(
    "spec,default,expected",
    [
        ("a.h5:raw", None, ("a.h5", "raw")),
        ("dir/b.hdf5:volumes/labels", None, ("dir/b.hdf5", "volumes/labels")),
        ("c.H5:/raw", None, ("c.H5", "raw")),
        ("c.hdf:x", None, ("c.hdf", "x")),
        ("a.h5", "raw", ("a.h5", "raw")),
        ("a.h5:labels", "raw", ("a.h5", "labels")),
        ("/x/my.h5.d/a.h5:raw", None, ("/x/my.h5.d/a.h5", "raw")),
        ("C:/data/a.h5:raw", None, ("C:/data/a.h5", "raw")),
        ("v.zarr", None, ("v.zarr", None)),
        ("v.zarr/", None, ("v.zarr", None)),
        ("v.zarr", "raw", ("v.zarr", "raw")),
        ("d/v.zarr/raw", None, ("d/v.zarr", "raw")),
        ("d/v.zarr/g/labels/", None, ("d/v.zarr", "g/labels")),
        ("a.h5.zarr/raw", None, ("a.h5.zarr", "raw")),
    ],
)
def test_parse_volume_spec(spec, default, expected):
    parsed = parse_volume_spec(spec, default_dataset=default)
    assert tuple(parsed) == expected
    path, dataset = parsed  # unpacks as a pair
    assert (path, dataset) == expected
    assert parsed.kind == ("zarr" if ".zarr" in spec else "hdf5")


def test_parse_volume_spec_pathlike_and_str(tmp_path):
    p = parse_volume_spec(tmp_path / "a.h5", default_dataset="raw")
    assert p == VolumeSpec(str(tmp_path / "a.h5"), "raw")
    assert str(p) == f"{tmp_path / 'a.h5'}:raw"
    assert str(parse_volume_spec("v.zarr/raw")) == "v.zarr/raw"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("a.h5", r"names no dataset; use 'a.h5:DATASET'"),
        ("a.h5:", "empty dataset"),
        ("a.h5:/", "empty dataset"),
        ("a.tif", "unrecognised volume spec 'a.tif'"),
        ("a.h5x:raw", "unrecognised"),
        ("", "empty volume spec"),
    ],
)
def test_parse_volume_spec_errors(spec, match):
    with pytest.raises(VolumeError, match=match):
        parse_volume_spec(spec)
    assert issubclass(VolumeError, ValueError)


# --------------------------------------------------------------------------------------------
# BBox


def test_bbox_basics():
    b = BBox.parse(" 1, 2,3 : 4,6, 9")
    assert b.start == (1, 2, 3) and b.stop == (4, 6, 9)
    assert b.shape == (3, 4, 6) and b.size == 72
    assert b.slices == (slice(1, 4), slice(2, 6), slice(3, 9))
    assert str(b) == "1,2,3:4,6,9" and BBox.parse(str(b)) == b
    assert BBox.from_shape((5, 6, 7)) == BBox((0, 0, 0), (5, 6, 7))
    assert BBox([0, 0, 0], np.array([1, 2, 3])).stop == (1, 2, 3)
    a = np.arange(5 * 6 * 10).reshape(5, 6, 10)
    assert a[b.slices].shape == b.shape
    assert b.validate((4, 6, 9)) is b
    assert "half-open" in BBox.__doc__ or "[start, stop)" in BBox.__doc__


@pytest.mark.parametrize("text", ["1,2,3", "1,2:3,4", "a,b,c:1,2,3", "1,2,3:4,5,6:7", "1,2,3,4:5,6,7,8"])
def test_bbox_parse_errors(text):
    with pytest.raises(ValueError, match="z0,y0,x0:z1,y1,x1"):
        BBox.parse(text)


def test_bbox_construct_errors():
    with pytest.raises(ValueError, match="3 integers"):
        BBox((0, 0), (1, 1))
    with pytest.raises(ValueError, match="3 integers"):
        BBox((0, 0, 0.5), (1, 1, 1))


def test_bbox_validate_errors():
    with pytest.raises(ValueError, match=r"bbox 0,0,0:5,5,11 is outside the volume of shape \(5, 5, 10\)"):
        BBox((0, 0, 0), (5, 5, 11)).validate((5, 5, 10))
    with pytest.raises(ValueError, match=r"bbox -1,0,0:2,2,2 is outside.*\(5, 5, 10\)"):
        BBox((-1, 0, 0), (2, 2, 2)).validate((5, 5, 10))
    with pytest.raises(ValueError, match=r"bbox 2,0,0:2,3,3 is empty.*\(5, 5, 10\)"):
        BBox((2, 0, 0), (2, 3, 3)).validate((5, 5, 10))
    with pytest.raises(ValueError, match="empty"):
        BBox((3, 0, 0), (2, 3, 3)).validate((5, 5, 10))


def test_bbox_clip():
    assert BBox((-2, 1, 3), (4, 9, 20)).clip((3, 5, 10)) == BBox((0, 1, 3), (3, 5, 10))
    with pytest.raises(ValueError, match=r"bbox 5,0,0:7,2,2 does not overlap.*\(3, 5, 10\)"):
        BBox((5, 0, 0), (7, 2, 2)).clip((3, 5, 10))


# --------------------------------------------------------------------------------------------
# reading


@pytest.fixture
def h5file(tmp_path):
    path = tmp_path / "vol.h5"
    raw = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    labels = (np.arange(4 * 5 * 6, dtype=np.uint32) // 7).reshape(4, 5, 6)
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=raw)
        f["raw"].attrs["resolution_zyx_nm"] = [10, 8, 8]
        f.create_dataset("volumes/labels", data=labels)
        f["volumes/labels"].attrs["resolution"] = np.array([40.0, 4.0, 4.0])
        f["volumes/labels"].attrs["note"] = "hello"
        f.create_dataset("flat", data=np.zeros((5, 5)))
        f.create_dataset("strings", data=np.array([b"a", b"b", b"c"] * 9).reshape(3, 3, 3))
        f.create_dataset("cplx", data=np.zeros((2, 2, 2), np.complex64))
        f.create_dataset("flags", data=np.zeros((2, 2, 2), bool))
        f.create_dataset("plain", data=np.zeros((2, 2, 2), np.float32))
    return path, raw, labels


def test_open_and_read(h5file):
    path, raw, labels = h5file
    with open_volume(f"{path}:raw") as v:
        assert isinstance(v, Volume)
        assert v.shape == (4, 5, 6) and v.dtype == np.uint8 and v.ndim == 3
        assert v.path == str(path) and v.dataset == "raw"
        assert v.attrs == {"resolution_zyx_nm": [10, 8, 8]}
        assert v.resolution_zyx_nm == (10.0, 8.0, 8.0)
        np.testing.assert_array_equal(v.read(), raw)
        np.testing.assert_array_equal(v.read(BBox((1, 2, 3), (3, 5, 6))), raw[1:3, 2:5, 3:6])
        np.testing.assert_array_equal(v.read("0,0,0:1,1,2"), raw[:1, :1, :2])
        np.testing.assert_array_equal(v[1, :, 2], raw[1, :, 2])
        assert "vol.h5:raw" in repr(v)
    assert v.closed
    with pytest.raises(VolumeError, match="closed"):
        v.read()
    v.close()  # idempotent


def test_open_resolution_variants(h5file):
    path, _, labels = h5file
    v = open_volume(f"{path}:volumes/labels")
    try:
        assert v.resolution_zyx_nm == (40.0, 4.0, 4.0)  # CREMI-style, taken as zyx
        assert v.attrs["note"] == "hello"
        np.testing.assert_array_equal(v.read(), labels)
    finally:
        v.close()
    with open_volume(path, default_dataset="plain") as v:
        assert v.resolution_zyx_nm is None and v.dtype == np.float32


def test_read_bbox_out_of_range_names_volume_and_shape(h5file):
    path, _, _ = h5file
    with open_volume(f"{path}:raw") as v:
        with pytest.raises(VolumeError, match=r"vol\.h5:raw: bbox 0,0,0:5,5,6 is outside.*\(4, 5, 6\)"):
            v.read(BBox((0, 0, 0), (5, 5, 6)))
        with pytest.raises(ValueError, match="z0,y0,x0"):
            v.read("0,0:1,1")


def test_open_errors(h5file, tmp_path):
    path, _, _ = h5file
    with pytest.raises(VolumeError, match=r"nope\.h5: no such file"):
        open_volume(f"{tmp_path / 'nope.h5'}:raw")
    with pytest.raises(VolumeError) as e:
        open_volume(f"{path}:missing")
    msg = str(e.value)
    assert "vol.h5" in msg and "'missing'" in msg and "raw" in msg and "volumes/labels" in msg
    assert "\n" not in msg
    with pytest.raises(VolumeError, match=r"'volumes' is a group, not a dataset.*volumes/labels"):
        open_volume(f"{path}:volumes")
    with pytest.raises(VolumeError, match=r"vol\.h5:flat: expected a 3-D \(z, y, x\) volume, got shape \(5, 5\)"):
        open_volume(f"{path}:flat")
    for name in ("strings", "cplx", "flags"):
        with pytest.raises(VolumeError, match=rf"vol\.h5:{name}: unsupported dtype"):
            open_volume(f"{path}:{name}")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5 at all")
    with pytest.raises(VolumeError, match=r"text\.h5: not an HDF5 file"):
        open_volume(f"{text}:raw")
    d = tmp_path / "dir.h5"
    d.mkdir()
    with pytest.raises(VolumeError, match="not an HDF5 file"):
        open_volume(f"{d}:raw")


def test_zarr_missing_dependency(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` raise ImportError
    with pytest.raises(VolumeError, match=r"install floodfilling\[zarr\]"):
        open_volume(f"{tmp_path / 'v.zarr'}/raw")


class _FakeArray:
    def __init__(self, data, attrs):
        self._data, self.attrs = data, attrs
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, index):
        return self._data[index]


class _FakeGroup:
    def __init__(self, arrays):
        self._arrays = arrays
        self.attrs = {}

    def __getitem__(self, key):
        return self._arrays[key]

    def array_keys(self):
        return iter(self._arrays)


def test_zarr_with_fake_module(monkeypatch, tmp_path):
    store = tmp_path / "v.zarr"
    store.mkdir()
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    group = _FakeGroup({
        "raw": _FakeArray(data, {"resolution_zyx_nm": [30, 4, 4]}),
        "img2d": _FakeArray(np.zeros((3, 3)), {}),
    })
    opened = []

    def fake_open(path, mode="r"):
        opened.append((path, mode))
        return group

    monkeypatch.setitem(sys.modules, "zarr", types.SimpleNamespace(open=fake_open))
    with open_volume(f"{store}/raw") as v:
        assert v.shape == (2, 3, 4) and v.resolution_zyx_nm == (30.0, 4.0, 4.0)
        np.testing.assert_array_equal(v.read("0,1,1:2,3,4"), data[:, 1:, 1:])
    assert opened == [(str(store), "r")]
    with pytest.raises(VolumeError, match=r"no array 'labels' \(available arrays: img2d, raw\)"):
        open_volume(f"{store}/labels")
    with pytest.raises(VolumeError, match="is a zarr group"):
        open_volume(str(store))
    with pytest.raises(VolumeError, match="expected a 3-D"):
        open_volume(f"{store}/img2d")
    with pytest.raises(VolumeError, match="no such zarr store"):
        open_volume(f"{tmp_path / 'other.zarr'}/raw")


# --------------------------------------------------------------------------------------------
# writing


def test_write_hdf5_atomic_round_trip(tmp_path):
    path = tmp_path / "out.h5"
    seg = np.arange(60, dtype=np.uint64).reshape(3, 4, 5)
    prob = np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    attrs = {
        "seg": {
            "resolution_zyx_nm": [10, 10, 10],
            "config": {"fov_zyx": [33, 33, 33], "name": "fib25", "nested": {"a": np.int64(3)}},
            "origins": [[1, 2, 3], [4, 5, 6]],
            "labels": ["a", "b"],
            "note": "text",
            "threshold": 0.6,
            "count": np.int64(7),
            "empty": [],
        },
    }
    out = write_hdf5_atomic(path, {"seg": seg, "aux/prob": prob}, attrs, file_attrs={"tool": "ffn", "meta": {"v": 1}})
    assert out == str(path) and _leftovers(tmp_path) == []
    with h5py.File(path, "r") as f:
        assert f["seg"].compression == "gzip"
        assert isinstance(f["seg"].attrs["config"], str)  # dicts are JSON strings on disk
        assert f["seg"].attrs["resolution_zyx_nm"].tolist() == [10, 10, 10]  # numeric list: array
        assert f.attrs["tool"] == "ffn"
    with open_volume(f"{path}:seg") as v:
        np.testing.assert_array_equal(v.read(), seg)
        assert v.dtype == np.uint64
        assert v.attrs == {
            "resolution_zyx_nm": [10, 10, 10],
            "config": {"fov_zyx": [33, 33, 33], "name": "fib25", "nested": {"a": 3}},
            "origins": [[1, 2, 3], [4, 5, 6]],
            "labels": ["a", "b"],
            "note": "text",
            "threshold": 0.6,
            "count": 7,
            "empty": [],
        }
        assert v.resolution_zyx_nm == (10.0, 10.0, 10.0)
    with open_volume(f"{path}:aux/prob") as v:
        np.testing.assert_array_equal(v.read(), prob)


def test_write_hdf5_no_compression(tmp_path):
    path = tmp_path / "plain.h5"
    write_hdf5_atomic(path, {"a": np.ones((2, 2, 2), np.uint8)}, compression=None)
    with h5py.File(path, "r") as f:
        assert f["a"].compression is None


def test_write_hdf5_exists_and_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    write_hdf5_atomic(path, {"a": np.zeros((2, 2, 2), np.uint8)})
    with pytest.raises(VolumeError, match=r"out\.h5:a exists; pass overwrite=True"):
        write_hdf5_atomic(path, {"a": np.ones((2, 2, 2), np.uint8)})
    write_hdf5_atomic(path, {"b": np.ones((2, 2, 2), np.uint8)}, overwrite=True)
    with h5py.File(path, "r") as f:
        assert list(f) == ["a", "b"]  # the file's other dataset is kept, not replaced with the file
        assert not f["a"][...].any()
    write_hdf5_atomic(path, {"a": np.full((2, 2, 2), 7, np.uint8)}, overwrite=True)
    with h5py.File(path, "r") as f:
        assert list(f) == ["a", "b"] and (f["a"][...] == 7).all() and (f["b"][...] == 1).all()
    assert _leftovers(tmp_path) == []


def test_write_hdf5_input_errors_write_nothing(tmp_path):
    path = tmp_path / "out.h5"
    a = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(VolumeError, match="unknown datasets: b"):
        write_hdf5_atomic(path, {"a": a}, {"b": {"x": 1}})
    with pytest.raises(VolumeError, match="attribute 'a:x' has unsupported type object"):
        write_hdf5_atomic(path, {"a": a}, {"a": {"x": object()}})
    with pytest.raises(VolumeError, match="attribute 'a:x' is not JSON serialisable"):
        write_hdf5_atomic(path, {"a": a}, {"a": {"x": {"k": object()}}})
    with pytest.raises(VolumeError, match="no datasets"):
        write_hdf5_atomic(path, {})
    with pytest.raises(VolumeError, match="unsupported dtype"):
        write_hdf5_atomic(path, {"a": np.array(["x"])})
    with pytest.raises(VolumeError, match="does not exist"):
        write_hdf5_atomic(tmp_path / "missing_dir" / "x.h5", {"a": a})
    assert os.listdir(tmp_path) == []


def test_write_hdf5_failure_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.h5"
    old = np.full((2, 2, 2), 7, np.uint8)
    write_hdf5_atomic(path, {"a": old})
    before = path.read_bytes()
    # "a" becomes a dataset, then "a/b" needs "a" to be a group: h5py fails half way
    with pytest.raises(Exception):
        write_hdf5_atomic(path, {"a": old, "a/b": old}, overwrite=True)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    with open_volume(f"{path}:a") as v:
        np.testing.assert_array_equal(v.read(), old)


def test_write_hdf5_failure_leaves_no_new_file(tmp_path):
    path = tmp_path / "new.h5"
    a = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(Exception):
        write_hdf5_atomic(path, {"a": a, "a/b": a})
    assert os.listdir(tmp_path) == []


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert tmp == f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert target.read_bytes() == b"old"  # not visible until the block ends
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise Boom()
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []

    fresh = tmp_path / "fresh.bin"
    with pytest.raises(Boom):
        with atomic_path(fresh) as tmp:
            open(tmp, "wb").close()
            raise Boom()
    assert not fresh.exists() and _leftovers(tmp_path) == []

    with pytest.raises(VolumeError, match="nothing was written"):
        with atomic_path(tmp_path / "never.bin"):
            pass
    assert not (tmp_path / "never.bin").exists()
    with pytest.raises(VolumeError, match="exists; pass overwrite=True"):
        with atomic_path(target, overwrite=False):
            pytest.fail("must not get here")


def test_atomic_path_removes_stale_temp(tmp_path):
    target = tmp_path / "f.bin"
    stale = tmp_path / f"f.bin.tmp-{os.getpid()}"
    stale.write_bytes(b"stale junk")
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and not stale.exists()


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"{}")
    atomic_write_bytes(target, b"[1]")
    assert target.read_bytes() == b"[1]"
    with pytest.raises(VolumeError, match="exists; pass overwrite=True"):
        atomic_write_bytes(target, b"2", overwrite=False)
    assert target.read_bytes() == b"[1]"
    with pytest.raises(VolumeError, match="is a directory"):
        atomic_write_bytes(tmp_path, b"x")


def test_write_volume(tmp_path):
    path = tmp_path / "seg.h5"
    seg = np.arange(27, dtype=np.uint32).reshape(3, 3, 3)
    spec = write_volume(f"{path}:volumes/seg", seg, {"resolution_zyx_nm": (8, 8, 8)})
    assert spec == VolumeSpec(str(path), "volumes/seg")
    with open_volume(spec) as v:
        np.testing.assert_array_equal(v.read(), seg)
        assert v.resolution_zyx_nm == (8.0, 8.0, 8.0)
    with pytest.raises(VolumeError, match="exists; pass overwrite=True"):
        write_volume(f"{path}:volumes/seg", seg)
    write_volume(f"{path}:other", seg * 2)  # a new dataset beside the first
    with h5py.File(path, "r") as f:
        assert list(f) == ["other", "volumes"]
        np.testing.assert_array_equal(f["volumes/seg"][...], seg)
        assert dict(f["volumes/seg"].attrs)["resolution_zyx_nm"].tolist() == [8, 8, 8]
    with pytest.raises(VolumeError, match=r"expected a 3-D"):
        write_volume(f"{tmp_path / 'b.h5'}:x", np.zeros((2, 2)))
    with pytest.raises(VolumeError, match="unsupported dtype"):
        write_volume(f"{tmp_path / 'b.h5'}:x", np.zeros((2, 2, 2), bool))
    with pytest.raises(VolumeError, match="names no dataset"):
        write_volume(tmp_path / "b.h5", seg)
    assert sorted(os.listdir(tmp_path)) == ["seg.h5"]
    if importlib.util.find_spec("zarr") is not None:  # zarr output (see test_zarr_write_roundtrip_and_errors)
        write_volume(f"{tmp_path / 'b.zarr'}/x", seg)
        with open_volume(f"{tmp_path / 'b.zarr'}/x") as v:
            np.testing.assert_array_equal(v.read(), seg)


def test_zarr_write_roundtrip_and_errors(tmp_path):
    pytest.importorskip("zarr")
    from floodfilling.storage import write_volume, write_zarr_atomic

    store = tmp_path / "v.zarr"
    a = np.arange(5 * 70 * 3, dtype=np.uint32).reshape(5, 70, 3)
    write_volume(f"{store}/g/seg", a, attrs={"resolution_zyx_nm": [8, 8, 30], "cfg": {"k": 1}})
    with open_volume(f"{store}/g/seg") as v:  # a nested name; read back lazily
        assert np.array_equal(v.read(), a) and v.resolution_zyx_nm == (8.0, 8.0, 30.0)
        assert v.attrs["cfg"] == {"k": 1}
    table = np.zeros(3, dtype=[("id", "<u8"), ("steps", "<i8")])
    table["id"] = [1, 2, 3]
    write_zarr_atomic(store, {"t": table})
    import zarr

    t = zarr.open_group(str(store), mode="r")["t"]
    assert t["id"][...].tolist() == [1, 2, 3] and list(t.attrs["columns"]) == ["id", "steps"]
    with pytest.raises(VolumeError, match=r"g/seg exists; pass overwrite=True"):
        write_volume(f"{store}/g/seg", a)
    write_volume(f"{store}/g/seg", a[:2], overwrite=True)
    with open_volume(f"{store}/g/seg") as v:
        assert v.shape == (2, 70, 3)
    assert sorted(p.name for p in store.iterdir()) == ["g", "t", "zarr.json"]  # no leftovers
    with pytest.raises(VolumeError, match="name the array"):
        write_volume(f"{store}", a)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(VolumeError, match="not a zarr store"):
        write_volume(f"{tmp_path / 'file.zarr'}/a", a)
    with pytest.raises(VolumeError, match="unsupported dtype"):
        write_zarr_atomic(store, {"c": np.zeros(3, complex)})
