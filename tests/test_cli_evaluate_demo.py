"""`ffn evaluate` on a hand-computed case and `ffn demo` end to end."""

import json

import h5py
import numpy as np
import pytest

from floodfilling.cli import main


def test_evaluate_pure_merge_json(tmp_path, capsys):
    gt = np.zeros((1, 1, 8), np.uint32)
    gt[..., 4:] = 2
    gt[..., :4] = 1
    seg = np.ones((1, 1, 8), np.uint32)  # one object over two gt objects: a pure merge
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["seg"] = seg
        f["gt"] = gt
    assert main(["evaluate", f"{tmp_path}/v.h5:seg", f"{tmp_path}/v.h5:gt", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(1.0)
    assert r["vi_merge"] == pytest.approx(1.0) and r["vi_split"] == pytest.approx(0.0)  # bits
    assert r["seg_objects"] == 1 and r["gt_objects"] == 2
    assert r["false_merges"][0]["seg_id"] == 1
    # and the readable report names both numbers
    assert main(["evaluate", f"{tmp_path}/v.h5:seg", f"{tmp_path}/v.h5:gt"]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "0.5" in text


def test_evaluate_shape_mismatch(tmp_path, capsys):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["a"] = np.zeros((2, 2, 2), np.uint32)
        f["b"] = np.zeros((2, 2, 3), np.uint32)
    assert main(["evaluate", f"{tmp_path}/v.h5:a", f"{tmp_path}/v.h5:b"]) == 2
    err = capsys.readouterr().err
    assert "(2, 2, 2)" in err and "(2, 2, 3)" in err


def test_demo(tmp_path, capsys):
    """The README's main job: bundled crop + bundled model, evaluation, HDF5 and PNG."""
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "variation of information" in out
    with h5py.File(tmp_path / "demo_segmentation.h5", "r") as f:
        seg = f["seg"][:]
        assert seg.shape == (64, 112, 112) and len(f["seg_origins"]) == seg.max()
    r = json.loads((tmp_path / "demo_evaluation.json").read_text())
    ev = r["evaluation"]
    assert ev["seg_objects"] >= 10 and ev["vi"] < 3.0 and ev["are"] < 0.4
    from PIL import Image

    im = Image.open(tmp_path / "demo_slices.png")
    assert im.size[1] >= 112 * 3 and im.mode == "RGB"
    assert not (tmp_path / "demo_segmentation.h5.resume.npz").exists()
