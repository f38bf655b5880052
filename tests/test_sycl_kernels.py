"""SYCL kernels (floodfilling.sycl_backend) on the CPU's SYCL device vs their NumPy references
(exact: canvases, logits and scores bitwise) and the OpenMP launcher's argument checks.

They need the SYCL runtime (``pip install "floodfilling[sycl]"``) and g++. Without the runtime
they are skipped with that reason, except under ``CI`` (set to anything), where a missing
runtime fails them: CI installs the extra and must run them. The first run compiles the host
glue and the kernels into the cache (``$FFN_SYCL_CACHE``, default ~/.cache/floodfilling/sycl);
later runs load both from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floodfilling import kernels as K
from floodfilling.kernels_reference import (
    commit_object_reference, find_peaks_reference, gather_fovs_reference, relabel_reference,
    union_find_reference, update_fovs_reference,
)
from kernel_helpers import (
    assert_same_floats, commit_case, distance_map, edge_cases, fov_cases, labels, make_case,
    pair_cases, pairs_as_reference, peak_cases, random_values,
)

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def S():
    """floodfilling.sycl_backend on the CPU SYCL device (skip: runtime absent, outside CI)."""
    from kernel_helpers import sycl_backend_or_skip

    sb = sycl_backend_or_skip()
    sb.select_device("cpu")
    sb.backend()  # compile errors fail here, once
    yield sb
    sb.select_device(None)


def copy_canvases(cv):
    if isinstance(cv, np.ndarray):
        return cv.copy()
    memo = {}
    return [memo.setdefault(id(c), c.copy()) for c in cv]  # keep the sharing structure


def as_list(cv):
    return cv if isinstance(cv, list) else [cv]


def run_both(S, canvases, logits, centers, **kw):
    """SYCL and reference on independent copies: scores, offsets, logits, canvases equal."""
    cs, cr = copy_canvases(canvases), copy_canvases(canvases)
    ls, lr = logits.copy(), logits.copy()
    ss, os_ = S.update_fovs(cs, ls, centers, **kw)
    sr, orf = update_fovs_reference(cr, lr, centers, **kw)
    assert ss.dtype == np.float32 and os_.dtype == np.int64
    assert ss.shape == (len(logits), 6) and os_.shape == (len(logits), 6, 3)
    assert_same_floats(ss, sr)
    np.testing.assert_array_equal(os_, orf)
    assert_same_floats(ls, lr)
    for a, b in zip(as_list(cs), as_list(cr)):
        assert_same_floats(a, b)
    return ss, os_, cs, ls


# ------------------------------------------------------------------------ FOV update


@settings(**SETTINGS)
@given(fov_cases())
def test_update_fovs_matches_reference(S, case):
    f, deltas, k, layout, seed, kc, kl, move, disco = case
    canvases, logits, centers = make_case(f, k, layout, seed, kc, kl)
    run_both(S, canvases, logits, centers, move_threshold=move, deltas=deltas,
             disco_seed_threshold=disco)


@settings(**SETTINGS)
@given(fov_cases(), st.floats(allow_nan=True, width=32))
def test_gather_fovs_matches_reference(S, case, pad):
    f, _, k, layout, seed, kc, _, _, _ = case
    canvases, _, centers = make_case(f, k, layout, seed, kc, "normal")
    out = np.full((k,) + f, 7.0, np.float32)
    assert S.gather_fovs(canvases, centers, f, pad, out) is out
    assert_same_floats(out, gather_fovs_reference(canvases, centers, f, pad))


@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("layout", ["separate", "shared"])
@pytest.mark.parametrize("disco", [0.0, -1.0])
def test_full_size_fovs(S, k, layout, disco):
    """K FOVs of 33^3, deltas 8, NaN canvases with seeds (the inference case)."""
    rng = np.random.default_rng(k)
    shape = (70, 72, 74)
    if layout == "separate":
        canvases = [np.full(shape, np.nan, np.float32) for _ in range(k)]
    else:
        canvases = [np.full(shape, np.nan, np.float32)] * k
    for c in {id(c): c for c in canvases}.values():
        c[rng.random(shape) < 0.3] = rng.standard_normal() * 3
    logits = random_values(rng, (k, 33, 33, 33), "special")
    centers = np.stack([rng.integers(16, s - 16, k) for s in shape], 1)
    run_both(S, canvases, logits, centers, move_threshold=0.9, deltas=(8, 8, 8),
             disco_seed_threshold=disco)
    out = np.empty((k, 33, 33, 33), np.float32)
    S.gather_fovs(canvases, centers, 33, 0.05, out)
    assert_same_floats(out, gather_fovs_reference(canvases, centers, 33, 0.05))


def test_overlapping_boxes_on_one_canvas_are_written_in_order(S):
    rng = np.random.default_rng(2)
    canvas = np.full((40, 40, 40), np.nan, np.float32)
    logits = rng.standard_normal((6, 9, 9, 9)).astype(np.float32)
    centers = np.array([[10, 10, 10], [12, 11, 10], [10, 10, 10], [14, 14, 14],
                        [13, 12, 11], [10, 12, 14]])
    run_both(S, [canvas] * 6, logits, centers, move_threshold=0.0, deltas=(2, 3, 4))
    run_both(S, canvas, logits, centers, move_threshold=0.0, deltas=(2, 3, 4))
    big = np.full((2, 40, 40, 40), np.nan, np.float32)  # views of one buffer share memory
    run_both(S, [big[0], big[0], big[1], big[0]], logits[:4], centers[:4],
             move_threshold=0.0, deltas=4)
    run_both(S, big, logits[:2], centers[:2], move_threshold=0.0, deltas=4)


def test_single_voxel_fov_zero_deltas_and_empty_batch(S):
    s, o, c, _ = run_both(S, [np.full((1, 1, 1), np.nan, np.float32)],
                          np.array([[[[1.5]]]], np.float32), np.zeros((1, 3), np.int64),
                          move_threshold=0.9, deltas=0)
    assert np.all(np.isneginf(s)) and not o.any() and c[0][0, 0, 0] == np.float32(1.5)
    s, o = S.update_fovs([], np.zeros((0, 3, 3, 3), np.float32), np.zeros((0, 3), np.int64),
                         move_threshold=0.9, deltas=1)
    assert s.shape == (0, 6) and o.shape == (0, 6, 3)
    out = np.zeros((0, 3, 3, 3), np.float32)
    assert S.gather_fovs([], np.zeros((0, 3), np.int64), 3, 0.0, out) is out


def test_usm_arrays_are_used_in_place(S):
    """Canvases, logits and out allocated by sycl_backend.empty (USM shared) work as well."""
    rng = np.random.default_rng(5)
    host = [random_values(rng, (40, 41, 42), "special") for _ in range(3)]
    usm = [S.empty(h.shape) for h in host]
    for u, h in zip(usm, host):
        u[...] = h
    logits = random_values(rng, (3, 17, 17, 17), "normal")
    ul = S.empty(logits.shape)
    ul[...] = logits
    centers = np.array([[20, 20, 20], [8, 8, 8], [31, 32, 33]])
    ss, so = S.update_fovs(usm, ul, centers, move_threshold=0.9, deltas=8)
    sr, orf = update_fovs_reference(host, logits, centers, move_threshold=0.9, deltas=8)
    assert_same_floats(ss, sr)
    np.testing.assert_array_equal(so, orf)
    assert_same_floats(ul, logits)
    for u, h in zip(usm, host):
        assert_same_floats(u, h)
    out = S.empty((3, 17, 17, 17))
    S.gather_fovs(usm, centers, 17, 0.0, out)
    assert_same_floats(out, gather_fovs_reference(host, centers, 17, 0.0))


# --------------------------------------------------------- argument checks (as OpenMP)


def _good():
    return np.zeros((10, 10, 10), np.float32), np.zeros((1, 5, 5, 5), np.float32), \
        np.array([[5, 5, 5]])


UPDATE_BAD = [
    lambda c, l, x: (c.astype(np.float64), l, x),
    lambda c, l, x: (c[:, :, ::2], l, x),
    lambda c, l, x: (c[0], l, x),
    lambda c, l, x: ([c, c], l, x),
    lambda c, l, x: ("abc", l, x),
    lambda c, l, x: ([c.tolist()], l, x),
    lambda c, l, x: (np.zeros((2, 10, 10, 10), np.float32), l, x),
    lambda c, l, x: (c.astype(">f4"), l, x),
    lambda c, l, x: (c, l.astype(np.float64), x),
    lambda c, l, x: (c, l[0], x),
    lambda c, l, x: (c, np.zeros((1, 4, 5, 5), np.float32), x),
    lambda c, l, x: (c, np.zeros((1, 5, 5, 10), np.float32)[..., ::2], x),
    lambda c, l, x: (c, l.tolist(), x),
    lambda c, l, x: (c, l, np.array([[5.0, 5.0, 5.0]])),
    lambda c, l, x: (c, l, np.array([[5, 5]])),
    lambda c, l, x: (c, l, np.array([[1, 5, 5]])),
    lambda c, l, x: (c, l, np.array([[5, 5, 8]])),
    lambda c, l, x: (c, l, np.array([[5, -3, 5]])),
    lambda c, l, x: (c, l, np.array([[5, 5, 2**63 + 5]], np.uint64)),
    lambda c, l, x: (c, l, [[5, 5, 5], [1, 1, 1]]),
]


def _error(f):
    try:
        f()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("no ValueError")


@pytest.mark.parametrize("i", range(len(UPDATE_BAD)))
def test_update_fovs_bad_inputs_fail_as_openmp(S, i):
    def call(mod):
        c, l, x = UPDATE_BAD[i](*_good())
        cv = [c] if isinstance(c, np.ndarray) and c.ndim == 3 and i != 6 else c
        return lambda: mod.update_fovs(cv, l, x, move_threshold=0.9, deltas=1)

    assert _error(call(S)) == _error(call(K))


def test_update_fovs_readonly_deltas_and_gather_bad_inputs_fail_as_openmp(S):
    cases = []
    c, l, x = _good()
    l.flags.writeable = False
    cases.append(lambda m: m.update_fovs([c], l, x, move_threshold=0.9, deltas=1))
    c2 = c.copy()
    c2.flags.writeable = False
    cases.append(lambda m: m.update_fovs([c2], _good()[1], x, move_threshold=0.9, deltas=1))
    for bad in (3, (1, 1), (1, 1, -1), "a", 1.5):
        cases.append(lambda m, bad=bad: m.update_fovs([c], _good()[1], x, move_threshold=0.9,
                                                        deltas=bad))
    out = np.zeros((1, 5, 5, 5), np.float32)
    for args in [([c], x, 5, 0.0, out.astype(np.float64)),
                 ([c], x, 5, 0.0, np.zeros((1, 5, 5, 10), np.float32)[..., ::2]),
                 ([c], x, 4, 0.0, np.zeros((1, 4, 4, 4), np.float32)),
                 ([c], x, 3, 0.0, out), ([c], [[5, 5, 9]], 5, 0.0, out),
                 ([c.astype(np.float16)], x, 5, 0.0, out), ([c], x, (5, 5), 0.0, out)]:
        cases.append(lambda m, args=args: m.gather_fovs(*args))
    for case in cases:
        assert _error(lambda: case(S)) == _error(lambda: case(K))
    c2_copy = c2.copy()
    S.gather_fovs([c2], x, 5, 0.0, out)  # read-only canvases are fine for gathering
    assert np.array_equal(c2, c2_copy)


# -------------------------------------------------------------------------- peaks


def check_peaks(S, image, md=3, thr=0.0, eb=True):
    """SYCL == OpenMP == reference (scikit-image, when installed)."""
    got = S.find_peaks(image, min_distance=md, threshold=thr, exclude_border=eb)
    assert got.dtype == np.int64 and got.ndim == 2 and got.shape[1] == 3
    np.testing.assert_array_equal(got, K.find_peaks(image, md, thr, eb))
    try:
        import skimage.feature  # noqa: F401
    except ImportError:
        return got
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(got, find_peaks_reference(image, md, thr, eb))
    return got


@settings(**SETTINGS)
@given(peak_cases())
def test_find_peaks_matches_reference(S, case):
    img, md, thr, eb = case
    check_peaks(S, img, md, thr, eb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("md", [1, 3, 6])
def test_find_peaks_distance_map(S, dtype, md):
    img = distance_map((40, 48, 44), 7).astype(dtype)
    assert len(check_peaks(S, img, md, 0.0)) > 5
    check_peaks(S, img, md, 0.0, eb=False)


def test_find_peaks_edge_cases_and_bad_inputs(S):
    assert len(check_peaks(S, np.ones((9, 9, 9), np.float32), 1)) == 0  # all maxima
    check_peaks(S, np.full((1, 1, 1), 3.0), 3, 0.0)
    check_peaks(S, np.full((1, 1, 1), 3.0), 3, 0.0, eb=False)
    assert S.find_peaks(np.zeros((0, 4, 4), np.float32)).shape == (0, 3)
    img = np.zeros((9, 9, 9))
    img[4, 4, 4:7] = 2.0  # plateau: the raster-first one
    np.testing.assert_array_equal(check_peaks(S, img, 3, 0.0, eb=0), [[4, 4, 4]])
    img = np.zeros((9, 9, 9), np.float32)
    img[4, 4, 4] = np.float32(0.1)
    assert len(check_peaks(S, img, 2, 0.1)) == 0 and len(check_peaks(S, img, 2, 0.09999)) == 1
    view = np.swapaxes(distance_map((30, 34, 36), 5), 0, 2)
    check_peaks(S, view)
    check_peaks(S, view.astype(">f8"))
    nan = np.zeros((5, 5, 5), np.float32)
    nan[2, 2, 2] = np.nan
    for args in [(nan,), (nan, 0), (np.zeros((5, 5, 5), np.int32),), (nan[0],), (img, -1),
                 (img, 1.5), (img, 3, 0.0, -2), (img, 3, 0.0, (1, 2)), (img, 3, "high")]:
        assert _error(lambda: S.find_peaks(*args)) == _error(lambda: K.find_peaks(*args))


# --------------------------------------------------------------------- count_pairs


def check_pairs(S, a, b, ignore_zero=False):
    return pairs_as_reference(S.count_pairs, a, b, ignore_zero)


@settings(**SETTINGS)
@given(pair_cases())
def test_count_pairs_matches_reference(S, case):
    shape, da, db, big, n_ids, seed, blocky, ignore_zero = case
    rng = np.random.default_rng(seed)
    a = labels(rng, shape, da, n_ids, big and da == np.uint64, blocky)
    b = labels(rng, shape, db, n_ids, big and db == np.uint64, blocky)
    check_pairs(S, a, b, ignore_zero)


def test_count_pairs_many_pairs_views_and_extremes(S):
    rng = np.random.default_rng(11)
    a = rng.integers(0, 100000, 300_000).astype(np.uint64)
    b = rng.integers(0, 3000, 300_000).astype(np.uint32)
    a[200_000:] += np.uint64(2**33)
    check_pairs(S, a, b)
    check_pairs(S, a, b, ignore_zero=True)
    blocky = labels(rng, (40, 64, 64), np.uint64, 300, True, True)
    other = labels(rng, (40, 64, 64), np.uint32, 300, False, True)
    check_pairs(S, blocky, other, ignore_zero=True)
    check_pairs(S, blocky[::-1, ::2], other.T.T[::-1, ::2])
    check_pairs(S, blocky.astype(">u8"), other.astype(np.uint16))
    top = np.uint64(2**64 - 1)  # the label whose key + 1 is 0 in the device tables
    x = np.array([top, top, 0, 5, top, 2**63], np.uint64)
    y = np.array([top, 1, top, 5, top, 0], np.uint64)
    p, c = check_pairs(S, x, y)
    assert p.tolist()[-1] == [2**64 - 1, 2**64 - 1] and c[-1] == 2
    p, c = check_pairs(S, np.zeros((0, 3), np.uint32), np.zeros((0, 3), np.uint64))
    assert p.shape == (0, 2) and c.shape == (0,)
    check_pairs(S, np.array([[[7]]], np.uint32), np.array([[[2**63]]], np.uint64))
    for args in [(a, b[:-1]), (a.astype(np.int64), b), (a.tolist(), b), (a, b.astype(np.float32))]:
        assert _error(lambda: S.count_pairs(*args)) == _error(lambda: K.count_pairs(*args))


# ---------------------------------------------------------------------- union_find


@settings(**SETTINGS)
@given(edge_cases())
def test_union_find_matches_reference(S, edges):
    ids, roots = S.union_find(edges)
    rids, rroots = union_find_reference(edges)
    assert ids.dtype == np.uint64 and roots.dtype == np.uint64
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_array_equal(roots, rroots)


def test_union_find_long_chains_extremes_and_bad_inputs(S):
    # a chain whose minimum is at its far end needs many hooking rounds
    n = 5000
    chain = np.stack([np.arange(n, 0, -1), np.arange(n - 1, -1, -1)], 1).astype(np.uint64)
    rng = np.random.default_rng(3)
    for edges in [chain, chain[rng.permutation(n)], rng.integers(0, 5000, (20000, 2)),
                  np.array([[9, 8], [8, 7], [7, 2**64 - 1], [1, 3]], np.uint64),
                  np.zeros((0, 2), np.uint64), [[5, 5]]]:
        got, want = S.union_find(edges), union_find_reference(np.asarray(edges, np.uint64))
        for g, w, o in zip(got, want, K.union_find(edges)):
            np.testing.assert_array_equal(g, w)
            np.testing.assert_array_equal(g, o)
    for args in [np.zeros((3, 3), np.uint64), np.array([[1, -2]]), np.array([[1.0, 2.0]])]:
        assert _error(lambda: S.union_find(args)) == _error(lambda: K.union_find(args))


# ------------------------------------------------------------------- object commit


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["normal", "ties", "special"]),
       min_size=st.sampled_from([0, 1, 5, 40, 10**6]), same_array=st.booleans())
def test_commit_object_matches_reference(S, seed, kind, min_size, same_array):
    lg, lstart, seg, start, size, kw = commit_case(seed, kind, min_size, same_array)
    got_seg, want_seg, omp_seg = seg.copy(), seg.copy(), seg.copy()
    got = S.commit_object(lg, lstart, got_seg, start, size, **kw)
    want = commit_object_reference(lg, lstart, want_seg, start, size, **kw)
    omp = K.commit_object(lg, lstart, omp_seg, start, size, **kw)
    assert got[0] == want[0] == omp[0]
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == np.int64 and np.array_equal(g, w)
    assert np.array_equal(got_seg, want_seg)


def test_commit_object_large_box_and_bad_inputs_fail_as_openmp(S):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(40, 50, 60)).astype(np.float32)
    seg = rng.choice(np.array([0, 0, 3, 9, 12], np.int32), size=(40, 50, 60))
    for box in [((0, 0, 0), (0, 0, 0), (40, 50, 60)), ((3, 4, 5), (3, 4, 5), (30, 20, 50))]:
        a, b = seg.copy(), seg.copy()
        kw = dict(seg_threshold=0.3, min_size=100, new_id=77)
        got = S.commit_object(logits, box[0], a, box[1], box[2], **kw)
        want = K.commit_object(logits, box[0], b, box[1], box[2], **kw)
        assert got[0] == want[0] and np.array_equal(a, b)
        assert all(np.array_equal(g, w) for g, w in zip(got[1:], want[1:]))
    lg = np.zeros((4, 4, 4), np.float32)
    sg = np.zeros((4, 4, 4), np.int32)
    ro = sg.copy()
    ro.flags.writeable = False
    kw = dict(seg_threshold=0.5, min_size=1, new_id=1)
    for args, extra in [((lg, (1, 0, 0), sg, (0, 0, 0), (4, 4, 4)), kw),
                        ((lg, (0, 0, 0), sg, (0, 0, 2), (3, 3, 3)), kw),
                        ((lg, (0, 0, 0), sg.astype(np.int64), (0, 0, 0), (4, 4, 4)), kw),
                        ((lg, (0, 0, 0), np.zeros((4, 4, 8), np.int32)[:, :, ::2], (0, 0, 0),
                          (4, 4, 4)), kw),
                        ((lg.astype(np.float64), (0, 0, 0), sg, (0, 0, 0), (4, 4, 4)), kw),
                        ((lg, (0, 0, 0), sg, (0, 0, 0), (4, 4, 4)), dict(kw, new_id=0)),
                        ((lg, (0, 0, 0), ro, (0, 0, 0), (4, 4, 4)), kw),
                        ((lg, (0, 0, 0), sg, (0, 0, 0), (-1, 4, 4)), kw),
                        ((lg[0], (0, 0, 0), sg, (0, 0, 0), (4, 4, 4)), kw),
                        (([1.0], (0, 0, 0), sg, (0, 0, 0), (4, 4, 4)), kw)]:
        assert _error(lambda: S.commit_object(*args, **extra)) == \
            _error(lambda: K.commit_object(*args, **extra))


# ------------------------------------------------------------------------- relabel


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_relabel_matches_reference(S, dtype):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 300, (33, 40, 50)).astype(dtype)
    for keys in [np.arange(0, 400, 3, dtype=np.uint64), np.array([], np.uint64),
                 np.array([5], np.uint64), np.array([0, 7, 2**33], np.uint64)]:
        values = (keys * 7 + 1) % 2**31
        got, want, omp = labels.copy(), labels.copy(), labels.copy()
        assert S.relabel(got, keys, values) is got
        relabel_reference(want, keys, values)
        K.relabel(omp, keys, values)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, omp)
    big = np.array([2**40, 2**40 + 5], np.uint64)
    if dtype == np.uint64:
        lab = np.array([2**40, 3, 2**40 + 5], dtype)
        S.relabel(lab, big, np.array([1, 2], np.uint64))
        assert lab.tolist() == [1, 3, 2]
    empty = np.zeros((0, 4), dtype)
    S.relabel(empty, [1], [2])


def test_relabel_bad_inputs_fail_as_openmp(S):
    lab = np.zeros(10, np.uint32)
    ro = lab.copy()
    ro.flags.writeable = False
    for args in [(lab.astype(np.int32), [1], [2]), (lab[::2], [1], [2]), (ro, [1], [2]),
                 (lab, [2, 1], [1, 2]), (lab, [1, 2], [1]), (lab, [1], [2**32]),
                 (lab, [-1], [2]), (lab.tolist(), [1], [2])]:
        assert _error(lambda: S.relabel(*args)) == _error(lambda: K.relabel(*args))


# ------------------------------------------------------------------- errors, import


def _one_line_error(f):
    from floodfilling.sycl_backend import SyclError

    with pytest.raises(SyclError) as info:
        f()
    msg = str(info.value)
    assert "\n" not in msg and len(msg) <= 700, msg
    return msg


def test_missing_runtime_is_one_line(monkeypatch, tmp_path):
    """(runs without the runtime too)"""
    from floodfilling import sycl_backend as S

    monkeypatch.setattr(S, "_STATE", {"lib": None, "backends": {}, "stats": {},
                                      "selector": "cpu"})
    monkeypatch.setattr(S, "_prefixes", lambda: [tmp_path])
    msg = _one_line_error(lambda: S.relabel(np.zeros(3, np.uint32), [1], [2]))
    assert 'pip install "floodfilling[sycl]"' in msg


def test_unwritable_cache_is_one_line(S, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FFN_SYCL_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(S, "_STATE", {"lib": None, "backends": {}, "stats": {},
                                      "selector": "cpu"})
    assert "FFN_SYCL_CACHE" in _one_line_error(S.backend)


def test_device_without_fp64_is_one_line():
    """(runs without the runtime too)"""
    from floodfilling import sycl_backend as S

    msg = _one_line_error(lambda: S._check_device({"name": "Some GPU", "fp64": False,
                                                   "can_compile_sycl": True}))
    assert "Some GPU" in msg and "fp64" in msg
    S._check_device({"name": "x", "fp64": True, "can_compile_sycl": True})


def test_missing_compiler_bad_selector_and_failed_compile_are_one_line(S, monkeypatch,
                                                                       tmp_path):
    monkeypatch.setenv("FFN_SYCL_CXX", "no-such-compiler-ffn")
    assert "no-such-compiler-ffn" in _one_line_error(S._compiler)
    monkeypatch.delenv("FFN_SYCL_CXX")
    assert "selector" in _one_line_error(lambda: S.backend("nonsense:cpu:x"))
    assert "no SYCL device" in _one_line_error(lambda: S.backend("cuda:gpu"))
    # a kernel source that does not compile: the compiler's first error, one line
    sycl_dir, root = S._sources()
    (tmp_path / "sycl").mkdir()
    shutil.copytree(root / "kernels", tmp_path / "kernels")
    shutil.copy(sycl_dir / "host.cpp", tmp_path / "sycl" / "host.cpp")
    (tmp_path / "sycl" / "kernels.cpp").write_text(
        (sycl_dir / "kernels.cpp").read_text() + "\nint broken( {\n")
    monkeypatch.setattr(S, "_sources", lambda: (tmp_path / "sycl", tmp_path))
    monkeypatch.setitem(S._STATE, "backends", {})
    msg = _one_line_error(lambda: S.backend("cpu"))
    assert "compiling the SYCL kernels" in msg and "error" in msg


def _env():
    import floodfilling

    path = str(Path(floodfilling.__file__).resolve().parents[1])  # the package under test
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [path] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))


def test_nothing_imports_the_backend():
    """(runs without the runtime too)"""
    code = ("import sys, floodfilling, floodfilling.kernels, floodfilling.kernels_reference, "
            "floodfilling.cli; assert 'floodfilling.sycl_backend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=300)


def test_report(S):
    env = _env()
    p = subprocess.run([sys.executable, "-m", "floodfilling.sycl_backend", "--json",
                        "--device", "cpu"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    import json
    rep = json.loads(p.stdout)
    assert rep["type"] == "cpu" and rep["fp64"] is True and rep["host_cached"] is True
    assert {"device", "driver", "backend", "cache", "kernel_compile_s"} <= set(rep)


def test_launchers_report_and_status_devices(S, capsys):
    import json

    from floodfilling.cli import main

    p = subprocess.run([sys.executable, "-m", "floodfilling.kernels", "--json", "--device", "cpu"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["openmp"]["native"] is True and rep["openmp"]["threads"] >= 1
    assert rep["sycl"]["type"] == "cpu" and rep["sycl"]["fp64"] is True
    assert main(["status", "--devices"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("openmp  ") and "\nsycl    opencl:cpu " in out and "fp64 yes" in out
    assert "\ntorch   " in out and "runtime 2026" in out


def test_status_devices_without_the_runtime_says_why(monkeypatch, tmp_path, capsys):
    """(runs without the runtime too)"""
    from floodfilling import sycl_backend as sb
    from floodfilling.cli import main

    monkeypatch.setattr(sb, "_STATE", {"lib": None, "backends": {}, "stats": {}, "selector": None})
    monkeypatch.setattr(sb, "_prefixes", lambda: [tmp_path])
    monkeypatch.delenv("FFN_SYCL_ROOT", raising=False)
    assert main(["status", "--devices"]) == 0
    out = capsys.readouterr().out
    assert "\nsycl    unavailable: " in out and 'pip install "floodfilling[sycl]"' in out
    assert main(["status", "--devices", "--json"]) == 0
    import json

    assert "error" in json.loads(capsys.readouterr().out)["sycl"]
