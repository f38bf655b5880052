"""The learned refinement (issue 29): contact features against hand-computed values, the merge
order against a brute-force reference, training determinism, the model file, the commands."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from floodfilling.inference import contacts
from floodfilling.inference.agglomeration import agglomerate, apply_lut
from floodfilling.inference.contacts import FEATURES, contact_graph, features

F = {n: i for i, n in enumerate(FEATURES)}


def _edge(g, a, b):
    k = [tuple(p) for p in g.pairs.tolist()].index((a, b))
    return dict(zip(contacts.EDGE_STATS, g.edge_stats[k]))


def _node(g, i):
    return dict(zip(contacts.NODE_STATS, g.node_stats[list(g.ids).index(i)]))


# a 1 x 2 x 3 volume; faces (6-neighbours): along x (1|2) at row 0, (1|3) and (3|2) at row 1;
# along y (1|3) in column 1
SEG = np.array([[[1, 1, 2], [1, 3, 2]]], np.uint32)
IMG = np.array([[[0.5, -1.0, 2.0], [1.0, -0.5, 0.25]]], np.float32)


def test_contact_statistics_hand_computed():
    g = contact_graph(SEG, IMG, overlaps={3: ([1, 0], [5, 9]), 1: ([3], [2])}, smooth_sigma=0)
    assert g.ids.tolist() == [1, 2, 3]
    assert g.pairs.tolist() == [[1, 2], [1, 3], [2, 3]]
    e12, e13, e23 = _edge(g, 1, 2), _edge(g, 1, 3), _edge(g, 2, 3)
    # (1,2): one face, voxels -1.0 | 2.0
    assert (e12["faces"], e12["lo_sum"], e12["hi_sum"]) == (1, -1.0, 2.0)
    # (1,3): faces 1.0 | -0.5 (x) and -1.0 | -0.5 (y): darker sides -0.5, -1.0; brighter 1.0, -0.5
    assert (e13["faces"], e13["lo_sum"], e13["lo_sum2"], e13["hi_sum"]) == (2, -1.5, 1.25, 0.5)
    assert [e13[f"lo_below_{t:g}"] for t in contacts.CONTACT_BINS] == [0, 0, 1, 2, 2]  # strict "<"
    assert (e23["faces"], e23["lo_sum"], e23["hi_sum"]) == (1, -0.5, 0.25)
    assert e13["slo_sum"] == e13["lo_sum"]  # not smoothed
    # overlaps: 3 ran 5 voxels into 1, 1 ran 2 into 3 (0 is no object)
    assert (e13["overlap"], e12["overlap"], e23["overlap"]) == (7, 0, 0)
    n1, n2, n3 = _node(g, 1), _node(g, 2), _node(g, 3)
    assert (n1["voxels"], n1["sum"], n1["sum2"], n1["dark"], n1["surface"]) == (3, 0.5, 2.25, 0, 3)
    assert (n2["voxels"], n2["sum"], n2["sum2"], n2["surface"]) == (2, 2.25, 4.0625, 2)
    assert (n3["voxels"], n3["sum"], n3["surface"]) == (1, -0.5, 3)
    # features of (1, 3): the smaller object is 3
    k = g.pairs.tolist().index([1, 3])
    x = features(g.edge_stats[k], g.node_stats[0], g.node_stats[2])[0]
    want = {"log_faces": math.log(3), "contact_mean": -0.75, "contact_std": 0.25, "contact_bright_mean": 0.25,
            "contact_below_-0.5": 0.5, "contact_below_0": 1.0, "log_size_small": math.log(2),
            "log_size_large": math.log(4), "mean_small": -0.5, "mean_large": 0.5 / 3, "std_small": 0.0,
            "std_large": math.sqrt(2.25 / 3 - (0.5 / 3) ** 2), "contact_of_surface_small": 2 / 3,
            "contact_of_surface_large": 2 / 3, "contact_per_size": 2.0, "mean_difference": 0.5 + 0.5 / 3,
            "overlap": 7.0}
    for name, v in want.items():
        assert x[F[name]] == pytest.approx(v, abs=1e-12), name
    # the same pair with the objects given the other way round: the same features
    assert np.array_equal(features(g.edge_stats[k], g.node_stats[2], g.node_stats[0])[0], x)
    assert x[F["flooded_small"]] == 1.0 and x[F["contact_flooded"]] == 1.0  # flooded: None = every object voxel
    # flooded voxels: the flood gave (0,0,0), (0,0,2), (0,1,0), (0,1,1); the watershed the rest
    fl = np.array([[[True, False, True], [True, True, False]]])
    h = contact_graph(SEG, IMG, None, 0, flooded=fl)
    assert [_node(h, i)["flooded"] for i in (1, 2, 3)] == [2, 1, 1]
    assert [_edge(h, *p)["flooded_faces"] for p in ((1, 2), (1, 3), (2, 3))] == [0, 1, 0]
    y = features(h.edge_stats[k], h.node_stats[0], h.node_stats[2])[0]
    assert (y[F["flooded_small"]], y[F["flooded_large"]], y[F["contact_flooded"]]) == (1.0, 2 / 3, 0.5)
    # no overlaps recorded: NaN
    assert np.isnan(features(contact_graph(SEG, IMG, None, 0).edge_stats[k], g.node_stats[0], g.node_stats[2])
                    [0, F["overlap"]])


@pytest.mark.parametrize("c", [0.5, -0.5])
def test_contact_hessian_statistics_hand_computed(c):
    """The Hessian statistics on images whose Hessian is known: I = c (x - 20)^2 (H = diag(0, 0,
    2c): a dark valley across x when c > 0, a bright ridge when c < 0) and the same valley turned
    45 degrees in (y, x), I = c ((x + y) / sqrt 2 - 20)^2 (H's (y, x) block c [[1, 1], [1, 1]]:
    eigenvalues 2c and 0, d2/dx2 = d2/dy2 = c). Objects: x < 20 | x >= 20 (faces along x) and
    y < 20 | y >= 20 (faces along y), in the middle of a 40^3 volume, away from its edges.
    scipy's Gaussian derivative of a sampled quadratic is 2c to within 1 % (sigma 1: 0.1 %)."""
    z, y, x = np.mgrid[:40, :40, :40].astype(np.float64)
    seg = np.zeros((40, 40, 40), np.int64)
    box = np.s_[10:30, 10:30, 10:30]
    seg[box] = 1 + (x[box] >= 20) + 2 * (y[box] >= 20)  # 1 2 / 3 4: (1,2), (3,4) along x; (1,3), (2,4) along y
    for image, sheet, across_x, across_y in ((c * (x - 20) ** 2, 2 * c, 2 * c, 0.0),
                                             (c * ((x + y) / np.sqrt(2) - 20) ** 2, 2 * c, c, c)):
        g = contact_graph(seg, image, None)
        for sigma in contacts.HESSIAN_SIGMAS:
            s2 = sigma ** 2
            for pair, across in (((1, 2), across_x), ((1, 3), across_y)):
                e = _edge(g, *pair)
                f = e["faces"]
                assert e[f"sheet_sum_s{sigma:g}"] / f == pytest.approx(max(sheet, 0.0) * s2, abs=0.01 * s2), pair
                assert e[f"across_sum_s{sigma:g}"] / f == pytest.approx(across * s2, abs=0.01 * s2), pair
                if sheet > 0:
                    assert e[f"sheet_pos_s{sigma:g}"] == f  # a sheet at every face
            k = g.pairs.tolist().index([1, 2])
            x12 = features(g.edge_stats[k], g.node_stats[0], g.node_stats[1])[0]
            e = _edge(g, 1, 2)
            assert x12[F[f"sheet_mean_s{sigma:g}"]] == e[f"sheet_sum_s{sigma:g}"] / e["faces"]
            assert x12[F[f"across_mean_s{sigma:g}"]] == e[f"across_sum_s{sigma:g}"] / e["faces"]
            assert x12[F[f"sheet_pos_s{sigma:g}"]] == e[f"sheet_pos_s{sigma:g}"] / e["faces"]


def _blobs(seed: int = 0):
    """Touching blobs: a 12^3 volume cut into 3 x 3 x 2 boxes (ids 1..18, some boxes split
    again), a dyadic image (sums exact in any order), overlaps between some neighbours."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((12, 12, 12), np.uint32)
    k = 0
    for z in range(3):
        for y in range(3):
            for x in range(2):
                k += 1
                seg[4 * z:4 * z + 4, 4 * y:4 * y + 4, 6 * x:6 * x + 6] = k
    xs = np.broadcast_to(np.arange(12)[None, None, :], seg.shape)
    seg[(seg == 5) & (xs % 6 < 2)] = 19
    image = (rng.integers(-8, 9, seg.shape) / 4.0).astype(np.float32)
    overlaps = {int(i): (np.array([int(i) + 1, int(i) + 2]), np.array([3, int(i) % 4])) for i in range(1, 19, 2)}
    return seg, image, overlaps


def _score(x: np.ndarray) -> np.ndarray:
    """A deterministic scorer of the features (brighter, larger, more overlapping contacts merge)."""
    return (0.5 + 0.2 * x[:, F["contact_mean"]] + 0.01 * x[:, F["log_faces"]] - 0.03 * x[:, F["log_size_small"]]
            + 0.05 * x[:, F["contact_of_surface_small"]] + 0.001 * np.nan_to_num(x[:, F["overlap"]]))


def _brute_force(seg, image, overlaps, threshold):
    """After each merge every feature is computed again from the merged volume; the best pair
    (ties: smallest ids) merges into the smaller id."""
    root = {}
    merges = []
    while True:
        def r(i):
            i = int(i)
            while i in root:
                i = root[i]
            return i

        cur = apply_lut(seg, {k: r(k) for k in root})
        ov = {}
        for k, (ids, vox) in overlaps.items():
            for j, v in zip(ids, vox):
                d = ov.setdefault(r(k), {})
                d[r(j)] = d.get(r(j), 0) + int(v)
        g = contact_graph(cur, image, {k: (np.array(list(d)), np.array(list(d.values()))) for k, d in ov.items()},
                          smooth_sigma=0)
        if not len(g.pairs):
            break
        idx = g.node_index()
        x = features(g.edge_stats, g.node_stats[[idx[int(a)] for a in g.pairs[:, 0]]],
                     g.node_stats[[idx[int(b)] for b in g.pairs[:, 1]]])
        p = _score(x)
        best = max(range(len(p)), key=lambda k: (p[k], -g.pairs[k, 0], -g.pairs[k, 1]))
        if p[best] < threshold:
            break
        a, b = (int(v) for v in g.pairs[best])
        root[b] = a
        merges.append((a, b))
    return merges, cur


@pytest.mark.parametrize("seed, threshold", [(0, 0.3), (1, 0.32), (2, 0.29)])
def test_merge_order_matches_brute_force(seed, threshold):
    seg, image, overlaps = _blobs(seed)
    want, want_seg = _brute_force(seg, image, overlaps, threshold)
    agg = agglomerate(contact_graph(seg, image, overlaps, smooth_sigma=0), _score, threshold)
    assert [(a, b) for a, b, _ in agg.merges] == want
    assert 3 <= len(want) < 18  # some merges, not all: the order is what is tested
    assert np.array_equal(apply_lut(seg, agg.lut), want_seg)


def test_gate_and_records():
    """A gate that refuses a pair leaves it unmerged; every scored batch is seen."""
    seg, image, overlaps = _blobs(0)
    seen = []
    agg = agglomerate(contact_graph(seg, image, overlaps, 0), _score, 0.0, gate=lambda a, b: (a + b) % 2 == 1,
                      on_score=lambda pairs, x: seen.append(len(pairs)))
    assert all((a + b) % 2 == 1 for a, b, _ in agg.merges) and agg.merges
    assert seen[0] == len(contact_graph(seg, image, None, 0).pairs) and len(seen) == len(agg.merges) + 1


# -- training and the model file --------------------------------------------------------------------

lgb = pytest.importorskip("lightgbm")
pytest.importorskip("skimage")

from floodfilling.inference import learned  # noqa: E402
from floodfilling.inference.train_refine import TrainUnit, train_model  # noqa: E402


def _unit(seed: int) -> TrainUnit:
    """A Voronoi volume; its 'flood' the cells' interiors, some cells cut in two, others missing."""
    from scipy import ndimage

    from floodfilling.testing import voronoi_volume

    raw, labels = voronoi_volume((24, 28, 30), n=14, seed=seed)
    flood = np.where(ndimage.binary_erosion(raw > 110, iterations=1), labels, 0).astype(np.uint32)
    cut = (flood % 3 == 0) & (np.arange(30)[None, None, :] % 10 < 5)
    flood = np.where(cut, flood + 100, flood).astype(np.uint32)
    flood[flood == 2] = 0
    image = ((raw.astype(np.float32) - 128) / 33).astype(np.float32)
    return TrainUnit(f"voronoi{seed}", image, flood, labels)


@pytest.mark.parametrize("base", ["watershed", "cores"])  # gap_cores: test_train_refine_then_segment
def test_training_is_deterministic(base):
    units = [_unit(0), _unit(1)]
    a = train_model(units, base, rounds=20).to_json()
    b = train_model(units, base, rounds=20).to_json()
    assert a == b
    assert json.loads(a)["training"]["examples"] > 0


def test_model_file_round_trip_and_errors(tmp_path):
    m = train_model([_unit(0)], "cores", rounds=10, threshold=0.6)
    path = tmp_path / "m.json"
    learned.save_refine_model(m, str(path))
    back = learned.load_refine_model(str(path))
    assert back.to_json() == m.to_json() and back.threshold == 0.6 and back.base == "cores"
    x = np.random.default_rng(0).normal(size=(7, len(FEATURES)))
    assert np.array_equal(back.predict(x), m.predict(x))
    from floodfilling.errors import VolumeError

    with pytest.raises(VolumeError, match="exists"):
        learned.save_refine_model(m, str(path), overwrite=False)
    good = json.loads(path.read_text())
    bad = {"notjson": "{garbage", "format": json.dumps({**good, "format": "other"}),
           "version": json.dumps({**good, "format_version": 99}),
           "features": json.dumps({**good, "features": good["features"][:-1]}),
           "base": json.dumps({**good, "base": "nope"}), "threshold": json.dumps({**good, "threshold": 2}),
           "booster": json.dumps({**good, "lightgbm": "tree\nnonsense=1\n"})}
    needles = {"notjson": "not JSON", "format": "not a refine model", "version": "format version 99",
               "features": "other features", "base": "base 'nope'", "threshold": "threshold 2",
               "booster": "LightGBM"}
    for name, text in bad.items():
        p = tmp_path / f"{name}.json"
        p.write_text(text)
        with pytest.raises(learned.RefineModelError) as e:
            learned.load_refine_model(str(p))
        assert str(p) in str(e.value) and needles[name] in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_learned_refine_merges_pieces():
    """Trained on one constructed volume, on another the learned merges join cut cells: fewer
    split bits than the watershed floor, no more than 0.05 bits of merge added."""
    from floodfilling import evaluation
    from floodfilling.config import RefineConfig

    m = train_model([_unit(0), _unit(2)], "watershed", rounds=50)
    u = _unit(1)
    floor = learned.base_segmentation(u.image, u.flood, "watershed", RefineConfig()).segmentation
    out = learned.learned_refine(u.image, u.flood, m, RefineConfig()).segmentation
    a = evaluation.variation_of_information(floor, u.labels)
    b = evaluation.variation_of_information(out, u.labels)
    assert b["vi_split"] < a["vi_split"] - 0.1 and b["vi_merge"] < a["vi_merge"] + 0.05, (a, b)


# -- the commands -----------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["cores", "gap_cores"])
def test_train_refine_then_segment(tmp_path, base):
    from floodfilling.cli import main
    from floodfilling.testing import demo_crop, mean_flood_model

    raw, labels = demo_crop((24, 40, 40))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"], f["labels"] = raw, labels
    model = mean_flood_model(tmp_path / "tiny.npz")
    q = ["--model", str(model), "--device", "cpu", "--threads", "1", "-q", "--set", "min_segment_size=10"]
    m = tmp_path / "m.json"
    tr = ["train-refine", f"{tmp_path}/v.h5:raw", f"{tmp_path}/v.h5:labels", "--out", str(m), "--base", base, *q]
    assert main(tr) == 0
    first = m.read_bytes()
    assert main(tr + ["--overwrite"]) == 0
    assert m.read_bytes() == first  # deterministic, flood included
    rec = json.loads(first)["training"]["volumes"][0]
    assert rec["image"] == f"{tmp_path}/v.h5:raw" and rec["shape"] == [24, 40, 40]
    assert main(["segment", f"{tmp_path}/v.h5:raw", f"{tmp_path}/o.h5:seg", "--refine", "--refine-model", str(m),
                 *q]) == 0
    with h5py.File(tmp_path / "o.h5", "r") as f:
        seg, fwd = f["seg"][:], f["seg_forward"][:]
        attrs = json.loads(f["seg"].attrs["refine"])
    assert attrs["model"] == str(m) and attrs["learned"]["training"]["volumes"][0]["image"] == rec["image"]
    # the result is the learned refinement of the flood kept beside it
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.model import load_model

    from floodfilling.inference.refine import FloodNetwork

    net, info = load_model(str(model), "cpu")
    cfg = InferenceConfig(min_segment_size=10, threads=1, device="cpu")
    image = resolve_normalisation(cfg, info, raw).apply(raw)
    rm = learned.load_refine_model(str(m))
    assert rm.base == base
    want = learned.learned_refine(image, fwd, rm, RefineConfig(), network=FloodNetwork(net, info, cfg))
    assert np.array_equal(seg, want.segmentation) and (seg > 0).all()


def test_bundled_model_loads_and_records_its_training():
    """The bundled refine model reads with this version's features (a feature change without
    retraining it fails here) and records the volumes it was trained on."""
    m = learned.load_refine_model(learned.BUNDLED)
    assert m.base == "cores" and m.source.endswith(learned.BUNDLED_FILE)
    names = [v["image"] for v in m.training["volumes"]]  # each volume as its two halves (the boundary map)
    assert names == ["fib_medulla_dev_50x100x200.h5:raw"] * 2 + ["fib25_train_250.h5:raw"] * 2
    assert m.boundary_map() is not None and m.training["boundary"]["filters"]
    seg, image, overlaps = _blobs(0)
    g = contact_graph(seg, image, overlaps)
    idx = g.node_index()
    p = m.predict(features(g.edge_stats, g.node_stats[[idx[int(a)] for a in g.pairs[:, 0]]],
                           g.node_stats[[idx[int(b)] for b in g.pairs[:, 1]]]))
    assert p.shape == (len(g.pairs),) and ((p >= 0) & (p <= 1)).all()


def test_refine_model_after_postprocessing(tmp_path):
    """split_components renumbers the flood and drops its overlaps: the learned refinement still
    runs (no hand step to refuse), the overlap feature missing."""
    from floodfilling.cli import main
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.model import load_model
    from floodfilling.testing import demo_crop, mean_flood_model

    raw, labels = demo_crop((24, 40, 40))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = raw
    model = mean_flood_model(tmp_path / "tiny.npz")
    m = tmp_path / "m.json"
    learned.save_refine_model(train_model([_unit(0)], "cores", rounds=10), str(m))
    assert main(["segment", f"{tmp_path}/v.h5:raw", f"{tmp_path}/o.h5:seg", "--refine", "--refine-model", str(m),
                 "--model", str(model), "--device", "cpu", "--threads", "1", "-q", "--set", "min_segment_size=10",
                 "--set", "split_components=true"]) == 0
    with h5py.File(tmp_path / "o.h5", "r") as f:
        seg, fwd = f["seg"][:], f["seg_forward"][:]
    _, info = load_model(str(model), "cpu")
    image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)
    want = learned.learned_refine(image, fwd, learned.load_refine_model(str(m)), RefineConfig(), overlaps=None)
    assert np.array_equal(seg, want.segmentation)


def test_refine_defaults_to_the_bundled_learned_model(tmp_path):
    """``--refine`` alone is the learned refinement of the bundled model (the leave-one-out table
    shows it better than the hand steps on every labelled unit): the same result as
    ``--refine-model bundled``, recorded as such; ``--refine-model hand`` runs the hand steps
    (their counters); a hand-step option with a learned model is a one-line error naming it."""
    from floodfilling.cli import main
    from floodfilling.testing import demo_crop, mean_flood_model

    raw, _ = demo_crop((24, 40, 40))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = raw
    q = ["--model", str(mean_flood_model(tmp_path / "tiny.npz")), "--device", "cpu", "--threads", "1", "-q",
         "--set", "min_segment_size=10"]
    outs = {}
    for name, extra in (("default", []), ("bundled", ["--refine-model", "bundled"]), ("hand", ["--refine-model", "hand"])):
        assert main(["segment", f"{tmp_path}/v.h5:raw", f"{tmp_path}/{name}.h5:seg", "--refine", *extra, *q]) == 0
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            outs[name] = (f["seg"][:], json.loads(f["seg"].attrs["refine"]), json.loads(f["seg"].attrs["counters"]))
    assert np.array_equal(outs["default"][0], outs["bundled"][0])
    assert outs["default"][1]["model"] == "bundled"
    assert outs["default"][1]["learned"]["file"].endswith(learned.BUNDLED_FILE)
    assert "refine_learned_merges" in outs["default"][2] and "refine_learned_merges" not in outs["hand"][2]
    assert "learned" not in outs["hand"][1] and "refine_gap_cores" in outs["hand"][2]
    from floodfilling.config import RefineConfig

    with pytest.raises(learned.RefineModelError, match=r"refine\.gap_min_core=10.*refine\.model=hand"):
        learned.check_learned_options(RefineConfig(gap_min_core=10))
    learned.check_learned_options(RefineConfig(tile=(8, 8, 8), halo=(4, 4, 4)))  # the options it uses
