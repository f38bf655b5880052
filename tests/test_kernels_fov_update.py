"""Native FOV update / gather kernels vs their NumPy references (exact, bitwise)."""


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floodfilling import kernels as K
from floodfilling.kernels_reference import (
    commit_object_reference, gather_fovs_reference, update_fovs_reference,
)
from kernel_helpers import (
    assert_same_floats, commit_case, fov_cases, forced_parallel, make_case, random_values,
)

pytestmark = pytest.mark.skipif(not K.HAVE_NATIVE, reason="native extension not built")

SETTINGS = dict(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def run_both(canvases, logits, centers, **kw):
    """Run native and reference on independent copies; check every output and effect."""
    def copy_canvases(cv):
        if isinstance(cv, np.ndarray):
            return cv.copy()
        memo = {}
        return [memo.setdefault(id(c), c.copy()) for c in cv]  # keep sharing structure

    cn, cr, cp = copy_canvases(canvases), copy_canvases(canvases), copy_canvases(canvases)
    ln, lr, lp = logits.copy(), logits.copy(), logits.copy()
    sn, on = K.update_fovs(cn, ln, centers, **kw)
    sr, orf = update_fovs_reference(cr, lr, centers, **kw)
    with forced_parallel():
        sp, op = K.update_fovs(cp, lp, centers, **kw)
    assert_same_floats(sp, sr)
    np.testing.assert_array_equal(op, orf)
    assert_same_floats(lp, lr)
    for a, b in zip(cp if isinstance(cp, list) else [cp], cr if isinstance(cr, list) else [cr]):
        assert_same_floats(a, b)
    assert sn.dtype == np.float32 and on.dtype == np.int64
    assert sn.shape == (len(logits), 6) and on.shape == (len(logits), 6, 3)
    assert_same_floats(sn, sr)
    np.testing.assert_array_equal(on, orf)
    assert_same_floats(ln, lr)
    if isinstance(cn, np.ndarray):
        assert_same_floats(cn, cr)
    else:
        for a, b in zip(cn, cr):
            assert_same_floats(a, b)
    return sn, on, cn, ln


@settings(**SETTINGS)
@given(fov_cases())
def test_update_fovs_matches_reference(case):
    f, deltas, k, layout, seed, kc, kl, move, disco = case
    canvases, logits, centers = make_case(f, k, layout, seed, kc, kl)
    run_both(canvases, logits, centers, move_threshold=move, deltas=deltas,
             disco_seed_threshold=disco)


@settings(**SETTINGS)
@given(fov_cases(), st.floats(allow_nan=True, width=32))
def test_gather_fovs_matches_reference(case, pad):
    f, _, k, layout, seed, kc, _, _, _ = case
    canvases, _, centers = make_case(f, k, layout, seed, kc, "normal")
    out = np.full((k,) + f, 7.0, np.float32)
    res = K.gather_fovs(canvases, centers, f, pad, out)
    assert res is out
    ref = gather_fovs_reference(canvases, centers, f, pad)
    assert_same_floats(out, ref)
    out2 = np.full((k,) + f, 7.0, np.float32)
    with forced_parallel():
        K.gather_fovs(canvases, centers, f, pad, out2)
    assert_same_floats(out2, ref)


def test_full_size_fov_and_parallel_threads():
    """33^3 FOVs, deltas 8, K distinct canvases: 1 thread and all threads agree."""
    rng = np.random.default_rng(1)
    k = 5
    canvases = [np.full((60, 61, 62), np.nan, np.float32) for _ in range(k)]
    for c in canvases:
        c[rng.random(c.shape) < 0.5] = rng.standard_normal() * 3
    logits = rng.standard_normal((k, 33, 33, 33)).astype(np.float32) * 3
    centers = np.array([[16, 16, 16], [43, 44, 45], [30, 30, 30], [16, 44, 30], [20, 21, 22]])
    before = K.get_num_threads()
    try:
        results = []
        for t in (1, 2, 4):
            K.set_num_threads(t)
            results.append(run_both(canvases, logits, centers, move_threshold=0.9,
                                    deltas=(8, 8, 8), disco_seed_threshold=0.0))
        for r in results[1:]:
            assert_same_floats(r[0], results[0][0])
            np.testing.assert_array_equal(r[1], results[0][1])
    finally:
        K.set_num_threads(0)
    assert K.get_num_threads() == before


def test_overlapping_boxes_on_one_canvas_are_written_in_order():
    rng = np.random.default_rng(2)
    canvas = np.full((40, 40, 40), np.nan, np.float32)
    logits = rng.standard_normal((6, 9, 9, 9)).astype(np.float32)
    centers = np.array([[10, 10, 10], [12, 11, 10], [10, 10, 10], [14, 14, 14],
                        [13, 12, 11], [10, 12, 14]])
    run_both([canvas] * 6, logits, centers, move_threshold=0.0, deltas=(2, 3, 4))
    run_both(canvas, logits, centers, move_threshold=0.0, deltas=(2, 3, 4))
    # views of one buffer also share memory: must stay serial and ordered
    big = np.full((2, 40, 40, 40), np.nan, np.float32)
    run_both([big[0], big[0], big[1], big[0]], logits[:4], centers[:4], move_threshold=0.0,
             deltas=4)


def test_single_voxel_fov_and_zero_deltas():
    canvas = np.full((1, 1, 1), np.nan, np.float32)
    logits = np.array([[[[1.5]]]], np.float32)
    s, o, c, _ = run_both([canvas], logits, np.zeros((1, 3), np.int64), move_threshold=0.9,
                          deltas=0)
    assert np.all(np.isneginf(s)) and not o.any()
    assert c[0][0, 0, 0] == np.float32(1.5)


def test_fov_touching_every_border():
    rng = np.random.default_rng(3)
    canvas = rng.standard_normal((33, 35, 34)).astype(np.float32)
    logits = rng.standard_normal((4, 33, 33, 33)).astype(np.float32)
    centers = np.array([[16, 16, 16], [16, 18, 17], [16, 17, 16], [16, 16, 17]])
    run_both(canvas, logits, centers, move_threshold=0.5)


def test_disco_rule_semantics():
    """old < 0 and new > old keeps old; NaN old never matches; active only above the
    disco fraction."""
    canvas = np.array([-2.0, -1.0, np.nan, 1.0, -3.0, 0.5, -0.5, -4.0, 2.0],
                      np.float32).reshape(1, 1, 9).repeat(3, 0).repeat(3, 1)
    new = np.array([3.0, -2.0, 4.0, 2.0, 5.0, 0.1, 0.0, -5.0, 3.0], np.float32)
    logits = np.broadcast_to(new, (1, 3, 3, 9)).copy()
    _, _, c, written = run_both([canvas.copy()], logits.copy(), [[1, 1, 4]],
                                move_threshold=2.5, deltas=(1, 1, 4), disco_seed_threshold=0.2)
    expected = np.array([-2.0, -2.0, 4.0, 2.0, -3.0, 0.1, -0.5, -5.0, 3.0], np.float32)
    np.testing.assert_array_equal(written[0, 1, 1], expected)
    np.testing.assert_array_equal(c[0][1, 1], expected)
    # fraction >= 2.5 is 4/9 = 0.44: a higher disco threshold disables the rule
    _, _, c, written = run_both([canvas.copy()], logits.copy(), [[1, 1, 4]],
                                move_threshold=2.5, deltas=(1, 1, 4), disco_seed_threshold=0.5)
    np.testing.assert_array_equal(written[0, 1, 1], new)


def test_face_argmax_nan_and_first_maximum():
    logits = np.zeros((1, 5, 5, 5), np.float32)
    logits[0, 0, 1, 3] = 1.0  # z- face (z index 0): two equal maxima, first in C order wins
    logits[0, 0, 3, 0] = 1.0
    logits[0, 4, 2, 2] = np.nan  # z+ face: NaN wins
    logits[0, 4, 0, 0] = 9.0
    s, o, _, _ = run_both([np.zeros((5, 5, 5), np.float32)], logits, [[2, 2, 2]],
                          move_threshold=0.5, deltas=2)
    assert s[0, 0] == 1.0 and tuple(o[0, 0]) == (-2, -1, 1)
    assert np.isnan(s[0, 1]) and tuple(o[0, 1]) == (2, 0, 0)


def test_empty_batch():
    s, o = K.update_fovs([], np.zeros((0, 3, 3, 3), np.float32), np.zeros((0, 3), np.int64),
                         move_threshold=0.9, deltas=1)
    assert s.shape == (0, 6) and o.shape == (0, 6, 3)
    out = np.zeros((0, 3, 3, 3), np.float32)
    assert K.gather_fovs([], np.zeros((0, 3), np.int64), 3, 0.0, out) is out


def _good():
    canvas = np.zeros((10, 10, 10), np.float32)
    logits = np.zeros((1, 5, 5, 5), np.float32)
    centers = np.array([[5, 5, 5]])
    return canvas, logits, centers


@pytest.mark.parametrize("mutate, name", [
    (lambda c, l, x: (c.astype(np.float64), l, x), "canvases"),
    (lambda c, l, x: (c[:, :, ::2], l, x), "canvases"),
    (lambda c, l, x: (c[0], l, x), "canvases"),
    (lambda c, l, x: ([c, c], l, x), "canvases"),
    (lambda c, l, x: ("abc", l, x), "canvases"),
    (lambda c, l, x: ([c.tolist()], l, x), "canvases"),
    (lambda c, l, x: (c, l.astype(np.float64), x), "logits"),
    (lambda c, l, x: (c, l[0], x), "logits"),
    (lambda c, l, x: (c, np.zeros((1, 4, 5, 5), np.float32), x), "logits"),
    (lambda c, l, x: (c, np.zeros((1, 5, 5, 10), np.float32)[..., ::2], x), "logits"),
    (lambda c, l, x: (c, l, np.array([[5.0, 5.0, 5.0]])), "centers"),
    (lambda c, l, x: (c, l, np.array([[5, 5]])), "centers"),
    (lambda c, l, x: (c, l, np.array([[1, 5, 5]])), "centers"),
    (lambda c, l, x: (c, l, np.array([[5, 5, 8]])), "centers"),
    (lambda c, l, x: (c, l, np.array([[5, -3, 5]])), "centers"),
    (lambda c, l, x: (c, l, np.array([[5, 5, 2**63 + 5]], np.uint64)), "centers"),
])
def test_update_fovs_bad_inputs(mutate, name):
    c, l, x = mutate(*_good())
    with pytest.raises(ValueError, match=name):
        K.update_fovs([c] if isinstance(c, np.ndarray) and c.ndim == 3 else c, l, x,
                      move_threshold=0.9, deltas=1)


def test_update_fovs_readonly_and_deltas():
    c, l, x = _good()
    l.flags.writeable = False
    with pytest.raises(ValueError, match="logits"):
        K.update_fovs([c], l, x, move_threshold=0.9, deltas=1)
    c, l, x = _good()
    c.flags.writeable = False
    with pytest.raises(ValueError, match="canvases"):
        K.update_fovs([c], l, x, move_threshold=0.9, deltas=1)
    c, l, x = _good()
    for bad in (3, (1, 1), (1, 1, -1), "a", 1.5):
        with pytest.raises(ValueError, match="deltas"):
            K.update_fovs([c], l, x, move_threshold=0.9, deltas=bad)
    # nothing was written by the failed calls
    assert not c.any()


def test_gather_fovs_bad_inputs():
    c, _, x = _good()
    out = np.zeros((1, 5, 5, 5), np.float32)
    with pytest.raises(ValueError, match="out"):
        K.gather_fovs([c], x, 5, 0.0, out.astype(np.float64))
    with pytest.raises(ValueError, match="out"):
        K.gather_fovs([c], x, 5, 0.0, np.zeros((1, 5, 5, 10), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="fov_size"):
        K.gather_fovs([c], x, 4, 0.0, np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        K.gather_fovs([c], x, 3, 0.0, out)
    with pytest.raises(ValueError, match="centers"):
        K.gather_fovs([c], [[5, 5, 9]], 5, 0.0, out)
    with pytest.raises(ValueError, match="canvases"):
        K.gather_fovs([c.astype(np.float16)], x, 5, 0.0, out)
    # read-only canvases are fine for gathering
    c.flags.writeable = False
    K.gather_fovs([c], x, 5, 0.0, out)


# ------------------------------------------------------------------------ object commit


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["normal", "ties", "special"]),
       min_size=st.sampled_from([0, 1, 5, 40, 10**6]), same_array=st.booleans())
def test_commit_object_matches_reference(seed, kind, min_size, same_array):
    lg, lstart, seg, start, size, kw = commit_case(seed, kind, min_size, same_array)
    got_seg, want_seg = seg.copy(), seg.copy()
    got = K.commit_object(lg, lstart, got_seg, start, size, **kw)
    want = commit_object_reference(lg, lstart, want_seg, start, size, **kw)
    assert got[0] == want[0]
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    assert got[1].dtype == np.int64 and got[2].dtype == np.int64
    assert np.array_equal(got_seg, want_seg)


def test_commit_object_hand_case():
    logits = np.array([[[1.0, 1.0, -1.0, 1.0, 1.0, 1.0]]], np.float32)
    seg = np.array([[[0, 5, 5, -1, 2, 5]]], np.int32)
    n, ids, counts = K.commit_object(logits, (0, 0, 0), seg, (0, 0, 0), (1, 1, 6), seg_threshold=0.5,
                                     min_size=2, new_id=9)
    assert n == 2 and ids.tolist() == [2, 5] and counts.tolist() == [1, 2]
    assert seg.tolist() == [[[9, 5, 5, 9, 2, 5]]]
    n, ids, _ = K.commit_object(logits, (0, 0, 0), seg, (0, 0, 0), (1, 1, 6), seg_threshold=0.5,
                                min_size=1, new_id=10)
    assert n == 0 and len(ids) == 0 and seg.tolist() == [[[9, 5, 5, 9, 2, 5]]]


def test_commit_object_bad_inputs():
    lg = np.zeros((4, 4, 4), np.float32)
    seg = np.zeros((4, 4, 4), np.int32)
    kw = dict(seg_threshold=0.5, min_size=1, new_id=1)
    with pytest.raises(ValueError, match="logits_start"):
        K.commit_object(lg, (1, 0, 0), seg, (0, 0, 0), (4, 4, 4), **kw)
    with pytest.raises(ValueError, match="seg_start"):
        K.commit_object(lg, (0, 0, 0), seg, (0, 0, 2), (3, 3, 3), **kw)
    with pytest.raises(ValueError, match="seg: expected dtype int32"):
        K.commit_object(lg, (0, 0, 0), seg.astype(np.int64), (0, 0, 0), (4, 4, 4), **kw)
    with pytest.raises(ValueError, match="seg: must be C-contiguous"):
        K.commit_object(lg, (0, 0, 0), np.zeros((4, 4, 8), np.int32)[:, :, ::2], (0, 0, 0), (4, 4, 4), **kw)
    with pytest.raises(ValueError, match="logits: expected dtype float32"):
        K.commit_object(lg.astype(np.float64), (0, 0, 0), seg, (0, 0, 0), (4, 4, 4), **kw)
    with pytest.raises(ValueError, match="new_id"):
        K.commit_object(lg, (0, 0, 0), seg, (0, 0, 0), (4, 4, 4), seg_threshold=0.5, min_size=1, new_id=0)
    ro = seg.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="seg: must be writeable"):
        K.commit_object(lg, (0, 0, 0), ro, (0, 0, 0), (4, 4, 4), **kw)
