"""Helpers shared by the native-kernel tests."""

from contextlib import contextmanager

import numpy as np
from hypothesis import strategies as st
from scipy import ndimage

from floodfilling import kernels as K


@contextmanager
def forced_parallel(threads=3, grain=5):
    """Run the native kernels multi-threaded even on tiny inputs (count_pairs included)."""
    native = K._native()
    old = native._set_parallel_grain(grain)
    old_pairs = native._set_count_pairs_grain(grain)
    K.set_num_threads(threads)
    try:
        yield
    finally:
        K.set_num_threads(0)
        native._set_parallel_grain(old)
        native._set_count_pairs_grain(old_pairs)


# ------------------------------------------------ FOV cases (OpenMP and SYCL tests)


def bits(a):
    """Bitwise view of a float32 array (NaN payloads and -0.0 compared exactly)."""
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_floats(a, b):
    assert a.shape == b.shape
    np.testing.assert_array_equal(bits(a), bits(b))


def random_values(rng, shape, kind):
    """float32 values with NaN/inf/ties depending on `kind`."""
    if kind == "normal":
        v = rng.standard_normal(shape).astype(np.float32) * 4
    elif kind == "ties":  # few distinct values: many equal maxima
        v = rng.choice(np.array([-3.0, -0.0, 0.0, 1.5, 2.5], np.float32), size=shape)
    else:  # "special": NaN, +-inf, -0.0 sprinkled in
        v = rng.standard_normal(shape).astype(np.float32) * 4
        r = rng.random(shape)
        v[r < 0.05] = np.nan
        v[(r >= 0.05) & (r < 0.08)] = np.inf
        v[(r >= 0.08) & (r < 0.11)] = -np.inf
        v[(r >= 0.11) & (r < 0.14)] = -0.0
    return v


@st.composite
def fov_cases(draw):
    f = tuple(draw(st.sampled_from([1, 3, 5, 7, 9])) for _ in range(3))
    deltas = tuple(draw(st.integers(0, fi // 2)) for fi in f)
    k = draw(st.integers(0, 4))
    layout = draw(st.sampled_from(["distinct", "shared", "list_shared", "stack"]))
    seed = draw(st.integers(0, 2**31 - 1))
    kind_canvas = draw(st.sampled_from(["normal", "ties", "special", "nan"]))
    kind_logits = draw(st.sampled_from(["normal", "ties", "special"]))
    move = draw(st.sampled_from([0.0, 0.9, 2.1972245773362196, -1.0, float("nan")]))
    disco = draw(st.sampled_from([0.0, 0.1, 0.5, -1.0, 1.0]))
    return f, deltas, k, layout, seed, kind_canvas, kind_logits, move, disco


def make_case(f, k, layout, seed, kind_canvas, kind_logits):
    rng = np.random.default_rng(seed)

    def canvas(shape):
        if kind_canvas == "nan":
            c = np.full(shape, np.nan, np.float32)
            if c.size:
                c[tuple(s // 2 for s in shape)] = 2.9444  # like a seed
            return c
        return random_values(rng, shape, kind_canvas)

    logits = random_values(rng, (k,) + f, kind_logits)
    if layout == "stack":
        shape = tuple(fi + int(rng.integers(0, 6)) for fi in f)
        canvases = canvas((k,) + shape)
        shapes = [shape] * k
    elif layout == "shared":
        shape = tuple(fi + int(rng.integers(0, 6)) for fi in f)
        canvases = canvas(shape)
        shapes = [shape] * k
    elif layout == "list_shared":
        shape = tuple(fi + int(rng.integers(0, 6)) for fi in f)
        c = canvas(shape)
        canvases = [c] * k
        shapes = [shape] * k
    else:
        shapes = [tuple(fi + int(rng.integers(0, 8)) for fi in f) for _ in range(k)]
        canvases = [canvas(s) for s in shapes]
    centers = np.array([[rng.integers(fi // 2, si - fi // 2) for fi, si in zip(f, s)]
                        for s in shapes], np.int64).reshape(k, 3)
    return canvases, logits, centers


# ------------------------------------------------ peak cases (OpenMP and SYCL tests)


def distance_map(shape, seed, sigma=1.5, level=0.5):
    """Like the seed map: EDT of a thresholded smooth random edge map + tiny noise."""
    rs = np.random.RandomState(seed)
    edges = ndimage.gaussian_filter(rs.random_sample(shape), sigma) > level
    dt = ndimage.distance_transform_edt(~edges).astype(np.float32)
    return dt + 1e-4 * np.random.RandomState(42).random_sample(shape)


@st.composite
def peak_cases(draw):
    shape = tuple(draw(st.integers(1, 13)) for _ in range(3))
    kind = draw(st.sampled_from(["ints", "ties", "normal", "dist", "inf"]))
    seed = draw(st.integers(0, 2**31 - 1))
    md = draw(st.integers(0, 4))
    thr = draw(st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.5, None, -np.inf]))
    eb = draw(st.sampled_from([True, False, 0, 1, 2, 5, (0, 1, 2), (3, 0, 1)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    if kind == "ints":
        img = rng.integers(0, 4, shape).astype(dtype)
    elif kind == "ties":  # large plateaus
        img = np.kron(rng.integers(0, 3, tuple((s + 2) // 3 for s in shape)),
                      np.ones((3, 3, 3)))[:shape[0], :shape[1], :shape[2]].astype(dtype)
    elif kind == "normal":
        img = rng.standard_normal(shape).astype(dtype)
    elif kind == "inf":
        img = rng.standard_normal(shape).astype(dtype)
        img[rng.random(shape) < 0.2] = np.inf
        img[rng.random(shape) < 0.2] = -np.inf
    else:
        img = distance_map(shape, seed % 1000).astype(dtype)
    return img, md, thr, eb


# ------------------------------------------ label pair cases (OpenMP and SYCL tests)

BIG = np.uint64(2**40)  # ids that do not fit in 32 bits


def labels(rng, shape, dtype, n_ids, big=False, blocky=False):
    if blocky:  # spatially coherent labels (long runs), like segmentations
        coarse = rng.integers(0, n_ids, tuple(max(1, s // 4) for s in shape))
        a = coarse
        for ax, s in enumerate(shape):
            a = np.repeat(a, 4, axis=ax)
            a = np.take(a, np.arange(s) % a.shape[ax], axis=ax)
        a = a.reshape(shape)
    else:
        a = rng.integers(0, n_ids, shape)
    a = a.astype(np.uint64)
    if big:
        a = np.where(a % 2 == 1, a + BIG, a)
    return a.astype(dtype)


@st.composite
def pair_cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    da = draw(st.sampled_from([np.uint32, np.uint64]))
    db = draw(st.sampled_from([np.uint32, np.uint64]))
    big = draw(st.booleans())
    n_ids = draw(st.sampled_from([1, 2, 5, 50]))
    seed = draw(st.integers(0, 2**31 - 1))
    blocky = draw(st.booleans())
    ignore_zero = draw(st.booleans())
    return shape, da, db, big, n_ids, seed, blocky, ignore_zero


def pairs_as_reference(count_pairs, a, b, ignore_zero=False):
    """``count_pairs(a, b)`` (a launcher's) with the result's types checked and equal to
    ``count_pairs_reference``; returns (pairs, counts)."""
    from floodfilling.kernels_reference import count_pairs_reference

    p, c = count_pairs(a, b, ignore_zero=ignore_zero)
    assert p.dtype == np.uint64 and p.ndim == 2 and p.shape[1] == 2
    assert c.dtype == np.int64 and c.shape == (len(p),)
    rp, rc = count_pairs_reference(a, b, ignore_zero=ignore_zero)
    np.testing.assert_array_equal(p, rp)
    np.testing.assert_array_equal(c, rc)
    return p, c


@st.composite
def edge_cases(draw):
    m = draw(st.integers(0, 40))
    n_ids = draw(st.integers(1, 30))
    big = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([np.uint64, np.uint32, np.int64]))
    rng = np.random.default_rng(seed)
    e = rng.integers(0, n_ids, (m, 2)).astype(np.uint64)
    if big and dtype == np.uint64:
        e = e * np.uint64(2**50 + 3)
    return e.astype(dtype)


def commit_case(seed, kind, min_size, same_array):
    """(logits, logits_start, seg, seg_start, size, kwargs) of a random object commit: the box
    in the full logits array (host canvases) or a contiguous copy of it (device canvases)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 9, 3))
    logits = random_values(rng, shape, kind)
    seg = rng.choice(np.array([-1, 0, 0, 0, 3, 7, 2**31 - 1], np.int32), size=shape)
    size = tuple(int(rng.integers(0, s + 1)) for s in shape)
    start = tuple(int(rng.integers(0, s - n + 1)) for s, n in zip(shape, size))
    if same_array:
        lg, lstart = logits, start
    else:
        lg = np.ascontiguousarray(logits[tuple(slice(a, a + n) for a, n in zip(start, size))])
        lstart = (0, 0, 0)
    return lg, lstart, seg, start, size, dict(seg_threshold=0.405, min_size=min_size, new_id=11)


def sycl_backend_or_skip():
    """floodfilling.sycl_backend when its runtime is installed; otherwise the test is skipped
    with the reason, except under ``CI`` (set to anything), where it fails: CI installs the
    extra and must run the SYCL tests."""
    import os

    import pytest

    from floodfilling import sycl_backend as sb

    try:
        sb._find_runtime()
    except sb.SyclError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the SYCL runtime is missing: {exc}")
        pytest.skip(str(exc))
    return sb
