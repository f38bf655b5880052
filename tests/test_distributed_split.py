"""split_components across blocks (floodfilling.distributed.split) against the whole-volume
post-processing (split_disconnected -> remove_dust -> make_contiguous) on random label
volumes cut into block cores of several shapes."""

import numpy as np
import pytest

from floodfilling.distributed import split
from floodfilling.geometry import BlockGrid
from floodfilling.postprocess import postprocess


def blobby_labels(rng, shape, n_ids, p_zero=0.3):
    """Labels with structure: a coarse random field upsampled, then sprinkled noise, so that
    objects have several components and cross block faces."""
    coarse = rng.integers(1, n_ids + 1, size=tuple(max(1, s // 3) for s in shape))
    vol = np.repeat(np.repeat(np.repeat(coarse, 3, 0), 3, 1), 3, 2)
    vol = np.pad(vol, [(0, max(0, s - v)) for s, v in zip(shape, vol.shape)], mode="edge")[: shape[0], : shape[1],
                                                                                            : shape[2]]
    vol = vol.astype(np.uint32)
    vol[rng.random(shape) < p_zero] = 0
    noise = rng.random(shape) < 0.05
    vol[noise] = rng.integers(1, n_ids + 1, size=int(noise.sum()))
    return vol


def split_by_blocks(vol, block, dust):
    grid = BlockGrid(vol.shape, block, (0, 0, 0))
    comps, ccs = [], []
    for b in grid:
        sl = tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop))
        comp, cc = split.label_core(vol[sl].astype(np.uint64), b.core_start)
        comps.append(comp)
        ccs.append(cc)
    edges = []
    for k in range(len(grid)):
        for axis, j in split.face_neighbours(grid, k):
            pi = np.take(comps[k], comps[k].shape[axis] - 1, axis=axis)
            pj = np.take(comps[j], 0, axis=axis)
            e = split.face_edges(pi, pj, ccs[k].gid, ccs[j].gid)
            if len(e):
                edges.append((k, j, e))
    num = split.number_components(ccs, edges, dust)
    out = np.zeros(vol.shape, np.uint64)
    for k, b in enumerate(grid):
        sl = tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop))
        lut = np.concatenate([[0], num.values[k]]).astype(np.uint64)
        out[sl] = lut[comps[k]]
    return out, num


@pytest.mark.parametrize("seed", range(6))
def test_blocks_equal_whole_volume(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(5, 19, size=3))
    vol = blobby_labels(rng, shape, int(rng.integers(1, 12)))
    block = tuple(int(rng.integers(2, s + 1)) for s in shape)
    dust = int(rng.choice([0, 1, 4, 20]))
    want, _ = postprocess(vol, {}, split=True, dust_size=dust)
    got, num = split_by_blocks(vol, block, dust)
    assert np.array_equal(got, want), (shape, block, dust)
    assert num.n_objects == int(want.max())


def test_label_core_order_and_tables():
    # id 5: two pieces, id 2: one piece
    core = np.zeros((1, 3, 6), np.uint64)
    core[0, 0, 4:] = 5  # first voxel (0, 0, 4)
    core[0, 2, 0:2] = 5  # first voxel (0, 2, 0)
    core[0, 1, 1] = 2
    comp, cc = split.label_core(core, (10, 20, 30))
    # numbered by (global id, first voxel): id 2, then id 5's piece at row 0, then its piece at row 2
    assert cc.gid.tolist() == [2, 5, 5]
    assert cc.first.tolist() == [[10, 21, 31], [10, 20, 34], [10, 22, 30]]
    assert cc.count.tolist() == [1, 2, 2]
    assert comp[0, 0, 4] == 2 and comp[0, 2, 0] == 3 and comp[0, 1, 1] == 1 and comp[0, 0, 0] == 0
    # no background at all, and an empty core
    comp, cc = split.label_core(np.full((2, 2, 2), 7, np.uint64), (0, 0, 0))
    assert cc.gid.tolist() == [7] and comp.min() == 1 and cc.count.tolist() == [8]
    comp, cc = split.label_core(np.zeros((2, 2, 2), np.uint64), (0, 0, 0))
    assert cc.gid.size == 0 and not comp.any()


def test_face_edges_join_only_equal_ids():
    pi = np.array([[1, 1, 2], [0, 3, 3]], np.uint32)
    pj = np.array([[1, 2, 2], [1, 1, 0]], np.uint32)
    gid_i = np.array([7, 8, 9], np.uint64)  # components 1, 2, 3
    gid_j = np.array([7, 8], np.uint64)
    # (1,1): 7 == 7 joins; (1,2): 7 vs 8 no; (2,2): 8 == 8 joins; (3,1): 9 vs 7 no
    assert split.face_edges(pi, pj, gid_i, gid_j).tolist() == [[1, 1], [2, 2]]
    with pytest.raises(ValueError, match="plane_j"):
        split.face_edges(pi, pj[:1], gid_i, gid_j)


def test_number_components_hand_case():
    a = split.CoreComponents(np.array([4, 4], np.uint64), np.array([[0, 0, 5], [0, 3, 0]]), np.array([3, 1]))
    b = split.CoreComponents(np.array([4, 1], np.uint64), np.array([[0, 0, 8], [0, 9, 9]]), np.array([2, 6]))
    # a1 joins b1 (same object, first voxel (0,0,5)); a2 alone (0,3,0); b2 is object 1
    num = split.number_components([a, b], [(0, 1, np.array([[1, 1]], np.uint64))])
    assert num.n_objects == 3 and num.n_joins == 1
    assert num.values[0].tolist() == [2, 3] and num.values[1].tolist() == [2, 1]
    num = split.number_components([a, b], [(0, 1, np.array([[1, 1]], np.uint64))], dust_size=2)
    assert num.values[0].tolist() == [2, 0] and num.values[1].tolist() == [2, 1]  # a2 (1 voxel) is dust
