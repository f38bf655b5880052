"""Nonsense in, error out (issue 13, item 5; item 6's `ffn status`): NaN/inf model weights,
all-NaN predictions, coordinates of other labels, seed_origins of another box, negative labels,
a corrupt block manifest and claims of dead processes. Small constructed inputs only."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from floodfilling.cli import main
from floodfilling.config import InferenceConfig
from floodfilling.model import ModelError, load_model, save_model
from floodfilling.testing import mean_flood_model, voronoi_volume


def ball_image(shape=(24, 24, 24), centre=(12, 12, 12), radius=6.0, seed=0):
    """A bright ball (~220) in a dark (~40) noisy volume, uint8: one object for mean_flood_model."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    inside = ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2
    raw = np.where(inside, 220, 40) + rng.normal(0, 5, shape)
    return np.clip(raw, 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_model(tmp_path):
    return mean_flood_model(tmp_path / "tiny.npz")


# -- (a) NaN/inf weights ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_model_with_nonfinite_weights_is_refused_at_load(tmp_path, tiny_model, bad, capsys):
    net, info = load_model(tiny_model)
    with torch.no_grad():
        net.conv0_b.weight[1, 1, 0, 0, 0] = bad
        net.conv_lom.bias[0] = bad  # a later array: the first bad one is named
    p = tmp_path / "bad.npz"
    save_model(p, net, info.meta)
    with pytest.raises(ModelError) as exc:
        load_model(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and "conv0_b/weights" in msg and "conv_lom" not in msg
    img = tmp_path / "img.h5"
    with h5py.File(img, "w") as f:
        f["raw"] = ball_image()
    assert main(["segment", f"{img}:raw", f"{tmp_path / 'o.h5'}:seg", "--model", str(p), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffn: error:") and "conv0_b/weights" in err and str(p) in err
    assert not (tmp_path / "o.h5").exists()


# -- (b) every prediction NaN ----------------------------------------------------------------

def nan_model(path):
    """The tiny model with a NaN output bias set after loading (load_model refuses it in a file)."""
    net, info = load_model(path)
    with torch.no_grad():
        net.conv_lom.bias.fill_(float("nan"))
    return net, info


@pytest.mark.parametrize("resident", ["off", "on"])  # host path / device-resident path (torch cpu)
def test_all_nan_predictions_raise_instead_of_an_empty_segmentation(tiny_model, resident):
    from floodfilling.inference.segment import SegmentError, segment_array

    raw = ball_image()
    cfg = InferenceConfig(device="cpu", resident=resident, min_segment_size=10, threads=1)
    good = segment_array(raw, config=cfg, net_and_info=load_model(tiny_model))
    assert good.counters["objects"] >= 1 and good.counters.get("nan_steps", 0) == 0
    with pytest.raises(SegmentError) as exc:
        segment_array(raw, config=cfg, net_and_info=nan_model(tiny_model), source="ball.h5:raw")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("ball.h5:raw: every prediction was NaN (")
    n, m = (int(v) for v in msg.split("(")[1].split(" FOV steps")[0].split(" of "))
    assert n == m > 0 and "the model or the normalised image produces NaN" in msg


@pytest.mark.device
def test_nan_steps_counted_alike_on_both_paths(tiny_model, test_device):
    """The counter comes from the face maxima both paths already return to the host (NaN
    predictions on the device lane's device: the host path copies them back, the device path
    takes NaN face maxima on the device)."""
    from floodfilling.inference.canvas import Canvas
    from floodfilling.inference.engine import make_predictor

    net, info = nan_model(tiny_model)
    image = ((ball_image().astype(np.float32) - 128) / 33).astype(np.float32)
    seeds = np.array([[12, 12, 12], [8, 12, 12]])
    counts = {}
    for resident in ("off", "on"):
        cfg = InferenceConfig(device=str(test_device), resident=resident, min_segment_size=10)
        pred = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg)
        cv = pred.new_canvas(image, seeds, cfg, info.deltas_zyx)
        assert isinstance(cv, Canvas)
        gen = cv.steps()
        try:
            c = next(gen)
            while True:
                c = gen.send(pred.predict([cv], [c], cv.t_pad)[0])
        except StopIteration:
            pass
        cv.release()
        counts[resident] = dict(cv.state.counters)
        assert cv.state.counters["objects"] == 0 and not cv.final_segmentation().any()
    assert counts["off"] == counts["on"]
    assert counts["off"]["nan_steps"] == counts["off"]["steps"] > 0


def test_nan_segment_cli_writes_nothing(tmp_path, tiny_model, monkeypatch, capsys):
    from floodfilling.inference import segment as seg_mod

    real = seg_mod.load_model
    monkeypatch.setattr(seg_mod, "load_model", lambda model, device="cpu": nan_model(model) if model else
                        real(model, device))
    img = tmp_path / "img.h5"
    with h5py.File(img, "w") as f:
        f["raw"] = ball_image()
    out = tmp_path / "o.h5"
    assert main(["segment", f"{img}:raw", f"{out}:seg", "--model", str(tiny_model), "-q", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffn: error:") and "every prediction was NaN" in err and f"{img}:raw" in err
    assert not out.exists() and not list(tmp_path.glob("o.h5*"))  # no output, no resume state


# -- (c) coordinates of other labels ---------------------------------------------------------

voronoi = voronoi_volume


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("nonsense_train")
    raw, labels = voronoi()
    with h5py.File(d / "vol.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
        f["labels_other"] = voronoi(seed=1)[1]  # same shape, other objects
        f["labels_u64"] = labels.astype(np.uint64)  # the same ids in another dtype
    prep = d / "prep.h5"
    assert main(["prepare", f"{d / 'vol.h5'}:labels", str(prep), "--radius", "5", "--min-size", "200"]) == 0
    return d / "vol.h5", prep


def test_prepare_records_labels_digest(train_data):
    from floodfilling.training.partitions import labels_digest

    data, prep = train_data
    with h5py.File(data, "r") as f:
        labels, other, wide = f["labels"][...], f["labels_other"][...], f["labels_u64"][...]
    with h5py.File(prep, "r") as f:
        rec = f["coords"].attrs["labels_digest"]
    rec = rec.decode() if isinstance(rec, bytes) else str(rec)
    assert rec == labels_digest(labels) == labels_digest(wide) != labels_digest(other)
    assert len(rec) == 16 and labels_digest(labels, slab_voxels=7) == rec  # slab size does not matter
    assert labels_digest(labels.reshape(32, 30, 34)) != rec  # nor does the shape go unnoticed


def test_train_refuses_coords_of_other_labels(train_data, tmp_path, capsys):
    data, prep = train_data
    args = ["train", "--image", f"{data}:raw", "--labels", f"{data}:labels_other", "--out", str(tmp_path / "r"),
            "--coords", str(prep), "--depth", "1", "--features", "4", "--fov", "7", "--deltas", "2",
            "--threads", "1", "--device", "cpu", "-q", "--no-tensorboard", "--max-steps", "1", "--batch", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffn: error: --coords") and "\n" not in err
    assert str(prep) in err and f"{data}:labels_other" in err and f"{data}:labels " in err
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_coords_digest_checked_old_files_warn(train_data, tmp_path, caplog):
    from floodfilling.training.options import TrainError
    from floodfilling.training.volumes import load_coordinates

    data, prep = train_data
    with h5py.File(data, "r") as f:
        labels, other = f["labels"][...], f["labels_other"][...]
    coords, _ = load_coordinates(str(prep), labels.shape, labels, "vol.h5:labels")  # the right labels: fine
    assert coords.shape[1] == 3
    with pytest.raises(TrainError, match="not from the training labels vol.h5:labels_other"):
        load_coordinates(str(prep), labels.shape, other, "vol.h5:labels_other")
    old = tmp_path / "old.h5"
    with h5py.File(prep, "r") as src, h5py.File(old, "w") as dst:
        src.copy("coords", dst)
        del dst["coords"].attrs["labels_digest"]
    with caplog.at_level(logging.WARNING):
        coords2, _ = load_coordinates(str(old), labels.shape, other, "vol.h5:labels_other")
    assert np.array_equal(coords, coords2)
    assert "records no labels_digest" in caplog.text and str(old) in caplog.text


# -- (d) seed_origins of another box ---------------------------------------------------------

def test_seed_origins_of_another_shape_or_box_refused(tmp_path, tiny_model, capsys):
    img = tmp_path / "img.h5"
    with h5py.File(img, "w") as f:
        f["raw"] = ball_image((24, 24, 24))
        f["wide"] = ball_image((24, 24, 30))
    common = ["--model", str(tiny_model), "--set", "min_segment_size=10", "--threads", "1", "-q"]
    first = f"{tmp_path / 'a.h5'}:seg"
    assert main(["segment", f"{img}:raw", first, *common]) == 0
    inv = ["--set", "seed_policy=invert_origins", "--set", f"seed_origins={first}"]
    # the same box: fine
    assert main(["segment", f"{img}:raw", f"{tmp_path / 'b.h5'}:seg", *common, *inv]) == 0
    capsys.readouterr()
    # another image shape
    assert main(["segment", f"{img}:wide", f"{tmp_path / 'c.h5'}:seg", *common, *inv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"seed_origins={first}" in err
    assert "(24, 24, 24)" in err and "(24, 24, 30)" in err
    # a box of the same image (the first run covered all of it)
    assert main(["segment", f"{img}:raw", f"{tmp_path / 'd.h5'}:seg", "--bbox", "0,0,0:20,24,24", *common,
                 *inv]) == 2
    err = capsys.readouterr().err.strip()
    assert f"seed_origins={first}" in err and "(24, 24, 24)" in err and "(20, 24, 24)" in err
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "d.h5").exists()


# -- (e) negative labels: evaluate, prepare, consensus ---------------------------------------

@pytest.fixture
def negative_file(tmp_path):
    p = tmp_path / "neg.h5"
    lab = np.zeros((20, 20, 20), np.int32)
    lab[2:18, 2:18, 2:10] = 1
    lab[2:18, 2:18, 10:18] = 2
    neg = lab.copy()
    neg[15, 15, 15] = -3
    with h5py.File(p, "w") as f:
        f["ok"] = lab
        f["neg"] = neg
    return p


def test_evaluate_refuses_negative_labels(negative_file, capsys):
    from floodfilling.evaluation import evaluate

    with h5py.File(negative_file, "r") as f:
        ok, neg = f["ok"][...], f["neg"][...]
    with pytest.raises(ValueError, match=r"gt: negative labels \(minimum -3\)"):
        evaluate(ok, neg)
    with pytest.raises(ValueError, match=r"seg: negative labels \(minimum -3\)"):
        evaluate(neg, ok)
    assert main(["evaluate", f"{negative_file}:neg", f"{negative_file}:ok"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ffn: error: {negative_file}:neg: negative labels (minimum -3): label ids must be >= 0"
    assert main(["evaluate", f"{negative_file}:ok", f"{negative_file}:neg"]) == 2
    assert f"{negative_file}:neg: negative labels (minimum -3)" in capsys.readouterr().err
    assert main(["evaluate", f"{negative_file}:ok", f"{negative_file}:ok", "--json"]) == 0


def test_prepare_refuses_negative_labels(negative_file, tmp_path, capsys):
    out = tmp_path / "prep.h5"
    assert main(["prepare", f"{negative_file}:neg", str(out), "--radius", "2", "--min-size", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ffn: error: {negative_file}:neg: negative labels (minimum -3): label ids must be >= 0"
    assert not out.exists()
    assert main(["prepare", f"{negative_file}:ok", str(out), "--radius", "2", "--min-size", "10"]) == 0


def test_consensus_refuses_negative_labels_naming_the_minimum(negative_file, tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert main(["consensus", f"{negative_file}:ok", f"{negative_file}:neg", f"{out}:seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ffn: error: {negative_file}:neg: negative labels (minimum -3 in z ")
    assert err.endswith("label ids must be >= 0") and not out.exists()


# -- item 6: ffn status ------------------------------------------------------------------------

def fake_workdir(tmp_path):
    from floodfilling.geometry import make_grid
    from floodfilling.distributed.workdir import MANIFEST_FORMAT

    wd = tmp_path / "work"
    (wd / "blocks").mkdir(parents=True)
    (wd / "claims").mkdir()
    man = {"format": MANIFEST_FORMAT, "image": "img.h5:raw", "bbox": [[0, 0, 0], [40, 40, 40]],
           "block": [20, 20, 20], "halo": [4, 4, 4], "fov_zyx": [9, 9, 9]}
    (wd / "manifest.json").write_text(json.dumps(man))
    grid = make_grid((40, 40, 40), (20, 20, 20), (4, 4, 4), (9, 9, 9))
    return wd, [b.name((0, 0, 0)) for b in grid]


def test_status_names_a_corrupt_manifest(tmp_path, capsys):
    wd, _ = fake_workdir(tmp_path)
    assert main(["status", str(wd)]) == 0
    (wd / "manifest.json").write_text('{"format": "floodfilling-blo')  # truncated
    capsys.readouterr()
    assert main(["status", str(wd)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(wd / "manifest.json") in err and "corrupt or unreadable" in err
    assert "no block-inference manifest.json" not in err


def test_status_reports_dead_ranks(tmp_path, capsys):
    wd, names = fake_workdir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid is gone
    here = socket.gethostname()
    (wd / "claims" / names[0]).write_text(f"0123456789ab {here} {proc.pid} 0\n")
    import os

    (wd / "claims" / names[1]).write_text(f"0123456789ab {here} {os.getpid()} 1\n")  # alive
    (wd / "claims" / names[2]).write_text(f"0123456789ab not-{here} {proc.pid} 2\n")  # elsewhere: unknown
    assert main(["status", str(wd), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["blocks_running"] == 2 and st["blocks_dead"] == 1
    assert [r["block"] for r in st["dead"]] == [names[0]]
    assert sorted(r["block"] for r in st["running"]) == sorted(names[1:3])
    assert main(["status", str(wd)]) == 0
    text = capsys.readouterr().out
    assert "2 running" in text and "1 claimed by dead ranks" in text
    assert f"dead: {names[0]} on {here} rank 0 (pid {proc.pid} is gone" in text
    assert f"running: {names[0]}" not in text
