"""Agglomeration by FFN resegmentation on a constructed case: a bright blob cut in two pieces
(one neuron, over-split) touching a second blob across a dark wall (two neurons). A model
that floods bright regions must merge the two pieces and keep the wall. Also the contact
finder against a brute force, the --within restriction and bad input."""

import h5py
import numpy as np
import pytest

from floodfilling.agglomerate import contacts, dominant, interior_point
from floodfilling.cli import main
from floodfilling.testing import mean_flood_model


def brute_contacts(seg):
    out = {}
    for idx in np.ndindex(*seg.shape):
        for axis in range(3):
            j = list(idx)
            j[axis] += 1
            if j[axis] >= seg.shape[axis]:
                continue
            u, v = int(seg[idx]), int(seg[tuple(j)])
            if u and v and u != v:
                key = (min(u, v), max(u, v))
                out[key] = out.get(key, 0) + 1
    return out


def test_contacts_against_brute_force():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, size=(6, 7, 8)).astype(np.uint32)
    pairs, counts, points = contacts(seg)
    assert dict(zip(map(tuple, pairs.tolist()), counts.tolist())) == brute_contacts(seg)
    for (a, b), p in zip(pairs, points):
        assert seg[tuple(p)] == a  # on the a side
        nb = [tuple(np.clip(np.array(p) + d, 0, np.array(seg.shape) - 1)) for d in np.vstack([np.eye(3), -np.eye(3)]).astype(int)]
        assert any(seg[q] == b for q in nb)  # touching b
    assert contacts(np.zeros((3, 3, 3), np.uint32))[0].shape == (0, 2)
    assert dominant(np.array([[[1, 1, 2]]]), np.array([[[7, 8, 8]]])) == {1: 7, 2: 8}  # tie: the smaller id
    assert interior_point(np.zeros((5, 5, 5), bool)) is None


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("agglo")
    shape = (24, 24, 40)
    raw = np.full(shape, 60, np.uint8)  # dark
    raw[4:20, 4:20, 3:19] = 200  # blob 1
    raw[4:20, 4:20, 21:37] = 200  # blob 2, a dark wall at x 19-20
    seg = np.zeros(shape, np.uint32)
    seg[2:22, 2:22, 1:10] = 1  # blob 1, first piece
    seg[2:22, 2:22, 10:21] = 2  # blob 1, second piece + the wall
    seg[2:22, 2:22, 21:39] = 3  # blob 2
    within = np.where(seg == 3, 9, np.where(seg > 0, 8, 0)).astype(np.uint32)  # the "forward run"
    with h5py.File(d / "v.h5", "w") as f:
        f["raw"] = raw
        f["seg"] = seg
        f["within"] = within
        f["within_all"] = (seg > 0).astype(np.uint32)
        f["float"] = seg.astype(np.float32)
    mean_flood_model(d / "tiny.npz")
    return d


def read(path):
    with h5py.File(path, "r") as f:
        return f["seg"][:], f["seg_agglomeration"][:]


def test_merges_the_pieces_and_keeps_the_wall(case):
    common = ["--model", str(case / "tiny.npz"), "--box", "15,15,15", "--threads", "1"]
    assert main(["agglomerate", f"{case / 'v.h5'}:raw", f"{case / 'v.h5'}:seg", f"{case / 'o.h5'}:seg", *common]) == 0
    out, table = read(case / "o.h5")
    rows = {(int(r["a"]), int(r["b"])): r for r in table}
    assert set(rows) == {(1, 2), (2, 3)}
    assert rows[(1, 2)]["merged"] == 1 and rows[(1, 2)]["iou"] > 0.5
    assert rows[(2, 3)]["merged"] == 0 and rows[(2, 3)]["iou"] < 0.5
    with h5py.File(case / "v.h5", "r") as f:
        seg = f["seg"][:]
    assert np.array_equal(out, np.where(seg == 2, 1, seg))  # 2 joins 1 (the smaller id), 3 stays
    # --within: pairs across two objects of the forward run are not even candidates
    assert main(["agglomerate", f"{case / 'v.h5'}:raw", f"{case / 'v.h5'}:seg", f"{case / 'w.h5'}:seg", *common,
                 "--within", f"{case / 'v.h5'}:within"]) == 0
    out_w, table_w = read(case / "w.h5")
    assert [(int(r["a"]), int(r["b"])) for r in table_w] == [(1, 2)] and np.array_equal(out_w, out)


def test_bad_inputs(case, capsys):
    base = ["agglomerate", f"{case / 'v.h5'}:raw", f"{case / 'v.h5'}:seg", f"{case / 'x.h5'}:seg", "--model",
            str(case / "tiny.npz")]

    def err(*args, argv=None):
        assert main((argv or base) + list(args)) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("ffn: error:") and "\n" not in e, e
        return e

    assert "--box 5,15,15" in err("--box", "5,15,15")
    assert "--merge-iou 1.5" in err("--merge-iou", "1.5")
    assert "dtype float32 is not a label" in err(argv=["agglomerate", f"{case / 'v.h5'}:raw", f"{case / 'v.h5'}:float",
                                                       f"{case / 'x.h5'}:seg", "--model", str(case / "tiny.npz")])
    with h5py.File(case / "exists.h5", "w") as f:  # an existing output dataset (other datasets would be kept)
        f["seg"] = np.zeros((1, 1, 1), np.uint32)
    assert "exists; pass --overwrite" in err(argv=base[:3] + [f"{case / 'exists.h5'}:seg", "--model",
                                                              str(case / "tiny.npz")])
    zarr = pytest.importorskip("zarr")
    zarr.open_group(str(case / "o.zarr"), mode="w").create_array("seg", shape=(1, 1, 1), dtype="u4")
    assert f"{case / 'o.zarr'}/seg exists; pass --overwrite" in err(  # refused before any flood
        argv=base[:3] + [f"{case / 'o.zarr'}/seg", "--model", str(case / "tiny.npz")])
