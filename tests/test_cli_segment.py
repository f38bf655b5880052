"""`ffn segment` end to end: outputs, resumability after SIGKILL, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from floodfilling.cli import main

CROP = (slice(100, 148), slice(90, 170), slice(90, 170))  # 48 x 80 x 80, ~30-60 FOV steps


@pytest.fixture(scope="module")
def crop_file(tmp_path_factory, fib25):
    p = tmp_path_factory.mktemp("data") / "crop.h5"
    with h5py.File(p, "w") as f:
        d = f.create_dataset("raw", data=fib25[0][CROP])
        d.attrs["resolution_zyx_nm"] = [10, 10, 10]
        f.create_dataset("labels", data=fib25[1][CROP])
        f.create_dataset("flat", data=np.zeros((40, 40), np.uint8))
        f.create_dataset("tiny", data=np.zeros((20, 40, 40), np.uint8))
        nan = np.zeros((40, 40, 40), np.float32)
        nan[3, 3, 3] = np.nan
        f.create_dataset("nan", data=nan)
    return p


def ffn(*args):
    return subprocess.run([sys.executable, "-m", "floodfilling.cli", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def reference_run(crop_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "seg.h5"
    r = ffn("segment", f"{crop_file}:raw", f"{out}:seg", "-q", "--threads", "1")
    assert r.returncode == 0, r.stderr
    return out


def read_out(path):
    with h5py.File(path, "r") as f:
        return f["seg"][:], f["seg_origins"][:], dict(f["seg"].attrs)


def test_segment_writes_outputs(reference_run, crop_file):
    seg, origins, attrs = read_out(reference_run)
    assert seg.dtype == np.uint32 and seg.shape == (48, 80, 80)
    assert len(origins) == seg.max() >= 2
    assert list(attrs["resolution_zyx_nm"]) == [10, 10, 10]
    assert set(np.unique(seg)) == {0} | set(origins["id"].tolist())
    for o in origins:  # every object contains its seed
        assert seg[o["z"], o["y"], o["x"]] == o["id"]
    assert not any(p.name.endswith((".resume.npz",)) or ".tmp-" in p.name for p in reference_run.parent.iterdir())


def kill_after(cmd, path, timeout, delay):
    """Runs ``cmd`` and SIGKILLs it ``delay`` seconds after ``path`` appears (it must still run)."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while not path.exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def device_run(test_device, reference_run, crop_file, fib25, tmp_path):
    """(image spec, extra flags, uninterrupted output) of the device lane's resume test: on cpu
    the crop, no flags (the default device, as today) and ``reference_run``; on a GPU a larger
    crop (so a run lasts long enough to be killed), ``--device`` and its own uninterrupted run
    (its default path there: resident)."""
    if test_device.type == "cpu":
        return f"{crop_file}:raw", [], reference_run
    p = tmp_path / "big.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("raw", data=fib25[0][:96, :160, :160])
    flags = ["--device", str(test_device)]
    ref = tmp_path / "ref.h5"
    r = ffn("segment", f"{p}:raw", f"{ref}:seg", "-q", *flags)
    assert r.returncode == 0, r.stderr
    return f"{p}:raw", flags, ref


@pytest.mark.device
def test_resume_after_sigkill(device_run, test_device, tmp_path):
    image, flags, reference_run = device_run
    out = tmp_path / "seg.h5"
    state = tmp_path / "seg.h5.seg.resume.npz"
    cmd = [sys.executable, "-m", "floodfilling.cli", "segment", image, f"{out}:seg", "-q",
           "--threads", "1", "--checkpoint-interval", "0.001", *flags]
    kill_after(cmd, state, timeout=120, delay=0.3 if test_device.type == "cpu" else 0.05)
    assert not out.exists()  # nothing half-written
    with np.load(state) as z:
        done_seeds = int(z["seed_index"])
        total = len(z["seeds"])
    assert 0 < done_seeds < total
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert not state.exists()
    seg, origins, _ = read_out(out)
    seg0, origins0, _ = read_out(reference_run)
    assert np.array_equal(seg, seg0)
    for col in ("id", "z", "y", "x", "steps"):
        assert np.array_equal(origins[col], origins0[col])


def test_existing_output_needs_overwrite(reference_run, crop_file, capsys):
    before = reference_run.read_bytes()
    assert main(["segment", f"{crop_file}:raw", f"{reference_run}:seg", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffn: error:") and "--overwrite" in err and str(reference_run) in err
    assert reference_run.read_bytes() == before


@pytest.mark.parametrize("spec_fmt, words", [
    ("{d}/missing.h5:raw", ["missing.h5"]),
    ("{crop}:nope", ["nope", "raw"]),  # names the dataset and lists what is there
    ("{crop}:flat", ["flat", "3-D"]),
    ("{crop}:tiny", ["smaller", "FOV"]),
    ("{crop}:nan", ["NaN"]),
])
def test_bad_inputs_one_line_exit_2(spec_fmt, words, crop_file, tmp_path, capsys):
    spec = spec_fmt.format(d=tmp_path, crop=crop_file)
    out = tmp_path / "o.h5"
    assert main(["segment", spec, f"{out}:seg", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffn: error:") and "\n" not in err, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_bad_bbox_and_model(crop_file, tmp_path, capsys):
    out = tmp_path / "o.h5"
    assert main(["segment", f"{crop_file}:raw", f"{out}:seg", "--bbox", "0,0,0:60,10,10", "-q"]) == 2
    err = capsys.readouterr().err
    assert "0,0,0:60,10,10" in err or "60" in err
    bad = tmp_path / "model.npz"
    bad.write_bytes(b"garbage")
    assert main(["segment", f"{crop_file}:raw", f"{out}:seg", "--model", str(bad), "-q"]) == 2
    assert "model.npz" in capsys.readouterr().err
    assert main(["segment", f"{crop_file}:raw", f"{out}:seg", "--set", "move_threshold=2", "-q"]) == 2
    assert "move_threshold" in capsys.readouterr().err
    assert not out.exists()


def test_config_toml_roundtrip(tmp_path, capsys):
    from floodfilling.config import InferenceConfig

    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "# Voxels with at least this probability become part of the object." in text
    p = tmp_path / "c.toml"
    p.write_text(text.replace("min_segment_size = 1000", "min_segment_size = 500"))
    cfg = InferenceConfig.from_toml(p)
    assert cfg.min_segment_size == 500 and cfg.move_threshold == 0.9


def test_zarr_input_and_output(reference_run, crop_file, tmp_path, capsys):
    """A zarr store in, the segmentation written into the same store beside the raw image
    (each array atomically, other arrays untouched): the same result as HDF5 in and out."""
    zarr = pytest.importorskip("zarr")
    store = tmp_path / "vol.zarr"
    with h5py.File(crop_file, "r") as f:
        raw = f["raw"][:]
    group = zarr.open_group(str(store), mode="w")
    arr = group.create_array("raw", shape=raw.shape, dtype=raw.dtype, chunks=(16, 32, 32))
    arr[...] = raw
    arr.attrs["resolution_zyx_nm"] = [10, 10, 10]
    args = ["segment", f"{store}/raw", f"{store}/seg", "-q", "--threads", "1"]
    assert main(args) == 0
    want_seg, want_origins, _ = read_out(reference_run)
    out = zarr.open_group(str(store), mode="r")
    assert np.array_equal(out["seg"][...], want_seg) and out["seg"].dtype == np.uint32
    assert list(out["seg"].attrs["resolution_zyx_nm"]) == [10, 10, 10]
    for col in ("id", "z", "y", "x", "steps"):
        assert np.array_equal(out["seg_origins"][col][...], want_origins[col])
    assert np.array_equal(out["raw"][...], raw)  # untouched
    assert not any(".tmp-" in p.name or ".old-" in p.name for p in store.iterdir())
    assert not any(p.name.endswith(".resume.npz") for p in tmp_path.iterdir())
    # exists: refused without --overwrite; replaced with it
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    zarr.open_group(str(store), mode="a")["seg"].attrs["marker"] = 1
    assert main(args + ["--overwrite"]) == 0
    out = zarr.open_group(str(store), mode="r")
    assert "marker" not in out["seg"].attrs  # a new array
    assert np.array_equal(out["seg"][...], want_seg) and np.array_equal(out["raw"][...], raw)
    assert not any(".tmp-" in p.name or ".old-" in p.name for p in store.iterdir())
    # evaluate reads zarr too
    assert main(["evaluate", f"{store}/seg", f"{crop_file}:labels", "--json"]) == 0
    # an output store named without an array
    assert main(["segment", f"{store}/raw", str(tmp_path / "o.zarr"), "-q"]) == 2
    assert "name the array" in capsys.readouterr().err


@pytest.fixture(scope="module")
def refined_run(crop_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("refined") / "refined.h5"
    r = ffn("segment", f"{crop_file}:raw", f"{out}:seg", "-q", "--threads", "1", "--refine", "--refine-model", "hand")
    assert r.returncode == 0, r.stderr
    return out


def test_refine_keeps_the_exact_flood_and_refines_it(reference_run, refined_run, crop_file):
    """`--refine`: <ds>_forward is the plain run bit for bit; the refinement only adds (every
    flood voxel keeps its id, every other voxel gets one); added objects have origins with
    their flood's steps; against the labels the refined result is better than the flood (VI
    and adapted Rand error, gt 0 counted). (refine_array itself: tests/test_refine.py.)"""
    from floodfilling import evaluation

    out = refined_run
    plain = read_out(reference_run)[0]
    with h5py.File(out, "r") as f:
        seg, forward, origins = f["seg"][:], f["seg_forward"][:], f["seg_origins"][:]
        attrs = dict(f["seg"].attrs)
    with h5py.File(crop_file, "r") as f:
        labels = f["labels"][:]
    np.testing.assert_array_equal(forward, plain)
    pairs = np.unique(np.stack([plain[plain > 0], seg[plain > 0]]), axis=1)  # (flood id, refined id)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # each flood object lies in one refined object
    moved = pairs[:, pairs[0] != pairs[1]]
    assert (moved[1] < moved[0]).all()  # keeps its id, or rejoined an earlier object
    assert (seg > 0).all() and set(np.unique(seg)) == set(origins["id"].tolist())
    added = origins[origins["id"] > plain.max()]
    counters = json.loads(attrs["counters"])
    assert len(added) == counters["refine_gap_objects"] and (added["steps"] > 0).all()
    assert json.loads(attrs["refine"])["steps"] == ["rejoin", "gap_objects", "watershed"]
    assert moved.shape[1] == counters["refine_rejoined"]
    before, after = evaluation.evaluate(plain, labels, "label"), evaluation.evaluate(seg, labels, "label")
    assert after["vi"] < before["vi"] and after["are"] < before["are"]


def test_refine_resume_after_sigkill_in_the_refinement(refined_run, crop_file, tmp_path):
    """`--refine` killed (SIGKILL) after its flood finished, while refining: nothing is written,
    the finished flood's state is kept, and the rerun skips the flood (resumes at the last
    seed) and writes output identical to an uninterrupted run."""
    out = tmp_path / "seg.h5"
    state = tmp_path / "seg.h5.seg.resume.npz"
    cmd = [sys.executable, "-m", "floodfilling.cli", "segment", f"{crop_file}:raw", f"{out}:seg", "-q",
           "--threads", "1", "--checkpoint-interval", "1000", "--refine", "--refine-model", "hand"]
    kill_after(cmd, state, timeout=300, delay=1.0)  # with a 1000 s interval the only save is the finished flood's
    assert not out.exists()  # nothing half-written
    with np.load(state) as z:
        assert int(z["seed_index"]) == len(z["seeds"])  # the flood is done
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert not state.exists()
    with h5py.File(out, "r") as f, h5py.File(refined_run, "r") as g:
        for name in ("seg", "seg_forward"):
            assert np.array_equal(f[name][:], g[name][:]), name
        for col in ("id", "z", "y", "x", "steps"):  # (not the seconds)
            assert np.array_equal(f["seg_origins"][col], g["seg_origins"][col]), col
        c1, c0 = json.loads(f["seg"].attrs["counters"]), json.loads(g["seg"].attrs["counters"])
        for k in ("steps", "objects", "refine_gap_objects", "refine_gap_floods", "refine_voxels_filled"):
            assert c1.get(k) == c0.get(k), k


def test_refine_options_need_refine(crop_file, tmp_path):
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--set", "refine.gap_min_core=5")
    assert r.returncode == 2 and "need --refine" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--refine", "--refine-model", "hand", "--set",
            "refine.steps=['watershed', 'magic']")
    assert r.returncode == 2 and "'magic' is not a step" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--refine", "--refine-model", "hand", "--set", "dust_size=100")
    assert r.returncode == 2 and "rejoin" in r.stderr and "dust_size" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--refine", "--refine-model", "hand", "--block", "32,64,64",
            "--set", "refine.tile=[16,16,16]")  # with blocks, the tiles are the blocks
    assert r.returncode == 2 and "refine.tile=16,16,16" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--refine", "--refine-model", "hand", "--block", "32,64,64",
            "--set", "split_components=true")
    assert r.returncode == 2 and "rejoin" in r.stderr and len(r.stderr.splitlines()) == 1
    r = ffn("segment", f"{crop_file}:raw", f"{tmp_path / 'o.h5'}:seg", "-q", "--refine", "--refine-model", "hand", "--set",
            "refine.halo=[1,2]")
    assert r.returncode == 2 and "halo" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "o.h5").exists()
