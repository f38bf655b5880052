"""Refinement after the exact reference flood (``ffn segment --refine``).

The reference flood leaves space unsegmented (the FOV margin along the borders, where no seed
may sit, and wherever floods were rejected), and scored as one object that space merges many
neurons. Refinement fills it without swallowing the neurons that live there:

1. **gap objects** (``"gap_objects"``): in the space no object took, the *cores* of cells:
   voxels brighter than ``interior_threshold`` (membranes are dark in the normalised image;
   ``membranes = "bright"`` flips that) and at least ``gap_core_radius`` voxels away from any
   membrane, object or other dark voxel; each connected core of at least ``gap_min_core``
   voxels becomes a new object (ids after the flood's, in raster order of their cores).
2. **watershed** (``"watershed"``): a seeded watershed of the normalised intensity (membranes
   are its ridges) from the flood's objects and the gap objects, filling every voxel
   (``watershed_sigma`` smooths the relief first; 0: the raw intensity).

Both run on the image as normalised for the flood. The steps were chosen by measurement
(``bench/accuracy.py``; figures and where thresholds were chosen in the README, section
"Refinement"). Geometry: 6-connectivity throughout (cores, watershed), distances in voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .config import RefineConfig
from .results import Origin

log = logging.getLogger(__name__)


class RefineError(ValueError):
    """Bad input to the refinement (message names the parameter)."""


@dataclass
class Refined:
    """The refined segmentation, origins of the objects it added, and what each step did."""

    segmentation: np.ndarray  # same dtype as the flood's, 0 only where no step reached
    new_origins: dict[int, Origin] = field(default_factory=dict)  # gap objects: core centre, 0 steps
    counters: dict[str, float] = field(default_factory=dict)  # gap_objects, voxels_filled, seconds


def relief(image: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """The intensity with membranes low (float32), smoothed by ``watershed_sigma``."""
    r = np.asarray(image, np.float32)
    if cfg.membranes == "bright":
        r = -r
    return ndimage.gaussian_filter(r, cfg.watershed_sigma) if cfg.watershed_sigma > 0 else r


def gap_cores(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Cores of cells in the space ``seg`` left free: (labels 1..N int32, the deepest voxel of
    each core: largest distance, then raster order)."""
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), cfg.interior_sigma)
    if cfg.membranes == "bright":
        smooth = -smooth
    free = (seg == 0) & (smooth > cfg.interior_threshold)
    depth = ndimage.distance_transform_edt(free)
    cores, n = ndimage.label(depth >= cfg.gap_core_radius)
    sizes = np.bincount(cores.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= cfg.gap_min_core)
    keep = keep[keep > 0]
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    cores = lut[cores]
    centres = []
    if len(keep):
        flat = cores.ravel()
        order = np.lexsort((np.arange(flat.size), -depth.ravel()))  # deepest first, raster ties
        order = order[flat[order] > 0]
        first = np.unique(flat[order], return_index=True)[1]
        centres = [tuple(int(v) for v in np.unravel_index(order[i], seg.shape)) for i in first]
    return cores, centres


def refine_array(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig) -> Refined:
    """Refines ``seg`` (the flood's segmentation of ``image``, the normalised float image)."""
    import time

    try:
        from skimage.segmentation import watershed
    except ImportError:
        raise RefineError("refinement needs scikit-image: pip install 'floodfilling[refine]'") from None
    if image.shape != seg.shape:
        raise RefineError(f"image shape {image.shape} and segmentation shape {seg.shape} differ")
    t0 = time.perf_counter()
    cfg = cfg.validate()
    out = np.asarray(seg)
    counters: dict[str, float] = {"gap_objects": 0, "voxels_filled": 0}
    origins: dict[int, Origin] = {}
    markers = out.astype(np.int64 if out.size and int(out.max()) >= 2**31 - 1 else np.int32)
    if "gap_objects" in cfg.steps:
        cores, centres = gap_cores(image, out, cfg)
        base = int(markers.max()) if markers.size else 0
        markers = np.where(cores > 0, cores.astype(markers.dtype) + base, markers)
        origins = {base + i + 1: Origin(c, 0, 0.0) for i, c in enumerate(centres)}
        counters["gap_objects"] = len(centres)
    if "watershed" in cfg.steps and markers.any():
        before = np.count_nonzero(markers)
        markers = watershed(-relief(image, cfg), markers=markers)
        counters["voxels_filled"] = int(np.count_nonzero(markers) - before)
    dtype = out.dtype if int(markers.max(initial=0)) <= np.iinfo(out.dtype).max else np.uint64
    counters["seconds"] = time.perf_counter() - t0
    log.info("refine: %d gap objects, %d voxels filled", counters["gap_objects"], counters["voxels_filled"])
    return Refined(markers.astype(dtype), origins, counters)
