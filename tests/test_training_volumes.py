"""Several training volumes (`--image/--labels` repeated, `--volume-weights`) and fine-tuning
(`--init PATH|bundled`): sampling proportions, per-volume normalisation, geometry from the parent
model and its record, exact resume with two volumes, input errors, DDP under mpiexec."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from ddp_helpers import train_on_two_ranks
from floodfilling.cli import main
from floodfilling.model import bundled_model_path, load_model
from floodfilling.testing import voronoi_volume
from floodfilling.training.examples import Geometry
from floodfilling.training.options import TrainError, TrainOptions, TrainVolume, check_options
from floodfilling.training.train import read_metrics, resolve_architecture, train
from floodfilling.training.volumes import (BLOCK, LoadedVolume, VolumeMix, load_volumes, mixed_source,
                                           probabilities)

TINY = dict(depth=1, features=4, fov=(7, 7, 7), deltas=(2, 2, 2), min_size=200, threads=1, device="cpu",
            tensorboard=False)
TINY_FLAGS = ["--depth", "1", "--features", "4", "--fov", "7", "--deltas", "2", "--min-size", "200", "--threads",
              "1", "--device", "cpu", "-q", "--no-tensorboard"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two volumes of different shapes and very different intensities (uint8 ~ 150 / std 45 and
    float32 ~ 6000 / std 900), and a label volume of another shape."""
    d = tmp_path_factory.mktemp("two_volumes")
    raw_a, lab_a = voronoi_volume()
    raw_b, lab_b = voronoi_volume(shape=(24, 28, 30), n=8, seed=5)
    with h5py.File(d / "a.h5", "w") as f:
        f["raw"], f["labels"] = raw_a, lab_a
    with h5py.File(d / "b.h5", "w") as f:
        f["raw"] = raw_b.astype(np.float32) * 20 + 3000
        f["labels"] = lab_b
        f["labels_short"] = lab_b[:10]
    return d


def vols(d, **kw):
    return (TrainVolume(f"{d}/a.h5:raw", f"{d}/a.h5:labels", **kw.get("a", {})),
            TrainVolume(f"{d}/b.h5:raw", f"{d}/b.h5:labels", **kw.get("b", {})))


# -- sampling ----------------------------------------------------------------------------------

def _stub(n_coords, weight=None):
    return LoadedVolume(np.zeros(1), np.zeros(1), np.zeros((n_coords, 3), np.int64), 0.0, 1.0, [],
                        {"weight": weight})


@pytest.mark.parametrize("loaded, p0", [([_stub(100), _stub(300)], 0.25),  # by coordinates, 1:3
                                        ([_stub(100, 3.0), _stub(300, 1.0)], 0.75)])  # explicit weights 3:1
def test_two_volume_sampling_proportions(loaded, p0):
    p = probabilities(loaded)
    assert p.tolist() == pytest.approx([p0, 1 - p0])
    mix = VolumeMix(p, seed=7)
    n = 2000
    draws = [mix.draw(g) for g in range(n)]
    frac = sum(v == 0 for v, _ in draws) / n
    tol = 4 * np.sqrt(p0 * (1 - p0) / n)  # 4 binomial standard deviations (0.039 for p0 = 0.25)
    assert abs(frac - p0) < tol, (frac, p0, tol)
    assert 0 < frac < 1


def test_volume_mix_uses_each_list_in_order_and_splits_it_over_ranks():
    mix = VolumeMix([0.25, 0.75], seed=3)
    n = 2 * BLOCK + 100  # across two block boundaries
    draws = [mix.draw(g) for g in range(n)]
    for v in (0, 1):  # each volume's coordinates 0, 1, 2, ... in draw order: none skipped, none twice
        js = [j for w, j in draws if w == v]
        assert js == list(range(len(js)))
    fresh = VolumeMix([0.25, 0.75], seed=3)  # a resumed run: draw g out of order, without the earlier ones
    assert [fresh.draw(g) for g in (n - 1, BLOCK + 5, 17)] == [draws[n - 1], draws[BLOCK + 5], draws[17]]
    other = VolumeMix([0.25, 0.75], seed=4)
    assert [other.draw(g) for g in range(50)] != draws[:50]  # the seed matters
    one = VolumeMix([1.0], seed=3)
    assert [one.draw(g) for g in range(5)] == [(0, g) for g in range(5)]  # one volume: coordinate g, as before

    class Src:  # stand-in ExampleSource: returns what it was asked for
        geometry = Geometry((5, 5, 5), (1, 1, 1))

        def __init__(self, n):
            self.coords = np.zeros((n, 3))

        def patch(self, i, g):
            return i, g

    from floodfilling.training.volumes import MixedSource

    srcs = [Src(10), Src(1000)]
    whole = MixedSource(srcs, [0.25, 0.75], seed=3)
    ranks = [MixedSource(srcs, [0.25, 0.75], seed=3, rank=r, world=3) for r in range(3)]
    for k in range(30):
        for r in range(3):  # rank r's example k is draw 3k + r of the one list: ranks never share a coordinate
            assert ranks[r].volume_index(k) == whole.volume_index(3 * k + r)
            assert ranks[r].example(k)[1] == 3 * k + r  # augmentation of draw g
    assert {whole.volume_index(k)[1] for k in range(200) if whole.volume_index(k)[0] == 0} == set(range(10))  # mod 10


# -- per-volume normalisation -------------------------------------------------------------------

def test_each_example_is_normalised_by_its_own_volume(two):
    opts = replace(check_options(TrainOptions(out="x", volumes=vols(two, b={"image_mean": 2000.0, "image_std": 50.0}),
                                              **TINY)), seed=1)
    loaded = load_volumes(opts)
    raws = [h5py.File(two / f"{n}.h5")["raw"][...].astype(np.float64) for n in "ab"]
    assert loaded[0].mean == pytest.approx(raws[0].mean()) and loaded[0].std == pytest.approx(raws[0].std())
    assert (loaded[1].mean, loaded[1].std) == (2000.0, 50.0)  # given: not measured
    stats = [(raws[0].mean(), raws[0].std()), (2000.0, 50.0)]
    g = Geometry(opts.fov, opts.deltas)
    src = mixed_source(loaded, g, seed=1, rank=0, world=1, augment=False)
    seen = set()
    for k in range(60):
        v, j = src.volume_index(k)
        seen.add(v)
        c = loaded[v].coords[j]
        sl = tuple(slice(int(a) - m, int(a) + m + 1) for a, m in zip(c, g.margin))
        want = (raws[v][sl] - stats[v][0]) / stats[v][1]
        img, _ = src.example(k)
        np.testing.assert_allclose(img, want, rtol=1e-5, atol=1e-4)
    assert seen == {0, 1}
    # without the override, volume b (mean ~6000) is measured too: both inputs are centred
    loaded = load_volumes(replace(check_options(TrainOptions(out="x", volumes=vols(two), **TINY)), seed=1))
    assert loaded[1].mean == pytest.approx(raws[1].mean()) and loaded[1].mean > 5000
    assert all(abs(float(lv.image.mean())) < 1e-3 and abs(float(lv.image.std()) - 1) < 1e-3 for lv in loaded)
    p = [lv.info["probability"] for lv in loaded]
    n = [len(lv.coords) for lv in loaded]
    assert p == pytest.approx([n[0] / sum(n), n[1] / sum(n)])


# -- --init --------------------------------------------------------------------------------------

def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("ffn: error:") and err.count("\n") == 1, err
    return err


def test_init_bundled_takes_its_geometry_and_conflicts_are_errors(two, tmp_path, capsys):
    opts, net, parent = resolve_architecture(TrainOptions(image="a", labels="b", out="x", init="bundled"))
    assert (opts.depth, opts.features, opts.fov, opts.deltas) == (12, 32, (33, 33, 33), (8, 8, 8))
    assert net.depth == 12 and parent["model"] == "bundled"
    assert parent["sha256"] == hashlib.sha256(bundled_model_path().read_bytes()).hexdigest()
    assert parent["intensity"] == {"mean": 128.0, "std": 33.0}
    base = ["train", "--image", f"{two}/a.h5:raw", "--labels", f"{two}/a.h5:labels", "--out", str(tmp_path / "r"),
            "-q", "--init", "bundled"]
    assert main([*base, "--depth", "2"]) == 2
    e = _err(capsys)
    assert "--init bundled: the model has depth 12, but --depth 2 was requested (another architecture" in e
    assert main([*base, "--fov", "7"]) == 2
    assert "--init bundled: the model has fov 33,33,33, but --fov 7,7,7" in _err(capsys)
    assert main([*base, "--features", "32", "--deltas", "8"]) == 2  # agreeing values are fine: the volume is small
    assert "does not fit in the volume" in _err(capsys)
    assert not (tmp_path / "r").exists()
    assert main(["train", "--image", "a.h5:raw", "--labels", "a.h5:lab", "--out", str(tmp_path / "r"),
                 "--init", str(tmp_path / "nope.npz")]) == 2
    assert "--init " + str(tmp_path / "nope.npz") in _err(capsys)


def test_init_bundled_run_records_parent_and_statistics(tmp_path):
    raw, labels = voronoi_volume(shape=(50, 50, 50), n=5, seed=2)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f["raw"], f["labels"] = raw, labels
    assert main(["train", "--image", f"{tmp_path}/big.h5:raw", "--labels", f"{tmp_path}/big.h5:labels", "--out",
                 str(tmp_path / "ft"), "--init", "bundled", "--max-steps", "0", "--min-size", "1000", "-q",
                 "--no-tensorboard", "--device", "cpu", "--threads", "1"]) == 0
    net, info = load_model(tmp_path / "ft")  # what `ffn segment --model RUN/` loads
    ref, _ = load_model(None)
    assert (info.depth, info.fov_zyx, info.deltas_zyx) == (12, (33, 33, 33), (8, 8, 8))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    tr = info.meta["training"]
    assert tr["init"]["model"] == "bundled"
    assert tr["init"]["sha256"] == hashlib.sha256(bundled_model_path().read_bytes()).hexdigest()
    r = raw.astype(np.float64)
    assert info.image_mean == pytest.approx(r.mean()) and info.image_std == pytest.approx(r.std())
    assert [(v["mean"], v["std"]) for v in tr["volumes"]] == [(info.image_mean, info.image_std)]


def test_init_path_recorded_and_resume_needs_the_same_parent(two, tmp_path):
    a = tmp_path / "a"
    train(TrainOptions(image=f"{two}/a.h5:raw", labels=f"{two}/a.h5:labels", out=str(a), max_steps=1, **TINY))
    geo = {k: TINY[k] for k in ("depth", "features", "fov", "deltas")}
    rest = {k: v for k, v in TINY.items() if k not in geo}
    ft = TrainOptions(image=f"{two}/a.h5:raw", labels=f"{two}/a.h5:labels", out=str(tmp_path / "b"), max_steps=0,
                      init=str(a), **rest)
    train(ft)
    info = load_model(tmp_path / "b")[1]
    parent = info.meta["training"]["init"]
    assert parent["model"] == str(a) and parent["file"] == str(a / "checkpoint" / "model.npz")
    assert parent["sha256"] == hashlib.sha256((a / "checkpoint" / "model.npz").read_bytes()).hexdigest()
    with pytest.raises(TrainError, match="fine-tuned from the model with sha256 [0-9a-f]{64}, this run from none"):
        train(replace(ft, init=None, resume=True, **geo))
    assert train(replace(ft, resume=True)).steps == 0  # the same parent: fine


# -- two volumes end to end ------------------------------------------------------------------------

def _state(run):
    return torch.load(run / "checkpoint" / "state.pt", weights_only=False)


def test_two_volume_stop_and_resume_is_exact(two, tmp_path):
    prep = tmp_path / "prep_b.h5"
    assert main(["prepare", f"{two}/b.h5:labels", str(prep), "--radius", "5", "--min-size", "200"]) == 0
    flags = ["--image", f"{two}/a.h5:raw", "--labels", f"{two}/a.h5:labels", "--image", f"{two}/b.h5:raw",
             "--labels", f"{two}/b.h5:labels", *TINY_FLAGS, "--batch", "2", "--optimizer", "adam", "--lr", "0.01",
             "--log-every", "4", "--checkpoint-every", "0", "--seed", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *flags, "--out", str(ref), "--max-steps", "12"]) == 0
    assert main(["train", *flags, "--out", str(run), "--max-steps", "5"]) == 0  # stopped at step 5 ...
    assert main(["train", *flags, "--out", str(run), "--max-steps", "12", "--resume"]) == 0  # ... resumed to 12
    a, b = _state(ref), _state(run)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = read_metrics(ref / "metrics.csv"), read_metrics(run / "metrics.csv")
    assert [r["step"] for r in ra] == [4, 8, 12] and [r["step"] for r in rb] == [4, 5, 8, 12]  # 5: where it stopped
    assert ra[-1]["loss"] == rb[-1]["loss"] and ra[0]["loss"] == rb[0]["loss"]  # steps 9-12, 1-4
    vols_meta = a["meta"]["training"]["volumes"]
    assert [v["image"] for v in vols_meta] == [f"{two}/a.h5:raw", f"{two}/b.h5:raw"]
    assert sum(v["probability"] for v in vols_meta) == pytest.approx(1.0)
    mix = VolumeMix([v["probability"] for v in vols_meta], seed=2)
    assert {mix.draw(g)[0] for g in range(8)} == {0, 1}  # both volumes were trained on from the first steps
    assert a["resume_key"]["volumes"][1][:2] == [f"{two}/b.h5:raw", f"{two}/b.h5:labels"]
    # another weighting (or another list of volumes) is another set-up: no resume
    assert main(["train", *flags, "--out", str(run), "--max-steps", "14", "--resume", "--volume-weights", "1,1"]) == 2
    # weights and a coordinates file per volume
    w = tmp_path / "w"
    assert main(["train", *flags, "--out", str(w), "--max-steps", "1", "--volume-weights", "1,3", "--coords",
                 str(prep) + ":coords", "--coords", str(prep)]) == 2  # prep is b's (another shape)
    assert main(["prepare", f"{two}/a.h5:labels", str(tmp_path / "prep_a.h5"), "--radius", "5", "--min-size",
                 "200"]) == 0
    assert main(["train", *flags, "--out", str(w), "--max-steps", "1", "--volume-weights", "1,3", "--coords",
                 str(tmp_path / "prep_a.h5"), "--coords", str(prep)]) == 0
    vm = load_model(w)[1].meta["training"]["volumes"]
    assert [v["probability"] for v in vm] == [0.25, 0.75] and [v["weight"] for v in vm] == [1.0, 3.0]
    assert vm[1]["coords"]["source"] == str(prep)


def test_several_volume_input_errors(two, tmp_path, capsys):
    a = ["--image", f"{two}/a.h5:raw", "--labels", f"{two}/a.h5:labels"]
    base = ["train", "--out", str(tmp_path / "x"), *TINY_FLAGS, "--max-steps", "1", *a]
    assert main([*base, "--image", f"{two}/b.h5:raw"]) == 2
    assert "--image given 2 time(s) but --labels 1: give them in pairs" in _err(capsys)
    b = ["--image", f"{two}/b.h5:raw", "--labels", f"{two}/b.h5:labels"]
    assert main([*base, *b, "--coords", "p.h5"]) == 2
    assert "--coords given 1 time(s) for 2 training volumes" in _err(capsys)
    assert main([*base, *b, "--image-std", "3"]) == 2
    assert "--image-std given 1 time(s)" in _err(capsys)
    assert main([*base, *b, "--volume-weights", "1"]) == 2
    assert "--volume-weights 1.0: 1 weight(s) for 2 training volumes" in _err(capsys)
    assert main([*base, *b, "--volume-weights", "1,0"]) == 2
    assert f"--volume-weights 0.0: expected a finite number > 0 (volume 2 of 2, --image {two}/b.h5:raw)" in \
        _err(capsys)
    assert main([*base, "--image", f"{two}/b.h5:raw", "--labels", f"{two}/b.h5:labels_short"]) == 2
    e = _err(capsys)
    assert f"--image {two}/b.h5:raw has shape (24, 28, 30) but --labels {two}/b.h5:labels_short have shape " \
           "(10, 28, 30) (volume 2 of 2)" in e
    assert not (tmp_path / "x").exists()
    with pytest.raises(TrainError, match="either as image/labels/coords/image_mean/image_std .* or as volumes"):
        check_options(TrainOptions(image="a.h5:raw", out="x", volumes=vols(two)))
    with pytest.raises(TrainError, match="give every volume a weight, or none"):
        check_options(TrainOptions(out="x", volumes=vols(two, a={"weight": 2.0})))
    with pytest.raises(TrainError, match="image=None: a training image is required"):
        check_options(TrainOptions(out="x"))


@pytest.mark.mpi
def test_ddp_two_volumes(two, tmp_path):
    out, a = train_on_two_ranks(tmp_path, f"""
        vols = (TrainVolume("{two}/a.h5:raw", "{two}/a.h5:labels", weight=1.0),
                TrainVolume("{two}/b.h5:raw", "{two}/b.h5:labels", weight=1.0))
        res = train(TrainOptions(out=out, volumes=vols, depth=1, features=4, fov=(7, 7, 7), deltas=(2, 2, 2),
                                 batch=2, max_steps=4, log_every=2, min_size=200, checkpoint_every=2, threads=1,
                                 optimizer="adam", lr=0.01, device="cpu", tensorboard=False))
    """)
    st = _state(out)
    assert st["step"] == 4 and len(st["ranks"]) == 2 and st["resume_key"]["world"] == 2
    assert [v["probability"] for v in st["meta"]["training"]["volumes"]] == [0.5, 0.5]
    for k in a:
        assert torch.equal(a[k], st["model"][k])
