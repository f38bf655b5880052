"""Refinement after the exact reference flood (``ffn segment --refine``).

The reference flood leaves space unsegmented (the FOV margin along the borders, where no seed
may sit, and wherever floods were rejected), and scored as one object that space merges many
neurons. Refinement fills it without swallowing the neurons that live there:

1. **rejoin** (``"rejoin"``): the flood records, for each object, the voxels its flood ran
   into earlier objects (its overlaps; objects never take voxels from each other). An object
   whose flood ran at least ``rejoin_fraction`` of its voxels (own plus overlapping) into one
   earlier object found that object again from another seed: it is a piece of it and joins it
   (chains are followed; a group keeps its first id). Needs the flood's overlaps, costs nothing.
2. **gap objects** (``"gap_objects"``): in the space no object took, the *cores* of cells:
   voxels brighter than ``interior_threshold`` (membranes are dark in the normalised image;
   ``membranes = "bright"`` flips that) and at least ``gap_core_radius`` voxels away from any
   membrane, object or other dark voxel, in connected cores of at least ``gap_min_core``
   voxels. The network decides what each core is: one flood from its deepest voxel, with the
   flood's objects in place and the image mirrored by the FOV margin at the volume's faces
   (so that seeds in the border band, where the reference may not seed, can move). A flood
   that runs at least ``gap_join_fraction`` of its voxels into one existing object is a piece
   of it and joins it; any other flood is a new object (ids after the flood's, in the order of
   their cores: deepest first).
3. **watershed** (``"watershed"``): a seeded watershed of the normalised intensity (membranes
   are its ridges) from the flood's objects and the gap objects, filling every voxel
   (``watershed_sigma`` smooths the relief first; 0: the raw intensity).

The last two run on the image as normalised for the flood. The steps were chosen by measurement
(``bench/accuracy.py``; figures and where thresholds were chosen in the README, section
"Refinement"). Geometry: 6-connectivity throughout (cores, watershed), distances in voxels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .. import kernels
from ..config import InferenceConfig, RefineConfig
from ..results import Origin
from .canvas import CanvasState, fov_margin
from .engine import Job, make_predictor, run_jobs, subvolume_canvas

log = logging.getLogger(__name__)


class RefineError(ValueError):
    """Bad input to the refinement (message names the parameter)."""


@dataclass
class Refined:
    """The refined segmentation, origins of the objects it added, and what each step did."""

    segmentation: np.ndarray  # same dtype as the flood's, 0 only where no step reached
    new_origins: dict[int, Origin] = field(default_factory=dict)  # gap objects: seed (core centre), steps
    counters: dict[str, float] = field(default_factory=dict)  # rejoined, gap_objects, voxels_filled, seconds
    joined: dict[int, int] = field(default_factory=dict)  # rejoin: flood object id -> the id it joined


@dataclass
class FloodNetwork:
    """What the gap floods need: the network, its :class:`~floodfilling.model.ModelInfo` and the
    inference options of the flood being refined."""

    net: object
    info: object
    config: InferenceConfig


def membranes_low(image: np.ndarray, cfg: RefineConfig, sigma: float) -> np.ndarray:
    """The intensity (float32) with membranes low, whatever their polarity, smoothed by a
    Gaussian of ``sigma`` voxels (0: not smoothed)."""
    r = np.asarray(image, np.float32)
    if cfg.membranes == "bright":
        r = -r
    return ndimage.gaussian_filter(r, sigma) if sigma > 0 else r


def gap_cores(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Cores of cells in the space ``seg`` left free: (labels 1..N int32, the deepest voxel of
    each core: largest distance, then raster order)."""
    free = (seg == 0) & (membranes_low(image, cfg, cfg.interior_sigma) > cfg.interior_threshold)
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


def rejoin_targets(own_voxels: np.ndarray, overlaps: dict, fraction: float) -> dict[int, int]:
    """For each flood object ``k`` whose flood ran at least ``fraction`` of its voxels into one
    earlier object: ``k -> `` the first id of that object's group (chains followed).
    ``own_voxels[k]``: voxels of ``k`` in the segmentation; ``overlaps[k]``: (ids, voxels) its
    flood ran into. Of objects tied for the most voxels the lowest id is taken."""
    pairs = []
    for k in sorted(overlaps):
        ids, voxels = (np.asarray(a, np.int64) for a in overlaps[k])
        keep = ids > 0
        ids, voxels = ids[keep], voxels[keep]
        total = int(own_voxels[k]) + int(voxels.sum())
        if not len(voxels) or not total:
            continue
        best = np.flatnonzero(voxels == voxels.max())
        j = int(ids[best].min())
        if voxels.max() >= fraction * total and j != k:
            pairs.append((k, j))
    if not pairs:
        return {}
    ids, roots = kernels.union_find(np.asarray(pairs, np.uint64))
    return {int(i): int(r) for i, r in zip(ids, roots) if i != r}


def flood_gaps(image: np.ndarray, seg: np.ndarray, centres: list[tuple[int, ...]], network: FloodNetwork,
               max_id: int | None = None):
    """One flood from each of ``centres`` (in order; one already inside an earlier gap flood is
    skipped), with ``seg``'s objects in place, on ``image`` mirrored by the FOV margin. Returns
    (the floods' ids in the volume, > ``max_id`` (default ``seg.max()``), 0 elsewhere; {flood id:
    (Origin, own voxels, (ids of objects it ran into, voxels))}), voxels counted over the
    mirrored canvas."""
    margin = fov_margin(network.info.fov_zyx)
    pad = [(m, m) for m in margin]
    canvas_seg = np.pad(np.asarray(seg).astype(np.int32), pad, mode="reflect")
    max_id = int(seg.max(initial=0)) if max_id is None else int(max_id)
    # every core seed is tried: no minimum size or boundary distance (the join rule decides)
    cfg = network.config.with_overrides(min_segment_size=0, min_boundary_dist_zyx=(0, 0, 0), seed_fill_passes=0,
                                        seed_policy="peaks")
    predictor = make_predictor(network.net, network.info.fov_zyx, network.info.deltas_zyx, cfg, threads=cfg.threads)
    seeds = np.asarray(centres, np.int64).reshape(-1, 3) + np.asarray(margin)
    canvas = subvolume_canvas(predictor, np.pad(np.asarray(image, np.float32), pad, mode="reflect"), cfg,
                              network.info, seeds=seeds, state=CanvasState(segmentation=canvas_seg, max_id=max_id))
    try:
        run_jobs([Job("gaps", lambda: canvas)], predictor, inflight=1)
    finally:
        canvas.release()
    st = canvas.state
    own = np.bincount(np.clip(st.segmentation, 0, None).ravel(), minlength=st.max_id + 1)
    floods = {}
    for k in range(max_id + 1, st.max_id + 1):
        o = st.origins[k]
        seed = tuple(int(c) - m for c, m in zip(o.seed_zyx, margin))
        floods[k] = (Origin(seed, o.steps, o.seconds), int(own[k]), st.overlaps.get(k, (np.zeros(0), np.zeros(0))))
    inner = tuple(slice(m, m + n) for m, n in zip(margin, seg.shape))
    out = st.segmentation[inner]
    return np.where(out > max_id, out, 0).astype(np.int64), floods


def join_or_keep(floods: dict, max_id: int, fraction: float) -> dict[int, int]:
    """For each gap flood id: the existing object it joins (it ran at least ``fraction`` of its
    voxels, own plus overlapping, into that one object), or its new id (max_id + 1, ... in
    flood order)."""
    target, next_id = {}, max_id
    for k in sorted(floods):
        _, own, (ids, voxels) = floods[k]
        voxels = np.asarray(voxels, np.int64)
        total = own + int(voxels.sum())
        if len(voxels) and total and voxels.max() >= fraction * total:
            target[k] = int(np.asarray(ids)[np.argmax(voxels)])
        else:
            next_id += 1
            target[k] = next_id
    return target


def refine_array(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig, network: FloodNetwork | None = None,
                 overlaps: dict | None = None) -> Refined:
    """Refines ``seg`` (the flood's segmentation of ``image``, the normalised float image);
    ``network`` is needed for the gap objects step, ``overlaps`` (the flood's: id -> (ids,
    voxels), as :class:`~floodfilling.inference.canvas.CanvasState` keeps them) for rejoin."""
    try:
        from skimage.segmentation import watershed
    except ImportError:
        raise RefineError("refinement needs scikit-image: pip install 'floodfilling[refine]'") from None
    if image.shape != seg.shape:
        raise RefineError(f"image shape {image.shape} and segmentation shape {seg.shape} differ")
    t0 = time.perf_counter()
    cfg = cfg.validate()
    out = np.asarray(seg)
    counters: dict[str, float] = {"rejoined": 0, "gap_objects": 0, "gap_cores": 0, "gap_floods": 0,
                                  "gap_joined": 0, "voxels_filled": 0}
    origins: dict[int, Origin] = {}
    joined: dict[int, int] = {}
    first_new = int(out.max(initial=0))  # ids above it are new objects (not reused after a rejoin)
    markers = out.astype(np.int64 if first_new >= 2**31 - 1 else np.int32)
    if "rejoin" in cfg.steps:
        if overlaps is None:
            raise RefineError("the rejoin step needs the flood's overlaps (overlaps=...); postprocessing "
                              "(split_components, dust_size) drops them")
        if first_new >= 2**31 - 1:
            raise RefineError(f"segmentation ids up to {first_new}: rejoin needs ids below 2**31 (a flood's ids)")
        if out.size:
            joined = rejoin_targets(np.bincount(markers.ravel(), minlength=first_new + 1), overlaps,
                                    cfg.rejoin_fraction)
        if joined:
            lut = np.arange(first_new + 1, dtype=markers.dtype)
            lut[list(joined)] = list(joined.values())
            markers = lut[markers]
        counters["rejoined"] = len(joined)
    if "gap_objects" in cfg.steps:
        if network is None:
            raise RefineError("the gap_objects step needs the network (network=FloodNetwork(...))")
        if first_new >= 2**31 - 1:
            raise RefineError(f"segmentation ids up to {first_new}: gap floods need ids below 2**31")
        _, centres = gap_cores(image, markers, cfg)
        flood_ids, floods = flood_gaps(image, markers, centres, network, first_new) if centres else (None, {})
        if floods:  # none when every core's seed was too weak to flood
            target = join_or_keep(floods, first_new, cfg.gap_join_fraction)
            lut = np.zeros(max(floods) + 1, np.int64)
            lut[list(target)] = list(target.values())
            markers = np.where(flood_ids > 0, lut[flood_ids], markers).astype(markers.dtype)
            origins = {target[k]: floods[k][0] for k in floods if target[k] > first_new}
        counters.update(gap_cores=len(centres), gap_floods=len(floods), gap_joined=len(floods) - len(origins),
                        gap_objects=len(origins))
    if "watershed" in cfg.steps and markers.any():
        before = np.count_nonzero(markers)
        markers = watershed(-membranes_low(image, cfg, cfg.watershed_sigma), markers=markers)
        counters["voxels_filled"] = int(np.count_nonzero(markers) - before)
    dtype = out.dtype if int(markers.max(initial=0)) <= np.iinfo(out.dtype).max else np.uint64
    counters["seconds"] = time.perf_counter() - t0
    log.info("refine: %d objects rejoined, %d gap objects, %d voxels filled", counters["rejoined"],
             counters["gap_objects"], counters["voxels_filled"])
    return Refined(markers.astype(dtype), origins, counters, joined)
