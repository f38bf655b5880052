"""Reconciliation (overlap matching, union-find, global relabelling) against a brute-force
pure-Python reference, and its invariants on synthetic block segmentations."""

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floodfilling import kernels as K
from floodfilling.geometry import BlockGrid
from floodfilling.distributed.reconcile import MergeRule, global_labels, match_overlap, relabel_core

pytestmark = pytest.mark.skipif(not K.HAVE_NATIVE, reason="native extension not built")
SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- brute force -------------------------------------------------------------------------------

def rule_holds(n_ab, n_a, n_b, rule):
    return (n_ab >= rule.min_voxels and n_ab >= rule.min_fraction * min(n_a, n_b)
            and n_ab >= rule.min_iou * (n_a + n_b - n_ab))


def reference_reconcile(grid, segs, max_ids, rule, dust_size=0):
    """Python loops over voxels and dicts: the specification of the reconciled volume."""
    offsets = [sum(max_ids[:k]) for k in range(len(segs))]
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    def union(x, y):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # root = smallest id

    blocks = list(grid)
    for i, j in itertools.combinations(range(len(blocks)), 2):
        bi, bj = blocks[i], blocks[j]
        s = [max(p, q) for p, q in zip(bi.outer_start, bj.outer_start)]
        e = [min(p, q) for p, q in zip(bi.outer_stop, bj.outer_stop)]
        if any(b <= a for a, b in zip(s, e)):
            continue
        a = segs[i][tuple(slice(x - o, y - o) for x, y, o in zip(s, e, bi.outer_start))].ravel().tolist()
        b = segs[j][tuple(slice(x - o, y - o) for x, y, o in zip(s, e, bj.outer_start))].ravel().tolist()
        both, na, nb = Counter(zip(a, b)), Counter(a), Counter(b)
        for (x, y), c in both.items():
            if x and y and rule_holds(c, na[x], nb[y], rule):
                union(x + offsets[i], y + offsets[j])
    roots = {}
    for k, blk in enumerate(blocks):
        for v in np.unique(segs[k][blk.core_in_outer]).tolist():
            if v:
                roots[v + offsets[k]] = find(v + offsets[k])
    final = {r: n + 1 for n, r in enumerate(sorted(set(roots.values())))}
    out = np.zeros(grid.shape, np.uint32)
    for k, blk in enumerate(blocks):
        core = segs[k][blk.core_in_outer]
        dst = out[tuple(slice(a, b) for a, b in zip(blk.core_start, blk.core_stop))]
        for v in np.unique(core).tolist():
            if v:
                dst[core == v] = final[roots[v + offsets[k]]]
    if dust_size:  # objects smaller than dust_size go, the others are renumbered in order
        ids, counts = np.unique(out[out > 0], return_counts=True)
        lut = np.zeros(int(out.max()) + 1, np.uint32)
        big = ids[counts >= dust_size]
        lut[big] = np.arange(1, big.size + 1)
        out = lut[out]
    return out


def library_reconcile(grid, segs, max_ids, rule, dust_size=0):
    edges = []
    for i, j in grid.pairs():
        s, e = grid.overlap(i, j)
        bi, bj = grid[i], grid[j]
        a = segs[i][tuple(slice(x - o, y - o) for x, y, o in zip(s, e, bi.outer_start))]
        b = segs[j][tuple(slice(x - o, y - o) for x, y, o in zip(s, e, bj.outer_start))]
        edges.append((i, j, match_overlap(a, b, rule).edges))
    cores = [np.unique(segs[k][b.core_in_outer], return_counts=True) for k, b in enumerate(grid)]
    lab = global_labels(max_ids, [c[0] for c in cores], edges, [c[1] for c in cores], dust_size)
    out = np.zeros(grid.shape, lab.dtype)
    for k, b in enumerate(grid):
        out[tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop))] = relabel_core(
            segs[k][b.core_in_outer], lab.keys[k], lab.values[k], lab.dtype)
    return out, lab


# -- synthetic data ----------------------------------------------------------------------------

def blocky_labels(rng, shape, n_ids, cell=4):
    coarse = rng.integers(0, n_ids, tuple(-(-s // cell) for s in shape))
    a = coarse
    for ax in range(3):
        a = np.repeat(a, cell, axis=ax)
    return a[tuple(slice(0, s) for s in shape)].astype(np.uint32)


def connected(labels):
    """Each connected component (6-connected) of each label becomes its own object."""
    from scipy import ndimage

    out = np.zeros(labels.shape, np.uint32)
    n = 0
    for v in np.unique(labels[labels > 0]):
        cc, k = ndimage.label(labels == v)
        out[cc > 0] = cc[cc > 0] + n
        n += k
    return out


def block_segs(rng, grid, gt, perturb):
    """Each block sees gt on its outer box with its own local ids (random order), optionally
    perturbed (voxels zeroed, an object split, two objects merged); max_id may leave gaps."""
    segs, max_ids = [], []
    for b in grid:
        g = gt[tuple(slice(a, e) for a, e in zip(b.outer_start, b.outer_stop))]
        ids = np.unique(g[g > 0])
        perm = rng.permutation(len(ids)) + 1
        seg = np.zeros(g.shape, np.uint32)
        for v, p in zip(ids, perm):
            seg[g == v] = p
        m = len(ids)
        if perturb and m >= 2:
            seg[rng.random(seg.shape) < 0.1] = 0
            victim = rng.integers(1, m + 1)  # split by a plane
            cut = rng.integers(0, seg.shape[2])
            mask = (seg == victim)
            mask[:, :, :cut] = False
            m += 1
            seg[mask] = m
            a, c = rng.choice(np.arange(1, m + 1), 2, replace=False)  # merge two
            seg[seg == c] = a
        segs.append(seg)
        max_ids.append(m + int(rng.integers(0, 3)))
    return segs, max_ids


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), perturb=st.booleans(),
       frac=st.sampled_from([0.5, 0.3, 0.9, 1.0]), minv=st.sampled_from([1, 10]),
       iou=st.sampled_from([0.0, 0.5]), dust=st.sampled_from([0, 0, 30]))
def test_library_equals_brute_force(seed, perturb, frac, minv, iou, dust):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(12, 28, 3))
    grid = BlockGrid(shape, tuple(int(v) for v in rng.integers(6, 14, 3)), tuple(int(v) for v in rng.integers(0, 5, 3)))
    gt = blocky_labels(rng, shape, int(rng.integers(2, 30)))
    segs, max_ids = block_segs(rng, grid, gt, perturb)
    rule = MergeRule(frac, minv, iou)
    got, lab = library_reconcile(grid, segs, max_ids, rule, dust)
    want = reference_reconcile(grid, segs, max_ids, rule, dust)
    assert np.array_equal(got, want)
    ids = np.unique(got[got > 0])
    assert np.array_equal(ids, np.arange(1, lab.n_objects + 1))  # contiguous 1..N


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1))
def test_unperturbed_blocks_give_back_the_volume(seed):
    """Blocks that agree in their overlaps: every object (most cross block borders) gets one
    id, different objects different ids: the result is the ground truth relabelled 1..N."""
    rng = np.random.default_rng(seed)
    shape = (20, 26, 26)
    grid = BlockGrid(shape, (8, 9, 10), (3, 3, 3))
    gt = connected(blocky_labels(rng, shape, 15, cell=5))
    segs, max_ids = block_segs(rng, grid, gt, perturb=False)
    got, lab = library_reconcile(grid, segs, max_ids, MergeRule(0.5, 1))
    pairs, _ = K.count_pairs(got, gt)
    assert np.array_equal(pairs[:, 0] == 0, pairs[:, 1] == 0)  # background kept
    nz = pairs[pairs[:, 0] > 0]
    assert len(np.unique(nz[:, 0])) == len(nz) == len(np.unique(nz[:, 1]))  # a bijection
    assert lab.n_objects == len(np.unique(gt[gt > 0]))


def test_match_overlap_rule():
    a = np.zeros((1, 1, 40), np.uint32)
    b = np.zeros((1, 1, 40), np.uint32)
    a[..., 0:20] = 1  # object 1: 20 voxels
    b[..., 0:12] = 5  # shares 12 with a's 1 (12 >= 0.5 * 12)
    b[..., 12:30] = 6  # shares 8 with a's 1: 8 < 0.5 * min(20, 18)
    a[..., 30:33] = 2
    b[..., 30:33] = 7  # 3 shared voxels: below min_voxels 10
    m = match_overlap(a, b, MergeRule(0.5, 10))
    rows = {tuple(p): (n, na, nb, mg) for p, n, na, nb, mg in zip(m.pairs.tolist(), m.n_ab, m.n_a, m.n_b, m.merge)}
    assert rows == {(1, 5): (12, 20, 12, True), (1, 6): (8, 20, 18, False), (2, 7): (3, 3, 3, False)}
    assert m.edges.tolist() == [[1, 5]]
    assert match_overlap(a, b, MergeRule(0.5, 3)).edges.tolist() == [[1, 5], [2, 7]]
    # IoU(1, 5) = 12 / 20 = 0.6
    assert match_overlap(a, b, MergeRule(0.5, 1, 0.61)).edges.tolist() == [[2, 7]]
    assert match_overlap(np.zeros((2, 2, 2), np.uint32), np.zeros((2, 2, 2), np.uint32)).edges.shape == (0, 2)


def test_merge_rule_validation_and_config():
    from floodfilling.config import InferenceConfig
    from floodfilling.geometry import BlockError

    with pytest.raises(BlockError, match="merge_min_fraction"):
        MergeRule(0.0).validate()
    with pytest.raises(BlockError, match="merge_min_voxels"):
        MergeRule(0.5, 0).validate()
    cfg = InferenceConfig().with_overrides(**({"merge_min_fraction": 0.7} if hasattr(InferenceConfig(), "merge_min_fraction") else {}))
    r = MergeRule.from_config(cfg)
    assert r.min_fraction == (0.7 if hasattr(cfg, "merge_min_fraction") else 0.5)
