"""Seed policies: where objects are started, in which order, as objects (:class:`SeedPolicy`,
made from the options by :func:`policy_of`; the reference's are ``PolicyPeaks``,
``PolicyGrid3d``, ``PolicyInvertOrigins``): what a policy reads besides the image
(:attr:`SeedPolicy.inputs`), whether it can seed each block of a block run on its own
(:attr:`SeedPolicy.per_block`), and the seeds of a (sub)volume (:meth:`SeedPolicy.seeds`).

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
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .. import boxes, kernels, volumes
from ..config import InferenceConfig
from ..results import read_origins

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


class SeedError(ValueError):
    """A seed policy's input is missing or does not fit the volume (one line naming it)."""


class SeedPolicy:
    """Where a flood starts its objects, and in which order."""

    name = ""
    per_block = True  # each block of a block run can be seeded on its own
    reads: tuple[str, ...] = ()  # options naming what it reads besides the image (inputs of the run)

    @classmethod
    def from_options(cls, cfg: InferenceConfig, box: boxes.BBox | None) -> "SeedPolicy":
        raise NotImplementedError

    def seeds(self, image: np.ndarray, margin_zyx, voxel_size_zyx=(1, 1, 1)) -> np.ndarray:
        """(N, 3) int64 seeds of the normalised ``image`` inside the FOV margin, in order."""
        raise NotImplementedError


@dataclass
class Peaks(SeedPolicy):
    """The reference's default: maxima of the distance to image edges (module docstring)."""

    min_distance: int = 3  # minimum spacing of the maxima
    name = "peaks"

    @classmethod
    def from_options(cls, cfg, box):
        return cls(cfg.seed_min_distance)

    def seeds(self, image, margin_zyx, voxel_size_zyx=(1, 1, 1)):
        return peaks(image, margin_zyx, voxel_size_zyx, self.min_distance)


@dataclass
class Grid(SeedPolicy):
    """The reference's ``PolicyGrid3d`` (:func:`grid`)."""

    step: int = 16  # grid spacing (voxels)
    name = "grid"

    @classmethod
    def from_options(cls, cfg, box):
        return cls(cfg.seed_grid_step)

    def seeds(self, image, margin_zyx, voxel_size_zyx=(1, 1, 1)):
        return grid(image.shape, margin_zyx, self.step)


@dataclass
class InvertOrigins(SeedPolicy):
    """The reference's ``PolicyInvertOrigins``: a previous run's object origins, last id first
    (the second run of a consensus). Reads the origins table beside ``origins_spec`` (a
    previous ``ffn segment`` output) when made, and checks it segmented the same box: a
    segmentation of another shape, or by its ``bbox_zyx`` of another box, is another volume."""

    origins_spec: str
    box: boxes.BBox
    table: np.ndarray = field(init=False, repr=False)
    shift_zyx: np.ndarray = field(init=False, repr=False)  # from that run's box into this one's
    name = "invert_origins"
    per_block = False  # the origins are the whole previous run's
    reads = ("seed_origins",)

    @classmethod
    def from_options(cls, cfg, box):
        if box is None:
            raise SeedError("seed_policy='invert_origins' seeds a whole volume from seed_origins (not a subvolume "
                            "of a block run or a refinement)")
        return cls(cfg.seed_origins, box)

    def __post_init__(self):
        spec, box = self.origins_spec, self.box
        with volumes.open_volume(spec) as prev:
            prev_box = prev.attrs.get("bbox_zyx")
            prev_shape = tuple(int(v) for v in prev.shape)
        tab = read_origins(spec)
        if tab is None:
            raise SeedError(f"seed_origins={spec}: no origins table beside it "
                            f"({volumes.parse_volume_spec(spec).dataset}_origins); give an output of ffn segment")
        want = (tuple(int(v) for v in box.start), tuple(int(v) for v in box.stop))
        try:
            prev_se = None if prev_box is None else (tuple(int(v) for v in prev_box[0]),
                                                     tuple(int(v) for v in prev_box[1]))
        except (TypeError, ValueError, IndexError):
            prev_se = None
        if prev_shape != tuple(box.shape) or (prev_se is not None and prev_se != want):
            where = f" (bbox_zyx {list(prev_se[0])}..{list(prev_se[1])})" if prev_se is not None else ""
            raise SeedError(f"seed_origins={spec}: segmentation of shape {prev_shape}{where} does not match the "
                            f"image box being segmented, shape {tuple(box.shape)} (bbox {list(want[0])}.."
                            f"{list(want[1])})")
        self.table = tab
        self.shift_zyx = np.asarray(prev_se[0] if prev_se is not None else (0, 0, 0), np.int64) - \
            np.asarray(box.start, np.int64)

    def seeds(self, image, margin_zyx, voxel_size_zyx=(1, 1, 1)):
        pts = invert_origins(self.table, self.shift_zyx, image.shape, margin_zyx)
        log.info("invert_origins: %d seeds from %d origins of %s", len(pts), len(self.table), self.origins_spec)
        return pts


POLICIES: dict[str, type[SeedPolicy]] = {p.name: p for p in (Peaks, Grid, InvertOrigins)}  # config.CHOICES


def policy_class(cfg: InferenceConfig) -> type[SeedPolicy]:
    """The class of the options' seed policy (what it is, before it reads anything)."""
    try:
        return POLICIES[cfg.seed_policy]
    except KeyError:
        raise SeedError(f"seed_policy={cfg.seed_policy!r}: expected {', '.join(POLICIES)}") from None


def policy_of(cfg: InferenceConfig, box: boxes.BBox | None = None) -> SeedPolicy:
    """The seed policy of the options ``cfg`` for the image box ``box`` (a policy that reads a
    file reads and checks it here, before any work)."""
    return policy_class(cfg).from_options(cfg, box)


def input_specs(cfg: InferenceConfig) -> list[str]:
    """What the options' seed policy reads besides the image (for the checks of an output
    against its inputs, before anything is read)."""
    return [getattr(cfg, name) for name in policy_class(cfg).reads]
