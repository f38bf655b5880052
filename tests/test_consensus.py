"""Split consensus (floodfilling.consensus) against a brute-force reference of its rule, the
inverted-origins seed policy, and ``ffn consensus`` / ``seed_policy=invert_origins`` end to end."""

import h5py
import numpy as np
import pytest

from floodfilling.cli import main
from floodfilling.config import ConfigError, InferenceConfig
from floodfilling.consensus import ConsensusError, consensus_table, split_consensus
from floodfilling.inference import seeds as seeds_mod
from floodfilling.results import ORIGIN_DTYPE
from floodfilling.testing import mean_flood_model


def consensus_reference(a, b, min_size):
    """The rule written out voxel by voxel with dictionaries."""
    a, b = a.ravel().tolist(), b.ravel().tolist()
    count = {}
    for p in zip(a, b):
        count[p] = count.get(p, 0) + 1
    best = {}
    for (x, y), c in count.items():
        if x not in best or c > best[x][1] or (c == best[x][1] and y < best[x][0]):
            best[x] = (y, c)
    new_id = {}
    nxt = max(a) if a else 0
    for (x, y) in sorted(count, key=lambda p: (p[1], p[0])):
        c = count[(x, y)]
        if x == 0 or c < min_size:
            new_id[(x, y)] = 0
        elif best[x][0] == y:
            new_id[(x, y)] = x
        else:
            nxt += 1
            new_id[(x, y)] = nxt
    return np.array([new_id[p] for p in zip(a, b)], np.uint64)


@pytest.mark.parametrize("seed", range(8))
def test_matches_reference_rule(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(2, 9, size=3))
    a = rng.integers(0, int(rng.integers(1, 6)), size=shape).astype(np.uint32)
    b = rng.integers(0, int(rng.integers(1, 6)), size=shape).astype(np.uint64)
    min_size = int(rng.choice([0, 1, 2, 5]))
    want = consensus_reference(a, b, min_size).reshape(shape)
    for slab in (1, 7, 1 << 20):  # one z plane, a few, everything at once
        got, table = split_consensus(a, b, min_size, slab_voxels=slab)
        assert np.array_equal(got.astype(np.uint64), want), (seed, slab)
        assert got.dtype == np.uint32


def test_hand_case_and_ties():
    a = np.array([[[1, 1, 1, 1, 2, 2, 0, 0]]], np.uint32)
    b = np.array([[[5, 5, 6, 6, 0, 7, 5, 0]]], np.uint32)
    # a=1: (1,5) x2 and (1,6) x2 tie -> b=5 keeps id 1, (1,6) new; a=2: (2,0) and (2,7) tie -> b=0 keeps 2
    # new ids from max(a) = 2 in (b, a) order: (1,6) -> 3, (2,7) -> 4; a=0 -> 0
    got, table = split_consensus(a, b)
    assert got.ravel().tolist() == [1, 1, 3, 3, 2, 4, 0, 0]
    got, _ = split_consensus(a, b, min_size=2)  # single-voxel pieces go
    assert got.ravel().tolist() == [1, 1, 3, 3, 0, 0, 0, 0]
    t = consensus_table(np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), 0, 0)
    assert t.max_id == 0 and t.out_ids.size == 0


def test_wide_ids():
    big = 2**40
    a = np.array([[[big, big, big + 7, 3]]], np.uint64)
    b = np.array([[[2**35, 1, 2**35, 2**35]]], np.uint64)
    got, _ = split_consensus(a, b, slab_voxels=1)
    assert got.dtype == np.uint64
    assert got.ravel().tolist() == consensus_reference(a, b, 0).tolist() == [big + 8, big, big + 7, 3]  # tie for big: b=1 keeps it


def test_bad_inputs():
    a = np.zeros((2, 2, 2), np.uint32)
    with pytest.raises(ConsensusError, match="b: shape"):
        split_consensus(a, np.zeros((2, 2, 3), np.uint32))
    with pytest.raises(ConsensusError, match="a: dtype float32"):
        split_consensus(a.astype(np.float32), a)
    with pytest.raises(ConsensusError, match="b: negative labels"):
        split_consensus(a, -np.ones((2, 2, 2), np.int32))
    with pytest.raises(ConsensusError, match="min_size=-1"):
        split_consensus(a, a, -1)


def test_invert_origins_seeds():
    tab = np.zeros(3, ORIGIN_DTYPE)
    tab["id"] = [1, 5, 2]
    tab["z"], tab["y"], tab["x"] = [4, 6, 5], [4, 6, 5], [4, 6, 99]
    pts = seeds_mod.invert_origins(tab, (1, 0, 0), (20, 20, 20), (2, 2, 2))
    assert pts.tolist() == [[7, 6, 6], [5, 4, 4]]  # id 5, (id 2 outside), id 1
    with pytest.raises(ConfigError, match="needs seed_origins"):
        InferenceConfig(seed_policy="invert_origins").validate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fib25):
    d = tmp_path_factory.mktemp("consensus")
    raw = fib25[0][100:132, 60:124, 60:124]
    with h5py.File(d / "img.h5", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [10, 10, 10]
    mean_flood_model(d / "tiny.npz")
    common = ["--model", str(d / "tiny.npz"), "--set", "min_segment_size=100", "--threads", "1", "-q"]
    assert main(["segment", f"{d / 'img.h5'}:raw", f"{d / 'a.h5'}:seg", *common]) == 0
    assert main(["segment", f"{d / 'img.h5'}:raw", f"{d / 'b.h5'}:seg", *common, "--set", "seed_policy=invert_origins",
                 "--set", f"seed_origins={d / 'a.h5'}:seg"]) == 0
    return d


def read(path, ds="seg"):
    with h5py.File(path, "r") as f:
        return f[ds][:], f[f"{ds}_origins"][:], dict(f[ds].attrs)


def test_inverted_run_seeds_from_the_first_runs_origins(runs):
    a, a_org, _ = read(runs / "a.h5")
    b, b_org, _ = read(runs / "b.h5")
    first = {tuple(r) for r in np.stack([a_org["z"], a_org["y"], a_org["x"]], axis=1).tolist()}
    second = [tuple(r) for r in np.stack([b_org["z"], b_org["y"], b_org["x"]], axis=1).tolist()]
    assert second and set(second) <= first  # every object of the rerun grew from an origin of the first
    # the highest id of the first run is the first seed of the second: it becomes object 1
    top = a_org[np.argmax(a_org["id"])]
    assert (b_org["z"][0], b_org["y"][0], b_org["x"][0]) == (top["z"], top["y"], top["x"])
    assert not np.array_equal(a, b)


def test_consensus_command(runs, capsys):
    a, a_org, _ = read(runs / "a.h5")
    b = read(runs / "b.h5")[0]
    out = runs / "c.h5"
    assert main(["consensus", f"{runs / 'a.h5'}:seg", f"{runs / 'b.h5'}:seg", f"{out}:seg", "--min-size", "50"]) == 0
    c, c_org, attrs = read(out)
    assert np.array_equal(c.astype(np.uint64), consensus_reference(a, b, 50).reshape(a.shape))
    assert list(attrs["resolution_zyx_nm"]) == [10, 10, 10] and attrs["consensus"] == "split"
    assert set(c_org["id"].tolist()) == set(a_org["id"].tolist()) & set(np.unique(c).tolist())
    # a subdivision of A: every consensus object lies inside one object of A
    pairs = np.unique(np.stack([c.ravel(), a.ravel()], axis=1)[c.ravel() > 0], axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs)
    capsys.readouterr()
    assert main(["consensus", f"{runs / 'a.h5'}:seg", f"{runs / 'b.h5'}:seg", f"{out}:seg"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["consensus", f"{runs / 'a.h5'}:seg", f"{runs / 'img.h5'}:raw", f"{out}:seg", "--overwrite"]) == 0
    assert main(["consensus", f"{runs / 'a.h5'}:seg", f"{runs / 'nope.h5'}:seg", f"{runs / 'd.h5'}:seg"]) == 2
    assert "nope.h5" in capsys.readouterr().err


def test_invert_origins_bad_inputs(runs, capsys):
    img = f"{runs / 'img.h5'}:raw"
    assert main(["segment", img, f"{runs / 'x.h5'}:seg", "-q", "--set", "seed_policy=invert_origins",
                 "--set", f"seed_origins={img}"]) == 2
    assert "no origins table beside it (raw_origins)" in capsys.readouterr().err
    assert main(["segment", img, f"{runs / 'x.h5'}:seg", "-q", "--block", "16,32,32", "--set",
                 "seed_policy=invert_origins", "--set", f"seed_origins={runs / 'a.h5'}:seg"]) == 2
    assert "not supported with block inference" in capsys.readouterr().err


def test_zarr_output_and_origins(runs):
    pytest.importorskip("zarr")
    from floodfilling.results import read_origins

    a, b = f"{runs / 'a.h5'}:seg", f"{runs / 'b.h5'}:seg"
    assert main(["consensus", a, b, f"{runs / 'c.zarr'}/cons", "--min-size", "50"]) == 0
    assert main(["consensus", a, b, f"{runs / 'c2.h5'}:seg", "--min-size", "50"]) == 0
    want_seg, want_org, _ = read(runs / "c2.h5")
    import zarr

    assert np.array_equal(zarr.open_group(str(runs / "c.zarr"), mode="r")["cons"][...], want_seg)
    got = read_origins(f"{runs / 'c.zarr'}/cons")
    assert got is not None and np.array_equal(got, want_org.astype(got.dtype))
    assert read_origins(f"{runs / 'img.h5'}:raw") is None


def test_grid_policy_is_the_references_grid3d():
    # shape 20, margin 4: kept positions lie in [4, 15]; step 16 passes at offsets 0, 8, 4, 12, 2, 10, 14
    pts = seeds_mod.grid((20, 20, 20), (4, 4, 4))
    assert pts.tolist() == [[8, 8, 8], [4, 4, 4], [12, 12, 12], [10, 10, 10], [14, 14, 14]]
    pts = seeds_mod.grid((40, 20, 20), (4, 4, 4), step=16, offsets=(0, 8))
    assert pts.tolist() == [[8, 8, 8], [24, 8, 8]]  # offset 0: 16 + 4 is not < 20 in y, x
    assert seeds_mod.grid((5, 5, 5), (4, 4, 4)).shape == (0, 3)


def test_streamed_output_equals_in_memory(runs):
    """The output written slab by slab (many slabs) equals the in-memory consensus."""
    pytest.importorskip("zarr")
    import zarr

    from floodfilling.consensus import consensus

    a, b = read(runs / "a.h5")[0], read(runs / "b.h5")[0]
    want, _ = split_consensus(a, b, 20)
    consensus(f"{runs / 'a.h5'}:seg", f"{runs / 'b.h5'}:seg", f"{runs / 's.h5'}:seg", min_size=20, slab_voxels=3000)
    consensus(f"{runs / 'a.h5'}:seg", f"{runs / 'b.h5'}:seg", f"{runs / 's.zarr'}/seg", min_size=20, slab_voxels=3000)
    assert np.array_equal(read(runs / "s.h5")[0], want)
    assert np.array_equal(zarr.open_group(str(runs / "s.zarr"), mode="r")["seg"][...], want)
    assert not any(".tmp-" in p.name for p in list(runs.iterdir()) + list((runs / "s.zarr").iterdir()))


def test_fill_empty_seeds():
    from scipy import ndimage

    seg = np.zeros((21, 23, 25), np.int32)
    seg[:6] = 1  # an object fills z < 6
    seg[14, 11, 12] = -1  # a seed tried before
    pts = seeds_mod.fill_empty(seg, (2, 2, 2), min_radius=3.0)
    free = np.pad(seg <= 0, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(free)[1:-1, 1:-1, 1:-1]
    d = dist[pts[:, 0], pts[:, 1], pts[:, 2]]
    assert len(pts) >= 1 and np.all(d >= 3.0) and np.all(np.diff(d) <= 1e-3)  # largest gap first
    assert np.all(seg[pts[:, 0], pts[:, 1], pts[:, 2]] == 0) and np.all(pts[:, 0] >= 6)
    assert dist[tuple(pts[0])] >= dist[6:, 2:-2, 2:-2].max() - 1e-3  # the deepest point of the gap
    assert seeds_mod.fill_empty(np.ones((9, 9, 9), np.int32), (2, 2, 2)).shape == (0, 3)


def test_fill_passes_seed_the_gaps(runs):
    """seed_fill_passes: the first run's objects are kept and new ones grow in the gaps;
    the state (seeds, passes) survives a save/load."""
    from floodfilling.inference.segment import load_state, save_state, segment_array
    from floodfilling.model import load_model

    with h5py.File(runs / "img.h5", "r") as f:
        raw = f["raw"][:]
    net = load_model(str(runs / "tiny.npz"), "cpu")
    cfg = InferenceConfig(min_segment_size=100, threads=1)
    base = segment_array(raw, config=cfg, net_and_info=net)
    filled = segment_array(raw, config=cfg.with_overrides(seed_fill_passes=2, seed_fill_min_radius=2.0),
                           net_and_info=net)
    assert filled.counters["fill_seeds"] > 0 and filled.counters["objects"] >= base.counters["objects"]
    kept = base.segmentation > 0
    assert np.array_equal(filled.segmentation[kept], base.segmentation[kept])  # the first pass is untouched
    assert (filled.segmentation == 0).sum() <= (base.segmentation == 0).sum()
    from floodfilling.inference.canvas import Canvas, CanvasState

    cv = Canvas(np.zeros((9, 9, 9), np.float32), np.zeros((2, 3)), cfg, (3, 3, 3), (1, 1, 1),
                state=CanvasState(segmentation=np.zeros((9, 9, 9), np.int32), seed_index=2, fill_passes=1))
    save_state(runs / "st.npz", cv, {"m": 1})
    st, seeds = load_state(runs / "st.npz", {"m": 1})
    assert st.fill_passes == 1 and st.seed_index == 2 and seeds.shape == (2, 3)
