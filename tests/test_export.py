"""``ffn export``: precomputed layers read back with CloudVolume equal the input (level 0) and
the pooling of it (level 1, with the front padding an odd offset needs); offsets from
--bbox and from a segmentation's bbox_zyx; the layer types; bad input. The pooling itself
against a group-by-group brute force."""

import json

import h5py
import numpy as np
import pytest

pytest.importorskip("cloudvolume")

from cloudvolume import CloudVolume  # noqa: E402

from floodfilling.cli import main  # noqa: E402
from floodfilling.export import downsample, export, pyramid_factor, pyramid_sizes  # noqa: E402
from floodfilling.boxes import BBox  # noqa: E402


def downsample_brute(a, f, labels):
    out_shape = tuple(-(-n // k) for n, k in zip(a.shape, f))
    out = np.zeros(out_shape, a.dtype)
    for idx in np.ndindex(*out_shape):
        sl = tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(idx, f, a.shape))
        vals = a[sl].ravel()
        if labels:
            u, c = np.unique(vals, return_counts=True)
            out[idx] = u[np.argmax(c)]  # most frequent, smallest first
        else:
            out[idx] = np.floor(vals.astype(np.float64).mean() + 0.5)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_downsample_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 12, size=3))
    for f in ((2, 2, 1), (2, 2, 2)):
        lab = rng.integers(0, 4, shape).astype(np.uint32)
        assert np.array_equal(downsample(lab, f, True), downsample_brute(lab, f, True)), (shape, f)
        img = rng.integers(0, 256, shape).astype(np.uint8)
        assert np.array_equal(downsample(img, f, False), downsample_brute(img, f, False)), (shape, f)


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(1)
    seg = np.repeat(np.repeat(rng.integers(0, 30, (50, 40, 35)), 2, 1), 2, 2).astype(np.uint32)[:, :75, :70]
    img = rng.integers(0, 255, seg.shape).astype(np.uint8)
    with h5py.File(d / "v.h5", "w") as f:
        f.create_dataset("seg", data=seg).attrs["resolution_zyx_nm"] = [40, 8, 8]
        f.create_dataset("img", data=img).attrs["resolution_zyx_nm"] = [40, 8, 8]
        s = f.create_dataset("placed", data=seg[:20])
        s.attrs["bbox_zyx"] = json.dumps([[5, 6, 7], [25, 81, 77]])
        f["float"] = img.astype(np.float64)
        f["neg"] = -np.ones((4, 4, 4), np.int32)
    return d, seg, img


def read_level(path, mip):
    cv = CloudVolume(f"file://{path}", mip=mip, progress=False)
    return np.asarray(cv[:, :, :])[..., 0], cv


def test_segmentation_levels(vol):
    d, seg, _ = vol
    info = export(f"{d / 'v.h5'}:seg", str(d / "seg"), tile=128)
    assert info["type"] == "segmentation" and info["data_type"] == "uint32"
    sc = info["scales"]
    assert sc[0]["encoding"] == "compressed_segmentation" and sc[0]["resolution"] == [8, 8, 40]
    # z (40 nm) is 5x coarser than x, y: only x and y are halved per level
    assert [s["resolution"] for s in sc] == [[8, 8, 40], [16, 16, 40]] and pyramid_factor([8, 8, 40]) == (2, 2, 1)
    lvl0, _ = read_level(d / "seg", 0)
    assert np.array_equal(lvl0, seg.transpose(2, 1, 0))
    lvl1, cv1 = read_level(d / "seg", 1)
    want = downsample(seg.transpose(2, 1, 0).copy(), (2, 2, 1), labels=True)
    assert np.array_equal(lvl1, want[: lvl1.shape[0], : lvl1.shape[1], : lvl1.shape[2]])
    assert not any(p.suffix == ".gz" for p in (d / "seg" / sc[0]["key"]).iterdir())  # a static server can serve it


def test_odd_offset_pads_in_front(vol):
    d, seg, _ = vol
    info = export(f"{d / 'v.h5'}:seg", str(d / "crop"), bbox=BBox.parse("2,3,5:50,75,70"), tile=128)
    assert info["scales"][0]["voxel_offset"] == [5, 3, 2]
    lvl0, _ = read_level(d / "crop", 0)
    crop = seg[2:50, 3:75, 5:70].transpose(2, 1, 0)
    assert np.array_equal(lvl0, crop)
    lvl1, cv1 = read_level(d / "crop", 1)
    assert list(cv1.bounds.minpt) == [2, 1, 2]  # offset // factor
    padded = np.pad(crop, [(1, 0), (1, 0), (0, 0)], mode="edge")  # x 5 and y 3 are odd
    want = downsample(padded.copy(), (2, 2, 1), labels=True)
    assert np.array_equal(lvl1, want[: lvl1.shape[0], : lvl1.shape[1], : lvl1.shape[2]])


def test_placed_by_bbox_attribute_and_image_layer(vol):
    d, seg, img = vol
    info = export(f"{d / 'v.h5'}:placed", str(d / "placed"), levels=0)
    assert info["scales"][0]["voxel_offset"] == [7, 6, 5] and len(info["scales"]) == 1
    info = export(f"{d / 'v.h5'}:img", str(d / "img"), levels=2, tile=128)
    assert info["type"] == "image" and info["scales"][0]["encoding"] == "raw" and len(info["scales"]) == 3
    lvl1, _ = read_level(d / "img", 1)
    want = downsample(img.transpose(2, 1, 0).copy(), (2, 2, 1), labels=False)
    assert np.array_equal(lvl1, want[: lvl1.shape[0], : lvl1.shape[1], : lvl1.shape[2]])
    info = export(f"{d / 'v.h5'}:float", str(d / "float"), levels=0)
    assert info["data_type"] == "float32"
    assert pyramid_sizes((300, 100, 10), (2, 2, 1)) == [(300, 100, 10), (150, 50, 10), (75, 25, 10), (38, 13, 10)]


def test_command_and_bad_inputs(vol, capsys):
    d = vol[0]
    assert main(["export", f"{d / 'v.h5'}:seg", str(d / "cli"), "--levels", "1"]) == 0
    assert "segmentation layer, 2 level(s)" in capsys.readouterr().out

    def err(*args):
        assert main(["export", *args]) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("ffn: error:") and "\n" not in e, e
        return e

    assert "exists; pass --overwrite" in err(f"{d / 'v.h5'}:seg", str(d / "cli"))
    assert main(["export", f"{d / 'v.h5'}:seg", str(d / "cli"), "--levels", "0", "--overwrite"]) == 0
    (d / "other").mkdir()
    (d / "other" / "keep.txt").write_text("not a layer")
    assert "holds no precomputed layer" in err(f"{d / 'v.h5'}:seg", str(d / "other"), "--overwrite")
    assert (d / "other" / "keep.txt").exists()
    assert "dtype float64 cannot be a segmentation" in err(f"{d / 'v.h5'}:float", str(d / "x"), "--type",
                                                            "segmentation")
    assert "negative labels" in err(f"{d / 'v.h5'}:neg", str(d / "y"))
    assert "--levels -1" in err(f"{d / 'v.h5'}:seg", str(d / "z"), "--levels", "-1")
    assert "--resolution" in err(f"{d / 'v.h5'}:seg", str(d / "z"), "--resolution", "4,4")
    assert "--bbox" in err(f"{d / 'v.h5'}:seg", str(d / "z"), "--bbox", "0,0,0:500,5,5")
