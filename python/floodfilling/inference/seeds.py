"""Seed policies: where objects are started, in which order.

``peaks`` (the reference default) places seeds far from image edges:

1. 3-D Sobel gradient magnitude of the normalised image (float32);
2. edges = magnitude > its Gaussian blur (sigma 49/6, mode 'reflect');
3. Euclidean distance transform of the non-edge voxels (anisotropic by voxel size);
4. + 1e-4 * RandomState(42).random_sample(shape) to break ties deterministically;
5. local maxima with min_distance 3 (exactly skimage.feature.peak_local_max's set, found by
   the native kernel), sorted in raster (z, y, x) order.

Seeds closer than the FOV margin to the volume border are dropped (the reference's
seed iterator does the same).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .. import kernels

log = logging.getLogger(__name__)


def edge_distance_map(image: np.ndarray, voxel_size_zyx=(1, 1, 1)) -> np.ndarray:
    """Steps 1-4 above: float64 distance-to-edge map with the deterministic noise."""
    img = np.asarray(image, dtype=np.float32)
    edges = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
    thresh = np.zeros(edges.shape, dtype=np.float32)
    ndimage.gaussian_filter(edges, 49.0 / 6.0, output=thresh, mode="reflect")
    filt_edges = edges > thresh
    del edges, thresh
    sampling = None if tuple(voxel_size_zyx) == (1, 1, 1) else tuple(float(v) for v in voxel_size_zyx)
    dt = ndimage.distance_transform_edt(~filt_edges, sampling=sampling).astype(np.float32)
    rng = np.random.RandomState(42)
    return dt + rng.random_sample(dt.shape) * 1e-4


def peaks(image: np.ndarray, margin_zyx, voxel_size_zyx=(1, 1, 1), min_distance: int = 3) -> np.ndarray:
    """The reference's "peaks" seeds inside the margin, (N, 3) int64 in raster order."""
    dist = edge_distance_map(image, voxel_size_zyx)
    pts = kernels.find_peaks(dist, min_distance=min_distance, threshold=0.0)
    return inside_margin(pts, image.shape, margin_zyx)


GRID_OFFSETS = (0, 8, 4, 12, 2, 10, 14)  # the reference's PolicyGrid3d passes (for step 16)


def grid(shape, margin_zyx, step: int = 16, offsets=GRID_OFFSETS) -> np.ndarray:
    """The reference's ``PolicyGrid3d``: for each offset in turn (coarse to fine), the points
    ``offset + k * step`` on every axis in raster order; those inside the margin are kept."""
    out = []
    for off in offsets:
        axes = [np.arange(int(off), int(s), int(step)) for s in shape]
        if any(len(a) == 0 for a in axes):
            continue
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        out.append(np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1))
    if not out:
        return np.zeros((0, 3), np.int64)
    return inside_margin(np.concatenate(out).astype(np.int64), shape, margin_zyx)


def inside_margin(points: np.ndarray, shape, margin_zyx) -> np.ndarray:
    """Keeps points with ``pos - margin >= 0`` and ``pos + margin < shape`` on every axis."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    m = np.asarray(margin_zyx, dtype=np.int64)
    ok = np.all(pts - m >= 0, axis=1) & np.all(pts + m < np.asarray(shape), axis=1)
    return pts[ok]


def invert_origins(origins: np.ndarray, shift_zyx, shape, margin_zyx) -> np.ndarray:
    """Seeds of the reference's ``PolicyInvertOrigins``: a previous run's object origins (an
    origins table: id, z, y, x, ...), highest id first; ``shift_zyx`` is added to move them from
    that run's box into this one's; those outside the margin are dropped."""
    tab = np.asarray(origins)
    order = np.argsort(tab["id"], kind="stable")[::-1]
    pts = np.stack([tab["z"], tab["y"], tab["x"]], axis=1).astype(np.int64)[order].reshape(-1, 3)
    return inside_margin(pts + np.asarray(shift_zyx, np.int64), shape, margin_zyx)


def fill_empty(segmentation: np.ndarray, margin_zyx, min_radius: float = 4.0, min_distance: int = 3) -> np.ndarray:
    """Seeds for the space no object took (``segmentation <= 0``): local maxima of the distance
    to the nearest object voxel or the volume border (1e-4 * RandomState(42) noise breaks ties,
    as for "peaks"), at least ``min_radius`` voxels, not on a voxel already tried (-1), inside
    the margin; largest distance first (ties in raster order)."""
    free = np.pad(segmentation <= 0, 1, constant_values=False)  # the border counts as an object
    dist = ndimage.distance_transform_edt(free)[1:-1, 1:-1, 1:-1]
    dist = dist + np.random.RandomState(42).random_sample(dist.shape) * 1e-4
    pts = kernels.find_peaks(dist, min_distance=min_distance, threshold=0.0)
    pts = inside_margin(pts, segmentation.shape, margin_zyx)
    if not len(pts):
        return pts
    d = dist[pts[:, 0], pts[:, 1], pts[:, 2]]
    keep = (d >= min_radius) & (segmentation[pts[:, 0], pts[:, 1], pts[:, 2]] == 0)
    pts, d = pts[keep], d[keep]
    return pts[np.argsort(-d, kind="stable")]


def make_seeds(policy: str, image: np.ndarray, margin_zyx, voxel_size_zyx=(1, 1, 1), *,
               min_distance: int = 3, grid_step: int = 16) -> np.ndarray:
    if policy == "peaks":
        return peaks(image, margin_zyx, voxel_size_zyx, min_distance)
    if policy == "grid":
        return grid(image.shape, margin_zyx, grid_step)
    if policy == "invert_origins":
        raise ValueError("seed policy 'invert_origins' takes its seeds from seed_origins (see segment())")
    raise ValueError(f"seed policy {policy!r}: expected 'peaks', 'grid' or 'invert_origins'")
