"""Native peak finding vs skimage.feature.peak_local_max (exact set, raster order)."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from floodfilling import kernels as K
from floodfilling.kernels_reference import find_peaks_reference
from kernel_helpers import distance_map, forced_parallel, peak_cases

skimage_feature = pytest.importorskip("skimage.feature")
pytestmark = pytest.mark.skipif(not K.HAVE_NATIVE, reason="native extension not built")


def skimage_peaks(image, min_distance, threshold, exclude_border=True):
    """peak_local_max called directly, then sorted in raster order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # min_distance < 1 warning
        pts = skimage_feature.peak_local_max(
            image, min_distance=min_distance,
            threshold_abs=None if threshold is None else float(threshold), threshold_rel=0,
            exclude_border=exclude_border)
    pts = np.asarray(pts, np.int64).reshape(-1, 3)
    return pts[np.lexsort(pts.T[::-1])]


def check(image, min_distance=3, threshold=0.0, exclude_border=True):
    got = K.find_peaks(image, min_distance=min_distance, threshold=threshold,
                       exclude_border=exclude_border)
    assert got.dtype == np.int64 and got.ndim == 2 and got.shape[1] == 3
    want = skimage_peaks(image, min_distance, threshold, exclude_border)
    np.testing.assert_array_equal(got, want)
    with forced_parallel():
        par = K.find_peaks(image, min_distance=min_distance, threshold=threshold,
                           exclude_border=exclude_border)
    np.testing.assert_array_equal(par, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = find_peaks_reference(image, min_distance=min_distance, threshold=threshold,
                                   exclude_border=exclude_border)
    np.testing.assert_array_equal(got, ref)
    return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(peak_cases())
def test_find_peaks_matches_skimage(case):
    img, md, thr, eb = case
    check(img, md, thr, eb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("md", [1, 2, 3, 5])
def test_distance_map(dtype, md):
    img = distance_map((40, 48, 44), 7).astype(dtype)
    pts = check(img, md, 0.0)
    assert len(pts) > 10


@pytest.mark.parametrize("md", [6, 25])
def test_large_min_distance(md):
    img = distance_map((12, 40, 30), 4)
    check(img, md, 0.0, exclude_border=False)
    check(img, md, 0.0, exclude_border=2)


def test_threads_agree():
    img = distance_map((64, 40, 40), 3)
    try:
        K.set_num_threads(1)
        a = K.find_peaks(img)
        K.set_num_threads(3)
        b = K.find_peaks(img)
    finally:
        K.set_num_threads(0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, skimage_peaks(img, 3, 0.0))


def test_edge_cases():
    # constant image: every voxel is its own maximum -> no peaks
    assert len(check(np.ones((9, 9, 9), np.float32), 1)) == 0
    # a single voxel (plain mode: value > threshold)
    check(np.full((1, 1, 1), 3.0), 3, 0.0)
    check(np.full((1, 1, 1), 3.0), 3, 0.0, exclude_border=False)
    # empty image
    assert K.find_peaks(np.zeros((0, 4, 4), np.float32)).shape == (0, 3)
    # one isolated peak near the border, excluded or not
    img = np.zeros((7, 8, 9), np.float32)
    img[1, 4, 4] = 1.0
    assert len(check(img, 2, 0.0)) == 0
    np.testing.assert_array_equal(check(img, 2, 0.0, exclude_border=False), [[1, 4, 4]])
    # a plateau of equal maxima: the raster-first one is kept
    img = np.zeros((9, 9, 9))
    img[4, 4, 4:7] = 2.0
    np.testing.assert_array_equal(check(img, 3, 0.0, exclude_border=0), [[4, 4, 4]])
    # threshold: strict, compared in float32 for float32 images
    img = np.zeros((9, 9, 9), np.float32)
    img[4, 4, 4] = np.float32(0.1)
    assert len(check(img, 2, 0.1)) == 0
    assert len(check(img, 2, 0.09999)) == 1
    # negative thresholds behave like 0 (threshold_rel=0), and huge ones like inf
    img = -np.ones((9, 9, 9))
    img[4, 4, 4] = -0.5
    assert len(check(img, 2, -0.9)) == 0
    assert len(check(img, 2, 1e300)) == 0
    assert len(check(img.astype(np.float32), 2, 1e300)) == 0


def test_non_contiguous_and_byte_order():
    img = distance_map((30, 34, 36), 5)
    view = np.swapaxes(img, 0, 2)
    np.testing.assert_array_equal(K.find_peaks(view), skimage_peaks(view, 3, 0.0))
    big_endian = img.astype(">f8")
    np.testing.assert_array_equal(K.find_peaks(big_endian), skimage_peaks(img, 3, 0.0))


def test_bad_inputs():
    img = np.zeros((5, 5, 5), np.float32)
    with pytest.raises(ValueError, match="image"):
        K.find_peaks(img.astype(np.int32))
    with pytest.raises(ValueError, match="image"):
        K.find_peaks(img[0])
    nan = img.copy()
    nan[2, 2, 2] = np.nan
    with pytest.raises(ValueError, match="image"):
        K.find_peaks(nan)
    with pytest.raises(ValueError, match="min_distance"):
        K.find_peaks(img, min_distance=-1)
    with pytest.raises(ValueError, match="min_distance"):
        K.find_peaks(img, min_distance=1.5)
    with pytest.raises(ValueError, match="exclude_border"):
        K.find_peaks(img, exclude_border=-2)
    with pytest.raises(ValueError, match="exclude_border"):
        K.find_peaks(img, exclude_border=(1, 2))
    with pytest.raises(ValueError, match="threshold"):
        K.find_peaks(img, threshold="high")
