"""Native overlap-reconciliation kernels (count_pairs, union_find, relabel) vs references."""

from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floodfilling import kernels as K
from floodfilling.kernels_reference import (
    count_pairs_reference, relabel_reference, union_find_reference,
)
from kernel_helpers import edge_cases, forced_parallel, labels, pair_cases, pairs_as_reference

pytestmark = pytest.mark.skipif(not K.HAVE_NATIVE, reason="native extension not built")

SETTINGS = dict(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def portable_scan():
    """count_pairs without its SIMD run scan (the path of CPUs without AVX2)."""
    old = K._native()._set_count_pairs_simd(False)
    try:
        yield
    finally:
        K._native()._set_count_pairs_simd(old)


def counter_pairs(a, b, ignore_zero):
    c = Counter(zip(a.ravel().tolist(), b.ravel().tolist()))
    items = sorted((k, v) for k, v in c.items() if not (ignore_zero and (k[0] == 0 or k[1] == 0)))
    pairs = np.array([k for k, _ in items], np.uint64).reshape(-1, 2)
    counts = np.array([v for _, v in items], np.int64)
    return pairs, counts


def check_pairs(a, b, ignore_zero=False):
    p, c = pairs_as_reference(K.count_pairs, a, b, ignore_zero)  # equal to the reference's
    with forced_parallel():
        pp, pc = K.count_pairs(a, b, ignore_zero=ignore_zero)
    np.testing.assert_array_equal(pp, p)
    np.testing.assert_array_equal(pc, c)
    with portable_scan():
        sp, sc = K.count_pairs(a, b, ignore_zero=ignore_zero)
    np.testing.assert_array_equal(sp, p)
    np.testing.assert_array_equal(sc, c)
    return p, c


@settings(**SETTINGS)
@given(pair_cases())
def test_count_pairs_matches_reference(case):
    shape, da, db, big, n_ids, seed, blocky, ignore_zero = case
    rng = np.random.default_rng(seed)
    a = labels(rng, shape, da, n_ids, big and da == np.uint64, blocky)
    b = labels(rng, shape, db, n_ids, big and db == np.uint64, blocky)
    p, c = check_pairs(a, b, ignore_zero)
    cp, cc = counter_pairs(a, b, ignore_zero)
    np.testing.assert_array_equal(p, cp)
    np.testing.assert_array_equal(c, cc)


@pytest.mark.parametrize("n_ids", [3000, 100000])
def test_count_pairs_many_distinct_pairs(n_ids):
    """Past a few thousand labels per input the dense (label x label) matrix would be too
    large: the counter moves its counts to the sparse one (hash map, then sorted run lists)
    part way; one thread's ranges may hold only 32-bit labels and another's wider ones."""
    rng = np.random.default_rng(11)
    a = rng.integers(0, n_ids, 300_000).astype(np.uint64)
    b = rng.integers(0, n_ids, 300_000).astype(np.uint64)
    a[:1000] = a[:1000] // 64  # a repeated prefix: the map fills before spilling
    check_pairs(a, b)
    check_pairs(a, b, ignore_zero=True)
    wide = a.copy()
    wide[200_000:] += np.uint64(2**33)  # only the last chunk has ids >= 2^32
    check_pairs(wide, b)
    check_pairs(b.astype(np.uint32), wide[::-1])


@pytest.mark.parametrize("blocky", [False, True])
@pytest.mark.parametrize("big", [False, True])
def test_count_pairs_large_threads_agree(blocky, big):
    rng = np.random.default_rng(5)
    a = labels(rng, (40, 64, 64), np.uint64, 300, big, blocky)
    b = labels(rng, (40, 64, 64), np.uint32, 300, False, blocky)
    old_grain = K._native()._set_count_pairs_grain(20_000)
    try:
        results = []
        for t in (1, 2, 5):
            K.set_num_threads(t)
            results.append(check_pairs(a, b, ignore_zero=blocky))
    finally:
        K.set_num_threads(0)
        K._native()._set_count_pairs_grain(old_grain)
    for p, c in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(c, results[0][1])
    assert results[0][1].sum() <= a.size


def test_count_pairs_views_and_dtypes():
    rng = np.random.default_rng(6)
    a = labels(rng, (20, 30, 40), np.uint64, 20, blocky=True)
    b = labels(rng, (40, 30, 20), np.uint32, 20, blocky=True)
    check_pairs(a[:, ::2, 1:], b.transpose(2, 1, 0)[:, ::2, 1:])
    check_pairs(a[::-1], b.T)
    check_pairs(a.astype(np.uint16), b.astype(np.uint8).T)
    check_pairs(a.astype(">u8"), b.T)
    # empty and single voxel
    p, c = check_pairs(np.zeros((0, 3), np.uint32), np.zeros((0, 3), np.uint64))
    assert p.shape == (0, 2) and c.shape == (0,)
    p, c = check_pairs(np.array([[[7]]], np.uint32), np.array([[[2**63]]], np.uint64))
    np.testing.assert_array_equal(p, [[7, 2**63]])
    np.testing.assert_array_equal(c, [1])
    p, c = check_pairs(np.zeros(4, np.uint32), np.arange(4, dtype=np.uint32), ignore_zero=True)
    assert len(p) == 0


def segmentation(rng, shape, n_ids, jitter=0, points_seed=0, dtype=np.uint64, big=False):
    """Nearest-seed labels (blocky objects with oblique boundaries, like a segmentation);
    jitter moves the seeds (another segmentation of the same objects)."""
    prng = np.random.default_rng(points_seed)
    pts = np.stack([prng.integers(0, s, n_ids) for s in shape], axis=1)
    if jitter:
        pts = np.clip(pts + rng.integers(-jitter, jitter + 1, pts.shape), 0, np.array(shape) - 1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    nearest = np.zeros(shape, np.int64)
    best = np.full(shape, np.inf)
    for i, p in enumerate(pts):
        d = ((grid - p) ** 2).sum(axis=-1)
        closer = d < best
        best[closer] = d[closer]
        nearest[closer] = i
    top = 2**40 if big else 2**31
    lut = rng.choice(top, n_ids, replace=False).astype(np.uint64)
    return lut[nearest].astype(dtype)


@pytest.mark.parametrize("big", [False, True])
def test_count_pairs_segmentations(big):
    """Two segmentations of the same objects (the use case): long runs, few pairs, a
    little unlabelled space; one thread and several, both scans."""
    rng = np.random.default_rng(21)
    shape = (12, 40, 72)  # rows not a multiple of the 64-voxel scan words
    a = segmentation(rng, shape, 60, big=big)
    b = segmentation(rng, shape, 60, jitter=3, dtype=np.uint64 if big else np.uint32)
    b[rng.random(shape) < 0.02] = 0
    a[:2] = 0
    for ignore_zero in (False, True):
        p, c = check_pairs(a, b, ignore_zero)
        cp, cc = counter_pairs(a, b, ignore_zero)
        np.testing.assert_array_equal(p, cp)
        np.testing.assert_array_equal(c, cc)
    check_pairs(b, a)


def test_count_pairs_dense_to_sparse_midway():
    """Few labels first (dense counting), then many (the counts move to the sparse counter
    part way through a scan block), with zeros to drop."""
    rng = np.random.default_rng(22)
    n = 200_000
    a = np.repeat(rng.integers(0, 5, n // 50), 50).astype(np.uint64)
    b = np.repeat(rng.integers(0, 4, n // 20), 20).astype(np.uint64)
    a[70_123:] = rng.integers(0, 5000, n - 70_123)
    b[90_001:] = rng.integers(0, 5000, n - 90_001)
    for ignore_zero in (False, True):
        check_pairs(a, b, ignore_zero)
        check_pairs(b.astype(np.uint32), a, ignore_zero)


def test_count_pairs_reuses_scratch_exactly():
    """Matrices and label tables are kept between calls: a call after one with many more
    labels (a larger matrix, other ids) must not see its counts."""
    rng = np.random.default_rng(23)
    many_a = rng.integers(0, 1500, 300_000).astype(np.uint64)
    many_b = rng.integers(0, 1500, 300_000).astype(np.uint64)
    few_a = np.repeat(np.arange(7, dtype=np.uint64), 1000)
    few_b = np.tile(np.arange(3, dtype=np.uint64), 7000 // 3 + 1)[:7000]
    for _ in range(3):
        check_pairs(many_a, many_b)
        p, c = check_pairs(few_a, few_b)
        assert c.sum() == few_a.size
        check_pairs(many_a[:100_000], many_b[:100_000], ignore_zero=True)
        check_pairs(few_a, few_b, ignore_zero=True)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_count_pairs_threads_claim_pieces(threads):
    """Several threads claim pieces of the range dynamically; any split gives the same
    counts (runs cut at piece boundaries are counted in two parts)."""
    rng = np.random.default_rng(24)
    a = labels(rng, (30, 50, 70), np.uint64, 200, blocky=True)
    b = labels(rng, (30, 50, 70), np.uint64, 200, blocky=True)
    want = count_pairs_reference(a, b)
    old_grain = K._native()._set_count_pairs_grain(1000)
    K.set_num_threads(threads)
    try:
        for _ in range(3):
            got = K.count_pairs(a, b)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        K.set_num_threads(0)
        K._native()._set_count_pairs_grain(old_grain)


def test_count_pairs_bad_inputs():
    a = np.zeros((3, 4), np.uint32)
    with pytest.raises(ValueError, match="b"):
        K.count_pairs(a, np.zeros((4, 3), np.uint32))
    with pytest.raises(ValueError, match="a"):
        K.count_pairs(a.astype(np.int32), a)
    with pytest.raises(ValueError, match="b"):
        K.count_pairs(a, a.astype(np.float64))
    with pytest.raises(ValueError, match="a"):
        K.count_pairs(a.tolist(), a)


@settings(**SETTINGS)
@given(edge_cases())
def test_union_find_matches_reference(edges):
    ids, roots = K.union_find(edges)
    rids, rroots = union_find_reference(edges)
    assert ids.dtype == np.uint64 and roots.dtype == np.uint64
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_array_equal(roots, rroots)
    # representatives are minima of their component and fixed points
    lookup = dict(zip(ids.tolist(), roots.tolist()))
    for a, b in edges.astype(np.uint64).tolist():
        assert lookup[a] == lookup[b] <= min(a, b)
    for r in set(roots.tolist()):
        assert lookup[r] == r


def test_union_find_edge_cases():
    ids, roots = K.union_find(np.zeros((0, 2), np.uint64))
    assert ids.shape == (0,) and roots.shape == (0,)
    ids, roots = K.union_find([[5, 5]])
    np.testing.assert_array_equal(ids, [5])
    np.testing.assert_array_equal(roots, [5])
    chain = np.array([[9, 8], [8, 7], [7, 2**64 - 1], [1, 3]], np.uint64)
    ids, roots = K.union_find(chain)
    np.testing.assert_array_equal(ids, [1, 3, 7, 8, 9, 2**64 - 1])
    np.testing.assert_array_equal(roots, [1, 1, 7, 7, 7, 7])
    rng = np.random.default_rng(0)
    big = rng.integers(0, 5000, (20000, 2)).astype(np.uint64)
    for got, want in zip(K.union_find(big), union_find_reference(big)):
        np.testing.assert_array_equal(got, want)


def test_union_find_bad_inputs():
    with pytest.raises(ValueError, match="edges"):
        K.union_find(np.zeros((3, 3), np.uint64))
    with pytest.raises(ValueError, match="edges"):
        K.union_find(np.array([[1, -2]]))
    with pytest.raises(ValueError, match="edges"):
        K.union_find(np.array([[1.0, 2.0]]))


@st.composite
def relabel_cases(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, 8)) for _ in range(ndim))
    dtype = draw(st.sampled_from([np.uint32, np.uint64]))
    key_dtype = draw(st.sampled_from([np.uint32, np.uint64, np.int64]))
    n_keys = draw(st.integers(0, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    blocky = draw(st.booleans())
    return shape, dtype, key_dtype, n_keys, seed, blocky


@settings(**SETTINGS)
@given(relabel_cases())
def test_relabel_matches_reference(case):
    shape, dtype, key_dtype, n_keys, seed, blocky = case
    rng = np.random.default_rng(seed)
    lab = labels(rng, shape, dtype, 25, blocky=blocky)
    keys = np.sort(rng.choice(30, size=min(n_keys, 30), replace=False)).astype(key_dtype)
    values = rng.integers(0, 1000, keys.size).astype(key_dtype)
    got, want, par = lab.copy(), lab.copy(), lab.copy()
    assert K.relabel(got, keys, values) is got
    relabel_reference(want, keys, values)
    np.testing.assert_array_equal(got, want)
    with forced_parallel():
        K.relabel(par, keys, values)
    np.testing.assert_array_equal(par, want)
    mapping = dict(zip(keys.tolist(), values.tolist()))
    expected = np.vectorize(lambda v: mapping.get(v, v), otypes=[np.uint64])(lab)
    np.testing.assert_array_equal(got.astype(np.uint64), expected.reshape(lab.shape))


def test_relabel_large_threads_and_wide_keys():
    rng = np.random.default_rng(7)
    lab = labels(rng, (30, 64, 64), np.uint32, 400, blocky=True)
    keys = np.concatenate([np.arange(0, 400, 3, dtype=np.uint64),
                           np.array([2**32 + 1, 2**60], np.uint64)])
    values = np.arange(keys.size, dtype=np.uint64) * 11
    values[-2:] = 2**62  # keys that cannot occur in uint32 labels: values unchecked
    want = relabel_reference(lab.copy(), keys, values)
    try:
        for t in (1, 2, 4):
            K.set_num_threads(t)
            np.testing.assert_array_equal(K.relabel(lab.copy(), keys, values), want)
    finally:
        K.set_num_threads(0)
    lab64 = lab.astype(np.uint64) + np.uint64(2**40)
    keys64 = np.unique(lab64)[::2]
    want = relabel_reference(lab64.copy(), keys64, keys64 // np.uint64(2))
    np.testing.assert_array_equal(K.relabel(lab64, keys64, keys64 // np.uint64(2)), want)


def test_relabel_bad_inputs():
    lab = np.arange(12, dtype=np.uint32).reshape(3, 4)
    keys, values = np.array([1, 2]), np.array([5, 6])
    with pytest.raises(ValueError, match="labels"):
        K.relabel(lab[:, ::2], keys, values)
    ro = lab.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="labels"):
        K.relabel(ro, keys, values)
    with pytest.raises(ValueError, match="labels"):
        K.relabel(lab.astype(np.int32), keys, values)
    with pytest.raises(ValueError, match="labels"):
        K.relabel(lab.tolist(), keys, values)
    with pytest.raises(ValueError, match="keys"):
        K.relabel(lab, np.array([2, 1]), values)
    with pytest.raises(ValueError, match="keys"):
        K.relabel(lab, np.array([2, 2]), values)
    with pytest.raises(ValueError, match="keys"):
        K.relabel(lab, np.array([-1, 2]), values)
    with pytest.raises(ValueError, match="keys"):
        K.relabel(lab, np.array([1.0, 2.0]), values)
    with pytest.raises(ValueError, match="values"):
        K.relabel(lab, keys, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="values"):
        K.relabel(lab, keys, np.array([1, 2**33]))
    np.testing.assert_array_equal(lab, np.arange(12).reshape(3, 4))  # untouched
