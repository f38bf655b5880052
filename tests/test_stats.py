"""``ffn stats``: the per-object table of a hand-built volume (boxes whose sizes, boxes,
centroids, border contact and gt overlaps are known by construction), read slab by slab with
slabs that cut objects; the CSV the command writes."""

import csv

import h5py
import numpy as np
import pytest

from floodfilling.cli import main
from floodfilling.stats import object_table


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    seg = np.zeros((10, 12, 14), np.uint32)
    seg[2:5, 3:7, 4:9] = 7  # 3*4*5 = 60 voxels, inside
    seg[0:2, 0:3, 0:2] = 3  # 12 voxels, touches the faces z=0, y=0, x=0
    seg[6:10, 5:6, 13:14] = 12  # 4 voxels, touches z=9 and x=13
    seg[6, 8, 2] = 9  # one voxel
    gt = np.zeros_like(seg)
    gt[2:5, 3:7, 4:6] = 1  # 3*4*2 = 24 voxels of object 7
    gt[2:5, 3:7, 6:9] = 2  # 36 voxels of object 7: the most
    gt[0:2, 0:3, 0:1] = 5  # 6 of object 3 on body 5, 6 on gt 0
    gt[6:8, 5:6, 13] = 4
    gt[8:10, 5:6, 13] = 6  # object 12: tie 2 / 2 -> the smaller id, 4
    with h5py.File(d / "v.h5", "w") as f:
        f.create_dataset("seg", data=seg).attrs["resolution_zyx_nm"] = [40, 8, 4]
        f["gt"] = gt
        f["float"] = seg.astype(np.float32)
    return d


def test_table_of_hand_built_volume(hand):
    t = object_table(f"{hand / 'v.h5'}:seg", labels=f"{hand / 'v.h5'}:gt", slab=3)  # slabs cut objects 7 and 12
    assert t.ids.tolist() == [3, 7, 9, 12]
    assert t.voxels.tolist() == [12, 60, 1, 4]
    np.testing.assert_allclose(t.volume_um3, np.array([12, 60, 1, 4]) * 40 * 8 * 4 / 1e9)
    assert t.bbox_start.tolist() == [[0, 0, 0], [2, 3, 4], [6, 8, 2], [6, 5, 13]]
    assert t.bbox_stop.tolist() == [[2, 3, 2], [5, 7, 9], [7, 9, 3], [10, 6, 14]]
    np.testing.assert_allclose(t.centroid, [[0.5, 1, 0.5], [3, 4.5, 6], [6, 8, 2], [7.5, 5, 13]])
    assert t.touches_border.tolist() == [True, False, False, True]
    assert t.gt_id.tolist() == [5, 2, 0, 4]
    np.testing.assert_allclose(t.gt_fraction, [0.5, 0.6, 0.0, 0.5])
    assert t.cable_length_nm is None


def test_cli_writes_csv(hand, tmp_path, capsys):
    out = tmp_path / "objects.csv"
    assert main(["stats", f"{hand / 'v.h5'}:seg", "--labels", f"{hand / 'v.h5'}:gt", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["3", "7", "9", "12"]
    r7 = rows[1]
    assert (r7["voxels"], r7["z0"], r7["x1"], r7["touches_border"], r7["gt_id"], r7["gt_fraction"]) == \
        ("60", "2", "9", "0", "2", "0.6000")
    assert float(r7["volume_um3"]) == pytest.approx(60 * 40 * 8 * 4 / 1e9)
    assert "4 objects" in capsys.readouterr().out
    # an existing table is kept without --overwrite
    assert main(["stats", f"{hand / 'v.h5'}:seg", "--out", str(out)]) == 2
    assert "gt_id" in out.read_text()
