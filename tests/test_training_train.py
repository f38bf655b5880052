"""`ffn train`: a tiny run end to end, the trained model in inference, SIGKILL + resume,
bad inputs, learning-rate schedule, DDP under mpiexec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddp_helpers import train_on_two_ranks
from floodfilling.cli import main
from floodfilling.model import load_model
from floodfilling.testing import voronoi_volume
from floodfilling.training.train import TrainOptions, learning_rate, read_metrics, train

TINY = ["--depth", "1", "--features", "4", "--fov", "7", "--deltas", "2", "--min-size", "200", "--threads", "1",
        "--device", "cpu", "-q", "--no-tensorboard"]


synthetic = voronoi_volume


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    raw, labels = synthetic()
    with h5py.File(d / "vol.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
        f["labels_small"] = labels[:20]
        f["raw_tiny"] = raw[:8, :8, :8]
        f["labels_tiny"] = labels[:8, :8, :8]
    return d / "vol.h5"


def args_for(data, out, *extra):
    return ["train", "--image", f"{data}:raw", "--labels", f"{data}:labels", "--out", str(out), *TINY, *extra]


def test_tiny_run_and_inference(data, tmp_path):
    from floodfilling.config import InferenceConfig
    from floodfilling.inference.segment import segment_array

    out = tmp_path / "run"
    assert main(args_for(data, out, "--max-steps", "12", "--batch", "2", "--log-every", "4", "--optimizer", "adam",
                         "--lr", "0.01")) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(np.isfinite(r["loss"]) and 0 <= r["recall"] <= 1 for r in rows)
    assert {"precision", "f1", "moves_per_sequence", "fov_per_s"} <= set(rows[0])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net, info = load_model(out / "checkpoint")
    assert (info.depth, info.features, info.fov_zyx, info.deltas_zyx) == (1, 4, (7, 7, 7), (2, 2, 2))
    raw = h5py.File(data, "r")["raw"][...]
    assert info.image_mean == pytest.approx(raw.mean()) and info.image_std == pytest.approx(raw.std())
    assert len(info.intensity_quantiles) == 101 and info.intensity_quantiles[0] == raw.min()
    assert info.meta["trained_steps"] == 12
    st = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, st["model"][k])
    assert {"torch", "numpy", "python"} <= set(st["ranks"][0]["rng"])
    # the checkpoint segments a crop with its own geometry and intensity statistics
    res = segment_array(raw[:20, :20, :20], config=InferenceConfig(device="cpu", min_segment_size=10),
                        net_and_info=(net, info))
    assert res.segmentation.shape == (20, 20, 20) and res.segmentation.dtype == np.uint32


def test_api_coords_file_and_existing_checkpoint(data, tmp_path):
    prep = tmp_path / "prep.h5"
    assert main(["prepare", f"{data}:labels", str(prep), "--radius", "5", "--min-size", "200"]) == 0
    opts = TrainOptions(image=f"{data}:raw", labels=f"{data}:labels", out=str(tmp_path / "r"), coords=str(prep),
                        depth=1, features=4, fov=(7, 7, 7), deltas=(2, 2, 2), batch=2, max_steps=3, threads=1,
                        device="cpu", tensorboard=False)
    res = train(opts)
    assert res.steps == 3 and res.net is not None and res.fov_per_s > 0
    assert load_model(tmp_path / "r" / "checkpoint")[1].meta["training"]["coords"]["source"] == str(prep)
    with pytest.raises(ValueError, match="holds a checkpoint; pass resume=True"):
        train(opts)
    # resume of a finished run: nothing to do, same weights
    again = train(TrainOptions(**{**opts.__dict__, "resume": True}))
    assert again.steps == 3
    for k, v in res.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k])


def test_kept_models_equal_the_checkpoints_of_shorter_runs(data, tmp_path):
    """--keep-every 2 keeps the weights of steps 2, 4, 6 under models/; each is the model of a
    run stopped at that step (same seed), and the last is the checkpoint's; a kept file loads
    as a model (segment --model models/model-STEP.npz)."""
    common = ["--batch", "2", "--optimizer", "sgd", "--lr", "0.01", "--seed", "3"]
    assert main(args_for(data, tmp_path / "long", "--max-steps", "6", "--keep-every", "2", *common)) == 0
    kept = sorted(p.name for p in (tmp_path / "long" / "models").iterdir())
    assert kept == ["model-0000002.npz", "model-0000004.npz", "model-0000006.npz"]
    assert main(args_for(data, tmp_path / "short", "--max-steps", "4", *common)) == 0
    for got, want in (("model-0000004.npz", tmp_path / "short" / "checkpoint"),
                      ("model-0000006.npz", tmp_path / "long" / "checkpoint")):
        net, info = load_model(tmp_path / "long" / "models" / got)
        ref = load_model(want)[0]
        assert info.meta["trained_steps"] == int(got[6:13])
        for k, v in net.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), (got, k)
    assert main(args_for(data, tmp_path / "bad", "--max-steps", "2", "--keep-every", "-1")) == 2


def _params(path):
    return torch.load(Path(path) / "checkpoint" / "state.pt", weights_only=False)


def test_sigkill_and_resume_is_exact(data, tmp_path):
    common = ["--max-steps", "300", "--batch", "3", "--log-every", "50", "--optimizer", "adam", "--lr", "0.003",
              "--checkpoint-every", "5", "--seed", "4"]
    ref = tmp_path / "ref"
    assert main(args_for(data, ref, *common)) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "floodfilling.cli", *args_for(data, run, *common)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = _params(run)["step"]
    assert 0 < killed_at < 300
    assert main(args_for(data, run, *common, "--resume")) == 0
    a, b = _params(ref), _params(run)
    assert b["step"] == 300
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = read_metrics(ref / "metrics.csv"), read_metrics(run / "metrics.csv")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("ffn: error:") and err.count("\n") == 1, err
    return err


def test_bad_inputs(data, tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "x"), *TINY, "--max-steps", "2"]
    # image and labels of different shapes
    assert main([*base, "--image", f"{data}:raw", "--labels", f"{data}:labels_small"]) == 2
    assert "has shape (30, 32, 34) but --labels" in (e := _err(capsys)) and f"--image {data}:raw" in e
    # no object above --min-size
    assert main([*base, "--image", f"{data}:raw", "--labels", f"{data}:labels", "--min-size", "1000000"]) == 2
    assert "no object has >= 1000000 voxels" in _err(capsys)
    # FOV (+ 2 deltas) larger than the volume
    assert main([*base, "--image", f"{data}:raw_tiny", "--labels", f"{data}:labels_tiny"]) == 2
    assert "does not fit in the volume" in _err(capsys)
    assert main([*base, "--image", f"{data}:raw", "--labels", f"{data}:labels", "--fov", "8"]) == 2
    assert "odd" in _err(capsys)
    # a checkpoint from another architecture
    out = tmp_path / "arch"
    assert main(args_for(data, out, "--max-steps", "2")) == 0
    assert main([*args_for(data, out, "--max-steps", "4", "--resume"), "--depth", "2"]) == 2
    assert "depth 1" in (e := _err(capsys)) and "--depth 2" in e and "another architecture" in e
    # --init with a model of another architecture (4 features, 8 requested)
    assert main([*args_for(data, tmp_path / "init", "--init", str(out / "checkpoint")), "--features", "8"]) == 2
    assert "another architecture" in _err(capsys)
    # missing coordinates file
    assert main([*args_for(data, tmp_path / "c", "--coords", str(tmp_path / "nope.h5"))]) == 2
    assert "no such file" in _err(capsys)


def test_init_from_checkpoint_takes_geometry(data, tmp_path):
    out = tmp_path / "a"
    assert main(args_for(data, out, "--max-steps", "2")) == 0
    res = train(TrainOptions(image=f"{data}:raw", labels=f"{data}:labels", out=str(tmp_path / "b"),
                             init=str(out / "checkpoint"), max_steps=0, min_size=200, threads=1, device="cpu",
                             tensorboard=False))
    net, info = load_model(tmp_path / "b" / "checkpoint")
    assert (info.depth, info.features, info.fov_zyx) == (1, 4, (7, 7, 7))
    ref, _ = load_model(out / "checkpoint")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    assert res.steps == 0


def test_learning_rate_schedule():
    o = TrainOptions(image="", labels="", out="", lr=0.01, lr_scaling="linear", warmup_steps=10)
    assert learning_rate(o, 0, 4) == pytest.approx(0.01)
    assert learning_rate(o, 5, 4) == pytest.approx(0.025)
    assert learning_rate(o, 10, 4) == pytest.approx(0.04) == learning_rate(o, 1000, 4)
    o.lr_scaling = "sqrt"
    assert learning_rate(o, 50, 4) == pytest.approx(0.02)
    o.lr_scaling = "none"
    assert learning_rate(o, 50, 4) == pytest.approx(0.01)
    assert learning_rate(o, 0, 1) == pytest.approx(0.01)


@pytest.mark.mpi
def test_ddp_two_ranks_stay_identical(data, tmp_path):
    out, a = train_on_two_ranks(tmp_path, f"""
        res = train(TrainOptions(image="{data}:raw", labels="{data}:labels", out=out, depth=1, features=4,
                                 fov=(7, 7, 7), deltas=(2, 2, 2), batch=2, max_steps=6, log_every=3, min_size=200,
                                 checkpoint_every=3, threads=1, optimizer="adam", lr=0.01, device="cpu",
                                 lr_scaling="linear", tensorboard=False, val_image="{data}:raw",
                                 val_labels="{data}:labels", val_every=3, val_sequences=5, val_min_size=200))
    """)
    st = _params(out)
    assert st["step"] == 6 and len(st["ranks"]) == 2 and st["resume_key"]["world"] == 2
    rows = read_metrics(out / "metrics.csv")  # validation ran on both ranks (5 sequences: 3 + 2)
    assert [r["step"] for r in rows if np.isfinite(r["val_loss"])] == [3.0, 6.0]
    from floodfilling.model import ConvStack3D as _Net
    from floodfilling.training.examples import ExampleSource, ExampleStream, Geometry, run_sequences
    from floodfilling.training.train import VAL_SEED, load_validation

    net = _Net(1, 4)
    net.load_state_dict(a)
    g = Geometry((7, 7, 7), (2, 2, 2))
    v = load_validation(TrainOptions(image="", labels="", out="", val_image=f"{data}:raw",
                                     val_labels=f"{data}:labels", val_sequences=5, val_min_size=200), g)
    one = run_sequences(net, ExampleStream(ExampleSource(v.image, v.labels, v.coords, g, seed=VAL_SEED,
                                                         augment=False), 1, max_examples=5)).summary()
    assert rows[-1]["val_loss"] == pytest.approx(one["loss"], rel=1e-4)  # both ranks' shards were summed
    for k in a:
        assert torch.equal(a[k], st["model"][k])
    from floodfilling.model import ConvStack3D

    torch.manual_seed(0)
    init = ConvStack3D(1, 4).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)  # it trained
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["examples"] == 12 and rows[0]["lr"] == pytest.approx(0.02)
    # the two ranks drew different coordinates: their stream states differ
    s0, s1 = st["ranks"][0]["stream"], st["ranks"][1]["stream"]
    assert any(not np.array_equal(x["canvas"], y["canvas"]) for x, y in zip(s0["slots"], s1["slots"]) if x and y)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("val_data")
    raw, labels = synthetic(shape=(24, 28, 30), n=8, seed=5)
    with h5py.File(d / "val.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
        f["labels_short"] = labels[:10]
    return d / "val.h5"


def test_validation_rows_are_exact_and_do_not_change_training(data, val_data, tmp_path):
    from floodfilling.training.examples import Counts, ExampleSource, ExampleStream, Geometry, run_sequences
    from floodfilling.training.train import VAL_SEED, load_validation

    common = ["--max-steps", "20", "--batch", "2", "--log-every", "5", "--optimizer", "adam", "--lr", "0.01",
              "--checkpoint-every", "0", "--seed", "3"]
    val = ["--val-image", f"{val_data}:raw", "--val-labels", f"{val_data}:labels", "--val-every", "10",
           "--val-sequences", "12", "--val-min-size", "100"]
    assert main(args_for(data, tmp_path / "plain", *common)) == 0
    assert main(args_for(data, tmp_path / "val", *common, *val)) == 0
    a, b = _params(tmp_path / "plain"), _params(tmp_path / "val")
    for k in a["model"]:  # validation draws nothing from the training's random streams
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = read_metrics(tmp_path / "val" / "metrics.csv")
    with_val = [r for r in rows if np.isfinite(r["val_f1"]) or np.isfinite(r["val_loss"])]
    assert [r["step"] for r in with_val] == [10.0, 20.0]
    assert all(np.isnan(r["val_loss"]) for r in read_metrics(tmp_path / "plain" / "metrics.csv"))
    # the last validation, recomputed independently from the saved model
    net, _ = load_model(str(tmp_path / "val" / "checkpoint"), "cpu")
    opts = TrainOptions(image="", labels="", out="", val_image=f"{val_data}:raw", val_labels=f"{val_data}:labels",
                        val_sequences=12, val_min_size=100)
    geometry = Geometry((7, 7, 7), (2, 2, 2))
    v = load_validation(opts, geometry)
    src = ExampleSource(v.image, v.labels, v.coords, geometry, seed=VAL_SEED, augment=False)
    s = run_sequences(net, ExampleStream(src, 2, max_examples=12)).summary()
    assert s["sequences"] == 12
    for k in ("loss", "precision", "recall", "f1"):
        assert with_val[-1][f"val_{k}"] == pytest.approx(s[k], rel=1e-5), k
    # rank shards (r, r + world, ...) add up to the same sequences as one process
    shards = [run_sequences(net, ExampleStream(ExampleSource(v.image, v.labels, v.coords, geometry, seed=VAL_SEED,
                                                              rank=r, world=3, augment=False), 1,
                                                max_examples=len(range(r, 12, 3)))) for r in range(3)]
    whole = run_sequences(net, ExampleStream(src, 1, max_examples=12))
    assert np.array_equal(sum(c.vector() for c in shards), whole.vector())
    assert isinstance(whole, Counts)


def test_validation_bad_inputs(data, val_data, tmp_path, capsys):
    def err(*extra):
        assert main(args_for(data, tmp_path / "x", "--max-steps", "1", *extra)) == 2
        return capsys.readouterr().err

    assert "needs --val-labels LABELS too (the two go together)" in err("--val-image", f"{val_data}:raw")
    assert "have shape (10, 28, 30)" in err("--val-image", f"{val_data}:raw", "--val-labels", f"{val_data}:labels_short")
    assert "--val-labels" in err("--val-image", f"{val_data}:raw", "--val-labels", f"{val_data}:labels",
                                 "--val-min-size", "100000")
    assert "--val-sequences 0" in err("--val-image", f"{val_data}:raw", "--val-labels", f"{val_data}:labels",
                                      "--val-sequences", "0")
