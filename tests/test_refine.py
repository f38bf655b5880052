"""Refinement after the flood (floodfilling.inference.refine, ``ffn segment --refine``): hand-built
volumes whose right answer is known, polarity, the exact flood kept, and the command line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from floodfilling.config import ConfigError, InferenceConfig, RefineConfig
from floodfilling.model import ModelInfo
from floodfilling.inference.refine import (FloodNetwork, GapFlood, RefineError, gap_cores, paint_gap_floods,
                                          refine_array, resolve_gap_floods)
from floodfilling.results import Origin
from test_engine import DELTAS, FOV, bright_flood_net

pytest.importorskip("skimage")


def bright_network() -> FloodNetwork:
    """A real network (depth 1, 9^3 FOV) that floods bright voxels and stops at dark ones."""
    return FloodNetwork(bright_flood_net(), ModelInfo(depth=1, features=4, fov_zyx=FOV, deltas_zyx=DELTAS),
                        InferenceConfig(threads=1))


def cells(shape=(20, 20, 40), wall_x=(19, 20)):
    """Two bright boxes split by a dark membrane (x in ``wall_x``), normalised values: cells
    +1, membrane -2. Returns (image, the true labels 1 | 2, membrane voxels -> 0)."""
    image = np.ones(shape, np.float32)
    truth = np.ones(shape, np.uint32)
    truth[..., wall_x[1]:] = 2
    image[..., wall_x[0]:wall_x[1] + 1] = -2.0
    truth[..., wall_x[0]:wall_x[1] + 1] = 0
    return image, truth


def test_watershed_stops_at_the_membrane():
    image, truth = cells()
    seg = np.zeros(image.shape, np.uint32)
    seg[10, 10, 5] = 7  # one flood object on each side, a voxel each
    seg[10, 10, 30] = 9
    out = refine_array(image, seg, RefineConfig(steps=("watershed",), watershed_sigma=0.0)).segmentation
    assert out.dtype == seg.dtype
    assert (out[truth == 1] == 7).all() and (out[truth == 2] == 9).all()
    assert set(np.unique(out[truth == 0])) <= {7, 9}  # the membrane is shared out, nothing left at 0


GAP = RefineConfig(steps=("gap_objects", "watershed"), interior_sigma=0.5, gap_core_radius=3.0, gap_min_core=10,
                   watershed_sigma=0.0)


def test_gap_object_for_a_cell_no_flood_reached():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)  # the flood found cell 1 only
    cores, centres = gap_cores(image, seg, GAP)
    assert cores.max() == 1 and len(centres) == 1
    z, y, x = centres[0]  # the deepest voxel of the free cell (20 x 20 x 19 box at x 21..39)
    assert x > 20 and seg[z, y, x] == 0 and cores[z, y, x] == 1
    r = refine_array(image, seg, GAP, bright_network())
    assert list(r.new_origins) == [6] and r.new_origins[6].seed_zyx == centres[0] and r.new_origins[6].steps > 0
    assert (r.segmentation[truth == 1] == 5).all() and (r.segmentation[truth == 2] == 6).all()
    assert r.counters["gap_objects"] == 1 and r.counters["gap_joined"] == 0
    # without gap objects the watershed hands the free cell to the flood's object: one merge
    only_ws = refine_array(image, seg, RefineConfig(steps=("watershed",), watershed_sigma=0.0)).segmentation
    assert (only_ws[truth > 0] == 5).all()


def test_a_gap_flood_that_runs_into_an_object_joins_it():
    """Object 5 holds the near part of cell 2, the far part is free: the core's flood fills
    cell 2 (the network floods bright voxels), runs into 5 and joins it."""
    image, truth = cells()
    seg = np.where(truth == 1, 4, 0).astype(np.uint32)
    seg[..., 21:28] = 5
    r = refine_array(image, seg, GAP, bright_network())
    assert r.counters["gap_floods"] == 1 and r.counters["gap_joined"] == 1 and r.new_origins == {}
    assert (r.segmentation[truth == 1] == 4).all() and (r.segmentation[truth == 2] == 5).all()
    # a join threshold above the flood's share in object 5 keeps it as an object of its own
    alone = refine_array(image, seg, RefineConfig(**{**GAP.to_dict(), "steps": tuple(GAP.steps),
                                                     "gap_join_fraction": 1.0}), bright_network())
    assert list(alone.new_origins) == [6] and (alone.segmentation[..., 30:] == 6).all()


def flood(seed, start, mask, overlaps=((), ()), canvas_voxels=None) -> GapFlood:
    mask = np.asarray(mask, bool)
    return GapFlood(seed, Origin(seed, 1, 0.0), start, mask,
                    int(mask.sum()) if canvas_voxels is None else canvas_voxels,
                    (np.asarray(overlaps[0], np.int64), np.asarray(overlaps[1], np.int64)))


def test_resolve_gap_floods_by_hand():
    """Floods in order over a flood whose objects go up to id 10 (volume 1 x 1 x 20, a flood is
    a run of x): join by own overlaps, new ids in order, shared voxels go to the earlier flood
    and count as running into it, a seed inside an earlier kept flood drops the flood."""
    line = lambda x0, x1: flood((0, 0, x0), (0, 0, x0), np.ones((1, 1, x1 - x0)))  # noqa: E731
    floods = [
        flood((0, 0, 0), (0, 0, 0), np.ones((1, 1, 4)), ((3, 7), (1, 2))),  # 2 of 7 in 7 (>= 10 %): joins 7
        line(5, 9),  # ran into nothing: new object 11
        None,  # seed too weak
        flood((0, 0, 12), (0, 0, 8), np.ones((1, 1, 10))),  # x 8..17: 1 voxel shared with 11 (1/10): joins 11
        line(6, 7),  # seed inside flood 1 (kept): dropped
        flood((0, 0, 19), (0, 0, 19), np.ones((1, 1, 1)), ((2,), (9,)), canvas_voxels=91),  # 9 / 100 < 10 %: new 12
    ]
    dec = resolve_gap_floods(floods, 10, 0.1)
    assert dec.targets == [7, 11, 0, 11, 0, 12]
    assert (dec.joined, dec.inside, dec.new) == (2, 1, 2)
    assert resolve_gap_floods(floods, 10, 0.09).targets == [7, 11, 0, 11, 0, 2]  # 9 % now joins object 2
    # the shared voxel was the only overlap of flood 3: at a threshold above 1/10 it is a new object
    assert resolve_gap_floods(floods, 10, 0.2).targets == [7, 11, 0, 12, 0, 13]
    # painting: an earlier flood keeps a shared voxel, objects of the flood are never painted over
    markers = np.zeros((1, 1, 20), np.int64)
    markers[0, 0, 4] = 3
    paint_gap_floods(markers, (0, 0, 0), floods, [7, 11, 0, 13, 0, 14])
    assert markers[0, 0].tolist() == [7] * 4 + [3] + [11] * 4 + [13] * 9 + [0, 14]
    window = np.zeros((1, 1, 5), np.int64)  # a window x 6..10 sees the same voxels
    paint_gap_floods(window, (0, 0, 6), floods, [7, 11, 0, 13, 0, 14])
    assert window[0, 0].tolist() == markers[0, 0, 6:11].tolist()


@pytest.mark.parametrize("seed", range(8))
def test_the_spatial_index_never_changes_a_decision(seed):
    """resolve_gap_floods compares a flood only with earlier floods near it (grid cells); with
    one cell for the whole volume it compares every pair. Random touching floods: the same
    decisions at every cell size."""
    rng = np.random.default_rng(seed)
    floods = []
    for _ in range(60):
        start = tuple(int(v) for v in rng.integers(0, 10, 3))
        mask = rng.random(tuple(int(v) for v in rng.integers(1, 7, 3))) < 0.6
        mask.flat[0] = True
        seed_zyx = tuple(int(a + v) for a, v in zip(start, rng.integers(-1, 3, 3)))  # sometimes outside its box
        n = int(rng.integers(0, 3))
        floods.append(None if rng.random() < 0.1 else
                      flood(seed_zyx, start, mask, (rng.integers(1, 5, n), rng.integers(1, 20, n)),
                            int(mask.sum()) + int(rng.integers(0, 5))))
    every_pair = resolve_gap_floods(floods, 10, 0.1, cell=10**6)
    assert every_pair.inside > 0 and every_pair.joined > 0 and every_pair.new > 0
    for cell in (1, 2, 3, 7):
        assert resolve_gap_floods(floods, 10, 0.1, cell=cell) == every_pair


def test_small_gaps_make_no_object():
    image, truth = cells()
    seg = np.where(truth > 0, 5, 0).astype(np.uint32)
    seg[:, :, 30:34] = 0  # a gap 4 voxels wide inside object 5: no voxel 3 from its faces
    cores, centres = gap_cores(image, seg, RefineConfig(gap_core_radius=3.0, interior_sigma=0.5, gap_min_core=1))
    assert cores.max() == 0 and centres == []
    seg[:, :, 30:36] = 0  # 6 wide: the central voxels are 3 from both faces
    cores, centres = gap_cores(image, seg, RefineConfig(gap_core_radius=3.0, interior_sigma=0.5, gap_min_core=1))
    assert cores.max() == 1 and set(np.unique(np.nonzero(cores)[2])) == {32, 33}


def test_bright_membranes_are_the_mirror_image():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)
    dark = refine_array(image, seg, RefineConfig(gap_min_core=10, steps=("watershed",)))
    bright = refine_array(-image, seg, RefineConfig(gap_min_core=10, steps=("watershed",), membranes="bright"))
    np.testing.assert_array_equal(dark.segmentation, bright.segmentation)
    cores = gap_cores(image, seg, RefineConfig(gap_min_core=10))
    cores_bright = gap_cores(-image, seg, RefineConfig(gap_min_core=10, membranes="bright"))
    np.testing.assert_array_equal(cores[0], cores_bright[0])
    assert cores[1] == cores_bright[1] and len(cores[1]) == 1


def test_steps_are_checked():
    with pytest.raises(ConfigError, match="steps"):
        RefineConfig(steps=("watershed", "magic")).validate()
    with pytest.raises(ConfigError, match="gap_core_radius"):
        RefineConfig(gap_core_radius=-1.0).validate()
    with pytest.raises(ConfigError, match="rejoin_fraction"):
        RefineConfig(rejoin_fraction=0.0).validate()
    with pytest.raises(RefineError, match="shape"):
        refine_array(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint32), RefineConfig())
    with pytest.raises(RefineError, match="overlaps"):
        refine_array(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint32), RefineConfig())
    with pytest.raises(RefineError, match="network"):
        refine_array(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint32), RefineConfig(), overlaps={})


def test_no_steps_returns_the_flood():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)
    np.testing.assert_array_equal(refine_array(image, seg, RefineConfig(steps=())).segmentation, seg)


def test_cores_whose_seeds_cannot_flood_leave_the_gap_to_the_watershed():
    """A network that never floods (every seed falls below move_threshold): no gap object, the
    watershed fills the free cell from the flood's objects, counters say so."""
    import torch

    class Never(torch.nn.Module):
        def forward(self, image, seed):
            return torch.full_like(seed, -5.0)

    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)
    net = FloodNetwork(Never(), ModelInfo(depth=1, features=4, fov_zyx=FOV, deltas_zyx=DELTAS),
                       InferenceConfig(threads=1))
    r = refine_array(image, seg, GAP, net)
    assert r.counters["gap_cores"] == 1 and r.counters["gap_floods"] == 0 and r.counters["gap_objects"] == 0
    assert (r.segmentation == 5).all()


# -- rejoin: flood objects that their own flood found to be pieces of an earlier object ----------

def rejoin_by_rule(seg: np.ndarray, overlaps: dict, fraction: float) -> np.ndarray:
    """The rule written out voxel by voxel: object k (in id order) is relabelled to the final id
    of the object it ran into most, when that is at least ``fraction`` of (its voxels + all it
    ran into); the group keeps its lowest id."""
    final = {}
    for k in sorted(int(v) for v in np.unique(seg) if v):
        ids, vox = overlaps.get(k, ((), ()))
        pairs = [(int(v), int(i)) for i, v in zip(ids, vox) if i > 0]
        total = int((seg == k).sum()) + sum(v for v, _ in pairs)
        if pairs and total:
            most = max(v for v, _ in pairs)
            j = min(i for v, i in pairs if v == most)
            if most >= fraction * total:
                final[k] = final.get(j, j)
                continue
        final[k] = k
    # a later object may have joined an object that joined another: follow to the end
    changed = True
    while changed:
        changed = False
        for k, j in final.items():
            if final.get(j, j) != j:
                final[k] = final[j]
                changed = True
    out = seg.copy()
    for z, y, x in np.ndindex(seg.shape):
        if seg[z, y, x]:
            out[z, y, x] = final[int(seg[z, y, x])]
    return out


def test_rejoin_by_hand():
    """Five objects in a row; 3 ran mostly into 1 (joins), 4 ran into 3 (joins 3, so 1), 5 ran
    a little into 2 (stays), 2 ran into nothing."""
    seg = np.zeros((2, 3, 10), np.uint32)
    for k, x in zip(range(1, 6), (0, 2, 4, 6, 8)):
        seg[..., x:x + 2] = k  # 12 voxels each
    overlaps = {1: ((), ()), 2: ((), ()),
                3: (np.array([1, 2]), np.array([20, 5])),  # 20 of 12 + 25 = 37: 0.54 -> joins 1
                4: (np.array([3]), np.array([12])),  # 12 of 24: 0.5 -> joins 3
                5: (np.array([2, 4]), np.array([3, 3]))}  # 3 of 18 each: stays
    image = np.zeros(seg.shape, np.float32)
    r = refine_array(image, seg, RefineConfig(steps=("rejoin",)), overlaps=overlaps)
    want = seg.copy()
    want[np.isin(seg, [3, 4])] = 1
    np.testing.assert_array_equal(r.segmentation, want)
    assert r.joined == {3: 1, 4: 1} and r.counters["rejoined"] == 2
    np.testing.assert_array_equal(r.segmentation, rejoin_by_rule(seg, overlaps, 0.5))
    # 0.52: object 3 (0.54) joins 1, object 4 (0.5) stays
    r = refine_array(image, seg, RefineConfig(steps=("rejoin",), rejoin_fraction=0.52), overlaps=overlaps)
    assert r.joined == {3: 1}
    # 0.15: 5 (3 of 18 = 0.17 into each of 2 and 4, a tie) joins the lower id, 2
    r = refine_array(image, seg, RefineConfig(steps=("rejoin",), rejoin_fraction=0.15), overlaps=overlaps)
    assert r.joined == {3: 1, 4: 1, 5: 2}
    np.testing.assert_array_equal(r.segmentation, rejoin_by_rule(seg, overlaps, 0.15))


@pytest.mark.parametrize("seed", range(6))
def test_rejoin_matches_the_rule_on_random_floods(seed):
    rng = np.random.default_rng(seed)
    n = 12
    seg = rng.integers(0, n + 1, size=(4, 5, 6)).astype(np.uint32)
    overlaps = {}
    for k in range(2, n + 1):
        m = int(rng.integers(0, 4))
        ids = rng.choice(np.arange(1, k), size=min(m, k - 1), replace=False)
        overlaps[k] = (ids.astype(np.int64), rng.integers(1, 30, size=len(ids)).astype(np.int64))
    for fraction in (0.2, 0.5, 0.8):
        r = refine_array(np.zeros(seg.shape, np.float32), seg, RefineConfig(steps=("rejoin",), rejoin_fraction=fraction),
                         overlaps=overlaps)
        np.testing.assert_array_equal(r.segmentation, rejoin_by_rule(seg, overlaps, fraction))


def test_rejoin_then_gap_objects_take_new_ids_after_the_flood():
    """A rejoined top id is not reused: the gap object gets max(flood) + 1."""
    image, truth = cells()
    seg = np.where(truth == 1, 4, 0).astype(np.uint32)
    seg[..., :5] = 5  # 5 is a piece of 4 by its flood's overlaps; cell 2 is free
    overlaps = {4: ((), ()), 5: (np.array([4]), np.array([5000]))}  # 5000 of 2000 + 5000
    steps = ("rejoin", "gap_objects", "watershed")
    r = refine_array(image, seg, RefineConfig(**{**GAP.to_dict(), "steps": steps}), bright_network(), overlaps=overlaps)
    assert r.joined == {5: 4} and list(r.new_origins) == [6]
    assert (r.segmentation[truth == 1] == 4).all() and (r.segmentation[truth == 2] == 6).all()


# -- tiles: each step against a brute-force reference ---------------------------------------------

def cores_by_rule(image, seg, cfg, core):
    """gap_cores written out voxel by voxel (interior_sigma 0): depth = distance to the nearest
    voxel that is not free interior, cores = 6-connected voxels of depth >= radius in the core
    box, numbered by their first voxel, kept from gap_min_core voxels; the deepest voxel of
    each (ties: raster order)."""
    free = (seg == 0) & (image > cfg.interior_threshold)
    walls = np.argwhere(~free)
    shape = [s.stop - s.start for s in core]
    deep = np.zeros(shape, bool)
    depth = np.zeros(shape)
    for v in np.ndindex(*shape):
        p = np.add(v, [s.start for s in core])
        depth[v] = np.sqrt(((walls - p) ** 2).sum(1).min()) if free[tuple(p)] else 0.0
        deep[v] = depth[v] >= cfg.gap_core_radius
    label = np.zeros(shape, np.int32)
    comps = []
    for v in np.ndindex(*shape):  # raster order: a component is numbered by its first voxel
        if deep[v] and not label[v]:
            todo, members = [v], []
            label[v] = -1
            while todo:
                u = todo.pop()
                members.append(u)
                for ax in range(3):
                    for d in (-1, 1):
                        w = list(u)
                        w[ax] += d
                        w = tuple(w)
                        if all(0 <= c < n for c, n in zip(w, shape)) and deep[w] and not label[w]:
                            label[w] = -1
                            todo.append(w)
            comps.append(members)
    out, centres = np.zeros(shape, np.int32), []
    for members in comps:
        if len(members) < cfg.gap_min_core:
            continue
        out[tuple(np.array(members).T)] = len(centres) + 1
        best = min(members, key=lambda u: (-depth[u], u))
        centres.append(tuple(int(c + s.start) for c, s in zip(best, core)))
    return out, centres


@pytest.mark.parametrize("seed", range(3))
def test_gap_cores_of_a_tile_match_the_rule(seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(1.2, 0.5, (9, 10, 11)).astype(np.float32)
    seg = np.zeros(image.shape, np.uint32)
    seg[:, :, :2] = 3
    seg[rng.random(image.shape) < 0.01] = 4
    cfg = RefineConfig(interior_sigma=0.0, gap_core_radius=2.0, gap_min_core=3)  # distance 2 occurs: the bound counts
    core = (slice(2, 8), slice(1, 9), slice(3, 10))
    got, centres = gap_cores(image, seg, cfg, core)
    want, want_centres = cores_by_rule(image, seg, cfg, core)
    assert got.max() >= 1  # the case has cores
    np.testing.assert_array_equal(got, want)
    assert centres == want_centres


@pytest.mark.parametrize("tile", [(0, 0, 0), (5, 6, 7), (3, 20, 4)])
def test_tiled_watershed_is_each_window_s_watershed_cut_to_its_core(tile):
    """refine_array's watershed in tiles against scikit-image on each window by hand: the core
    of each tile comes from the watershed of its window (tile + halo, clipped)."""
    from skimage.segmentation import watershed

    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, (11, 13, 15)).astype(np.float32)
    seg = np.zeros(image.shape, np.uint32)
    seg[rng.random(image.shape) < 0.02] = rng.integers(1, 6, 1)[0]
    seg[0, 0, 0], seg[-1, -1, -1] = 7, 8
    halo = (2, 3, 1)
    cfg = RefineConfig(steps=("watershed",), halo=halo)
    got = refine_array(image, seg, cfg, tile=tile).segmentation
    want = np.zeros(image.shape, np.int64)
    size = [t if t else n for t, n in zip(tile, image.shape)]
    for z0 in range(0, image.shape[0], size[0]):
        for y0 in range(0, image.shape[1], size[1]):
            for x0 in range(0, image.shape[2], size[2]):
                lo = [max(a - h, 0) for a, h in zip((z0, y0, x0), halo)]
                hi = [min(a + s + h, n) for a, s, h, n in zip((z0, y0, x0), size, halo, image.shape)]
                win = tuple(slice(a, b) for a, b in zip(lo, hi))
                ws = watershed(-image[win], markers=seg[win].astype(np.int64)) if seg[win].any() else seg[win]
                core = tuple(slice(a, min(a + s, n)) for a, s, n in zip((z0, y0, x0), size, image.shape))
                want[core] = ws[tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, win))]
    np.testing.assert_array_equal(got, want)
