"""The flood-fill loop against a hand-checkable toy network (no torch needed)."""

import numpy as np
import pytest

from floodfilling.config import InferenceConfig
from floodfilling.inference.canvas import Canvas, logit32


def box_net(mask, inside=3.0, outside=-3.0):
    """A 'network' that predicts ``inside`` over a fixed binary mask and ``outside`` elsewhere."""

    def predict(canvas, c):
        sl = canvas.fov_slices(c)
        return np.where(mask[sl], np.float32(inside), np.float32(outside)).astype(np.float32)

    return predict


def run_all(canvas, predict):
    gen = canvas.steps()
    try:
        c = next(gen)
        while True:
            c = gen.send(predict(canvas, c))
    except StopIteration:
        pass


def _flood_cube():
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[10:30, 10:30, 10:30] = True  # 8000 voxels
    cfg = InferenceConfig(min_segment_size=100)
    cv = Canvas(np.zeros(shape, np.float32), np.array([[20, 20, 20]]), cfg, (9, 9, 9), (2, 2, 2))
    run_all(cv, box_net(mask))
    seg = cv.final_segmentation()
    assert seg.max() == 1
    assert not np.any(seg[~mask])  # nothing outside the predicted object
    assert np.count_nonzero(seg) > 0.5 * mask.sum()
    assert cv.state.counters["objects"] == 1
    assert cv.state.origins[1].seed_zyx == (20, 20, 20)
    return cv


def test_one_cube_object_fills_its_mask():
    _flood_cube()


def test_native_kernels_give_the_reference_canvas(monkeypatch):
    """The same flood with the NumPy reference kernels: identical canvas, steps and object."""
    from floodfilling import kernels
    from floodfilling.kernels_reference import update_fovs_reference

    native = _flood_cube()
    monkeypatch.setattr(kernels, "update_fovs", update_fovs_reference)
    ref = _flood_cube()
    assert np.array_equal(native.segmentation, ref.segmentation)
    assert np.array_equal(native.logits, ref.logits, equal_nan=True)
    assert native.state.counters == ref.state.counters


def test_small_object_rejected_and_marked():
    shape = (30, 30, 30)
    mask = np.zeros(shape, bool)
    mask[13:17, 13:17, 13:17] = True  # 64 voxels < min_segment_size
    cfg = InferenceConfig(min_segment_size=100)
    cv = Canvas(np.zeros(shape, np.float32), np.array([[15, 15, 15]]), cfg, (9, 9, 9), (2, 2, 2))
    run_all(cv, box_net(mask))
    assert cv.state.counters["rejected_too_small"] == 1
    assert cv.segmentation[15, 15, 15] == -1
    assert cv.final_segmentation().max() == 0


def test_seed_too_close_and_margin():
    shape = (30, 30, 30)
    mask = np.zeros(shape, bool)
    mask[11:19, 11:19, 11:19] = True  # inside the first FOV (centre 15, +-4): object == mask
    cfg = InferenceConfig(min_segment_size=10)
    seeds = np.array([[2, 15, 15], [15, 15, 15], [15, 15, 16], [15, 15, 19]])
    cv = Canvas(np.zeros(shape, np.float32), seeds, cfg, (9, 9, 9), (2, 2, 2))
    run_all(cv, box_net(mask))
    c = cv.state.counters
    assert np.array_equal(cv.final_segmentation() == 1, mask)
    # (2,15,15): outside the margin (2 - 4 < 0); (15,15,16): already segmented;
    # (15,15,19): free, but (15,15,18) of the object is within min_boundary_dist -> marked -1.
    assert (c["seeds_seen"], c["seeds_skipped"], c["seeds_too_close"], c["objects_attempted"]) == (4, 2, 1, 1)
    assert cv.segmentation[15, 15, 19] == -1
    assert cv.final_segmentation()[15, 15, 19] == 0


def test_weak_seed_is_marked():
    shape = (30, 30, 30)
    cfg = InferenceConfig(min_segment_size=1)
    cv = Canvas(np.zeros(shape, np.float32), np.array([[15, 15, 15]]), cfg, (9, 9, 9), (2, 2, 2))
    # A network that predicts background everywhere: the seed drops below move_threshold
    # after the first step (disco rule: old 2.94 > 0 so it may fall).
    run_all(cv, lambda canvas, c: np.full((9, 9, 9), -5.0, np.float32))
    assert cv.state.counters["rejected_weak_seed"] == 1
    assert cv.segmentation[15, 15, 15] == -1
    assert cv.state.counters["steps"] == 1


def test_disco_rule_keeps_low_values():
    """Voxels already below 0.5 (logit 0) cannot rise once the FOV is confident."""
    shape = (30, 30, 30)
    cfg = InferenceConfig(min_segment_size=1)
    cv = Canvas(np.zeros(shape, np.float32), np.array([[15, 15, 15]]), cfg, (9, 9, 9), (2, 2, 2))
    cv.logits[15, 15, 18] = -1.0  # already predicted "not object"
    calls = []

    def net(canvas, c):
        calls.append(c)
        return np.full((9, 9, 9), 4.0, np.float32)

    gen = cv._flood((15, 15, 15))
    c = next(gen)
    try:
        gen.send(net(cv, c))
    except StopIteration:
        pass
    assert cv.logits[15, 15, 18] == np.float32(-1.0)
    assert cv.logits[15, 15, 17] == np.float32(4.0)
    assert logit32(0.9) < 4.0
