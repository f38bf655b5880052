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
   flood's objects in place, in a box of ``gap_box`` voxels around the seed (moved inside the
   volume; the image mirrored by the FOV margin at the volume's faces, so that seeds in the
   border band, where the reference may not seed, can move). The floods are independent of
   each other (one canvas each, batched through the engine); :func:`resolve_gap_floods` then
   takes them in core order: a flood whose seed lies in an earlier kept flood is dropped,
   voxels two floods share go to the earlier one, and a flood that runs at least
   ``gap_join_fraction`` of its voxels into one object (of the flood or an earlier gap
   object) is a piece of it and joins it; any other flood is a new object (ids after the
   flood's, in core order).
3. **watershed** (``"watershed"``): a seeded watershed of the normalised intensity (membranes
   are its ridges) from the flood's objects and the gap objects, filling every voxel
   (``watershed_sigma`` smooths the relief first; 0: the raw intensity).

Cores and watershed work **tile by tile** so that a volume larger than memory can be refined
block by block with the same result: each tile reads a *window* (the tile grown by ``halo``,
clipped to the volume), computes there, and keeps its core (cores tile the volume; the tile
grid follows :class:`floodfilling.geometry.BlockGrid`). Cores are connected within
a tile and ordered by tile (C order), then by their first voxel. With ``tile = 0,0,0`` (the
default in memory) one tile is the whole volume. Rejoin and the resolution of the gap floods
are decisions on tables, the same whoever computes them. So the result depends on the tile
grid, never on how tiles or floods are spread over processes (``ffn segment --block
--refine`` refines on its block grid; :func:`refine_array` with ``tile`` = the block size gives
the same volume).

The steps run on the image as normalised for the flood and were chosen by measurement
(``bench/accuracy.py``; figures and where thresholds were chosen in the README, section
"Refinement"). Geometry: 6-connectivity throughout (cores, watershed), distances in voxels.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from .. import kernels
from ..config import InferenceConfig, RefineConfig
from ..results import Origin
from .canvas import CanvasState
from ..geometry import BlockGrid, fov_margin
from .engine import Job, inflight_on, make_predictor, run_jobs, subvolume_canvas

log = logging.getLogger(__name__)

# reads the box [start, stop) (volume coordinates) of a volume: how the steps see the image and
# the segmentation, an array in memory or a file read block by block
Reader = Callable[[Sequence[int], Sequence[int]], np.ndarray]


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
    """What the gap floods need: the network, its :class:`~floodfilling.model.ModelInfo`, the
    inference options of the flood being refined, and the flood's predictor when it can be reused."""

    net: object
    info: object
    config: InferenceConfig
    predictor: object = None  # the flood's predictor, reused by the gap floods (None: made for them)


@dataclass(frozen=True)
class Tile:
    """One tile: its core (the voxels it decides) and window (core + halo, clipped to the
    volume), half-open boxes in volume coordinates."""

    core_start: tuple[int, int, int]
    core_stop: tuple[int, int, int]
    window_start: tuple[int, int, int]
    window_stop: tuple[int, int, int]

    @property
    def core(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.core_start, self.core_stop))

    @property
    def core_in_window(self) -> tuple[slice, ...]:
        return tuple(slice(a - w, b - w) for a, b, w in zip(self.core_start, self.core_stop, self.window_start))


def tiles_of(shape: Sequence[int], tile: Sequence[int], halo: Sequence[int],
             min_core: Sequence[int] = (1, 1, 1)) -> list[Tile]:
    """The tiles of a volume of ``shape``: the blocks of the block-inference grid with core
    ``tile`` (0 on an axis: the whole axis) and ``halo``, in C order of the grid; ``min_core``:
    a last core shorter than this joins the previous one (block inference uses the FOV)."""
    size = tuple(int(t) if int(t) > 0 else int(s) for t, s in zip(tile, shape))
    grid = BlockGrid(shape, tuple(min(t, int(s)) for t, s in zip(size, shape)), halo, min_core=min_core)
    return [Tile(b.core_start, b.core_stop, b.outer_start, b.outer_stop) for b in grid]


def array_reader(volume: np.ndarray) -> Reader:
    """A :data:`Reader` of an array in memory."""
    return lambda start, stop: volume[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]


def membranes_low(image: np.ndarray, cfg: RefineConfig, sigma: float) -> np.ndarray:
    """The intensity (float32) with membranes low, whatever their polarity, smoothed by a
    Gaussian of ``sigma`` voxels (0: not smoothed)."""
    r = np.asarray(image, np.float32)
    if cfg.membranes == "bright":
        r = -r
    return ndimage.gaussian_filter(r, sigma) if sigma > 0 else r


def gap_cores(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig,
              core: tuple[slice, ...] | None = None) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Cores of cells in the space ``seg`` left free, within the box ``core`` of the arrays
    (default: all of them; the arrays are a tile's window, smoothing and distances see all of
    it): (labels 1..N int32 of the core box, numbered in raster order of their first voxel; the
    deepest voxel of each core in array coordinates: largest distance, then raster order)."""
    core = core if core is not None else tuple(slice(0, n) for n in seg.shape)
    free = (seg == 0) & (membranes_low(image, cfg, cfg.interior_sigma) > cfg.interior_threshold)
    depth = ndimage.distance_transform_edt(free)[core]
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
        offset = [s.start for s in core]
        centres = [tuple(int(v) + o for v, o in zip(np.unravel_index(order[i], cores.shape), offset)) for i in first]
    return cores, centres


def tile_gap_centres(image: Reader, seg: Reader, tile: Tile, cfg: RefineConfig) -> list[tuple[int, int, int]]:
    """The seeds (volume coordinates) of the gap cores in ``tile``'s core, in core order."""
    w0, w1 = tile.window_start, tile.window_stop
    _, centres = gap_cores(image(w0, w1), seg(w0, w1), cfg, tile.core_in_window)
    return [tuple(c + w for c, w in zip(centre, w0)) for centre in centres]


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


# -- gap floods ---------------------------------------------------------------------------------

@dataclass
class GapFlood:
    """One gap core's flood, alone in its box."""

    seed: tuple[int, int, int]  # volume coordinates
    origin: Origin  # seed, network steps, seconds
    start: tuple[int, int, int]  # volume coordinates of mask[0, 0, 0]
    mask: np.ndarray  # bool: the flood's voxels in the volume, cropped to their bounding box
    canvas_voxels: int  # its voxels on the canvas (the box with the mirrored margin)
    overlaps: tuple[np.ndarray, np.ndarray]  # (ids of the objects it ran into, voxels), over the canvas

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(a + n for a, n in zip(self.start, self.mask.shape))

    def contains(self, zyx: Sequence[int]) -> bool:
        if any(not a <= c < b for c, a, b in zip(zyx, self.start, self.stop)):
            return False
        return bool(self.mask[tuple(int(c) - a for c, a in zip(zyx, self.start))])


def flood_box(seed: Sequence[int], box: Sequence[int], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) of the ``box``-sized box around ``seed``, moved inside the volume of
    ``shape`` (the whole axis where the volume is smaller)."""
    start, stop = [], []
    for c, b, n in zip(seed, box, shape):
        b = min(int(b), int(n))
        a = min(max(int(c) - b // 2, 0), int(n) - b)
        start.append(a)
        stop.append(a + b)
    return tuple(start), tuple(stop)


def flood_gaps(image: Reader, seg: Reader, shape: Sequence[int], seeds: Sequence[Sequence[int]],
               network: FloodNetwork, max_id: int, box: Sequence[int], inflight: int | None = None,
               on_flood: Callable[[int, GapFlood | None, int], None] | None = None,
               claim: Callable[[], int | None] | None = None) -> tuple[list[GapFlood | None], list[int]]:
    """One flood from each of ``seeds`` (volume coordinates), each alone on a canvas of its
    :func:`flood_box` with ``seg``'s objects (ids <= ``max_id``) in place and the image
    mirrored by the FOV margin at the volume's faces; up to ``inflight`` canvases share each
    network call (default: :func:`~floodfilling.inference.engine.inflight_on` the device).
    Returns, in seed order, each :class:`GapFlood` or None where the seed was too weak to flood,
    and each one's network steps (``on_flood(index, flood, steps)`` is also called as each
    finishes). ``claim``: which seed to flood next, asked as a canvas frees (None: no more; a
    block run's dynamic claims, :mod:`floodfilling.distributed.bookkeeper`); default every seed
    in order."""
    info = network.info
    margin = fov_margin(info.fov_zyx)
    # every core seed is tried: no minimum size or boundary distance (the join rule decides)
    cfg = network.config.with_overrides(min_segment_size=0, min_boundary_dist_zyx=(0, 0, 0), seed_fill_passes=0,
                                        seed_policy="peaks")
    from ..model import select_device

    k = inflight_on(select_device(cfg.device), inflight)
    predictor = network.predictor if network.predictor is not None else \
        make_predictor(network.net, info.fov_zyx, info.deltas_zyx, cfg, threads=cfg.threads, inflight=k)
    shape = tuple(int(s) for s in shape)
    floods: list[GapFlood | None] = [None] * len(seeds)
    steps = [0] * len(seeds)
    placed: dict[int, tuple] = {}  # flood index -> (box start, padding) while its canvas runs

    if claim is None:
        order = iter(range(len(seeds)))
        claim = lambda: next(order, None)  # noqa: E731
    claimed: list[int | None] = [None] * len(seeds)  # per job: the seed it flooded

    def make(j: int):
        i = claimed[j] = claim()
        if i is None:  # nothing left: an empty canvas finishes at once
            return subvolume_canvas(predictor, np.zeros(info.fov_zyx, np.float32), cfg, info,
                                    seeds=np.zeros((0, 3), np.int64))
        start, stop = flood_box(seeds[i], box, shape)
        pad = [(m if a == 0 else 0, m if b == n else 0) for m, a, b, n in zip(margin, start, stop, shape)]
        img = np.pad(np.asarray(image(start, stop), np.float32), pad, mode="reflect")
        labels = np.pad(np.asarray(seg(start, stop)).astype(np.int32), pad, mode="reflect")
        at = np.asarray([[c - a + p[0] for c, a, p in zip(seeds[i], start, pad)]], np.int64)
        cv = subvolume_canvas(predictor, img, cfg, info, seeds=at,
                              state=CanvasState(segmentation=labels, max_id=int(max_id)))
        placed[i] = (start, pad)
        return cv

    def done(j: int, cv) -> None:
        i = claimed[j]
        if i is None:
            return
        st = cv.state
        flood = None
        start, pad = placed[i]
        inner = tuple(slice(p[0], n - p[1]) for p, n in zip(pad, st.segmentation.shape))
        mask = st.segmentation[inner] == max_id + 1
        if st.max_id > max_id and mask.any():  # the flood made its object (id max_id + 1) in the volume
            nz = np.nonzero(mask)
            lo = [int(v.min()) for v in nz]
            hi = [int(v.max()) + 1 for v in nz]
            o = st.origins[max_id + 1]
            flood = GapFlood(tuple(int(c) for c in seeds[i]), Origin(tuple(int(c) for c in seeds[i]), o.steps, o.seconds),
                             tuple(a + s for a, s in zip(lo, start)),
                             np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in zip(lo, hi))]),
                             int(np.count_nonzero(st.segmentation == max_id + 1)),
                             tuple(np.asarray(a, np.int64) for a in st.overlaps.get(max_id + 1, (np.zeros(0), np.zeros(0)))))
        floods[i] = flood
        steps[i] = int(st.counters.get("steps", 0))
        del placed[i]
        if on_flood is not None:
            on_flood(i, flood, steps[i])

    run_jobs([Job(j, lambda j=j: make(j)) for j in range(len(seeds))], predictor, inflight=k, on_done=done)
    return floods, steps


@dataclass
class GapDecisions:
    """What :func:`resolve_gap_floods` decided: per flood its id in the result (0: no flood, or
    its seed lay in an earlier flood), and the counts."""

    targets: list[int]
    joined: int = 0  # floods that joined an object
    inside: int = 0  # floods dropped: seed in an earlier kept flood
    new: int = 0  # new objects


def box_intersection(a0, a1, b0, b1):
    """(start, stop) of the intersection of the boxes [a0, a1) and [b0, b1), None when empty."""
    s = tuple(max(x, y) for x, y in zip(a0, b0))
    e = tuple(min(x, y) for x, y in zip(a1, b1))
    return (s, e) if all(x < y for x, y in zip(s, e)) else None


def _sub(box, start):
    s, e = box
    return tuple(slice(a - o, b - o) for a, b, o in zip(s, e, start))


def _cells(lo: Sequence[int], hi: Sequence[int], cell: int):
    """The cells (``cell`` voxels a side, a grid from the origin) the box [lo, hi) touches."""
    return itertools.product(*(range(a // cell, (b - 1) // cell + 1) for a, b in zip(lo, hi)))


def resolve_gap_floods(floods: Sequence[GapFlood | None], max_id: int, fraction: float,
                       cell: int = 64) -> GapDecisions:
    """Takes the floods in order (see the module docstring): their ids in the result, new
    objects numbered ``max_id + 1, ...``. A flood's voxels are its canvas voxels less those an
    earlier kept flood holds; what it ran into is its overlaps with the flood's objects plus
    those shared voxels, counted for the earlier flood's id. Of objects tied for the most
    voxels the lowest id is taken. Each flood is compared with the earlier kept floods whose
    boxes share a grid cell (``cell`` voxels) with its box or seed, in order, so ``floods`` may
    be a sequence that loads them on demand (a block run's files)."""
    dec = GapDecisions([0] * len(floods))
    near: dict[tuple, list[int]] = {}  # grid cell -> kept floods whose box touches it
    next_id = int(max_id)
    for k in range(len(floods)):
        f = floods[k]
        if f is None:
            continue
        lo = tuple(min(a, c) for a, c in zip(f.start, f.seed))
        hi = tuple(max(b, c + 1) for b, c in zip(f.stop, f.seed))
        claimed = np.zeros(f.mask.shape, bool)
        shared: dict[int, int] = {}
        inside = False
        for j in sorted({j for c in _cells(lo, hi, cell) for j in near.get(c, ())}):
            g = floods[j]
            if g.contains(f.seed):
                inside = True
                break
            box = box_intersection(f.start, f.stop, g.start, g.stop)
            if box is None:
                continue
            fs, gs = _sub(box, f.start), _sub(box, g.start)
            both = f.mask[fs] & g.mask[gs] & ~claimed[fs]
            n = int(np.count_nonzero(both))
            if n:
                claimed[fs] |= both
                shared[dec.targets[j]] = shared.get(dec.targets[j], 0) + n
        if inside:
            dec.inside += 1
            continue
        ids = np.concatenate([np.asarray(f.overlaps[0], np.int64), np.asarray(list(shared), np.int64)])
        voxels = np.concatenate([np.asarray(f.overlaps[1], np.int64), np.asarray(list(shared.values()), np.int64)])
        keep = ids > 0
        ids, voxels = ids[keep], voxels[keep]
        if len(ids):
            ids, inv = np.unique(ids, return_inverse=True)
            voxels = np.bincount(inv, weights=voxels).astype(np.int64)
        total = f.canvas_voxels - int(np.count_nonzero(claimed)) + int(voxels.sum())
        if len(voxels) and total and voxels.max() >= fraction * total:
            dec.targets[k] = int(ids[np.flatnonzero(voxels == voxels.max())].min())
            dec.joined += 1
        else:
            next_id += 1
            dec.targets[k] = next_id
            dec.new += 1
        for c in _cells(f.start, f.stop, cell):
            near.setdefault(c, []).append(k)
    return dec


def paint_gap_floods(markers: np.ndarray, start: Sequence[int], floods: Sequence[GapFlood | None],
                     targets: Sequence[int]) -> int:
    """Writes each kept flood (target > 0) into ``markers`` (the window at ``start``, in
    place) where it is still 0, in flood order (an earlier flood keeps a shared voxel);
    returns the voxels written."""
    stop = tuple(a + n for a, n in zip(start, markers.shape))
    written = 0
    for f, t in zip(floods, targets):
        if f is None or not t:
            continue
        box = box_intersection(start, stop, f.start, f.stop)
        if box is None:
            continue
        view = markers[_sub(box, start)]
        put = f.mask[_sub(box, f.start)] & (view == 0)
        view[put] = t
        written += int(np.count_nonzero(put))
    return written


def fill_tile(image: Reader, markers: Reader, tile: Tile, cfg: RefineConfig, floods: Sequence[GapFlood | None] = (),
              targets: Sequence[int] = (), dtype=np.int64) -> tuple[np.ndarray, int]:
    """The refined core of ``tile``: its window's markers with the gap floods painted in, then
    (step "watershed") the seeded watershed of the window; (core, voxels the watershed filled in it)."""
    w0, w1 = tile.window_start, tile.window_stop
    m = np.asarray(markers(w0, w1)).astype(dtype)
    paint_gap_floods(m, w0, floods, targets)
    before = int(np.count_nonzero(m[tile.core_in_window]))
    if "watershed" in cfg.steps and m.any():
        from skimage.segmentation import watershed

        m = watershed(-membranes_low(image(w0, w1), cfg, cfg.watershed_sigma), markers=m)
    core = np.ascontiguousarray(m[tile.core_in_window])
    return core, int(np.count_nonzero(core)) - before


def step_counters(rejoined: int, cores: int = 0, floods: int = 0, dec: GapDecisions | None = None,
                  steps: int = 0) -> dict[str, float]:
    """The refinement's counters before the watershed (``voxels_filled`` 0): objects rejoined,
    gap cores, floods that made an object, the decisions on them, their network steps."""
    dec = dec if dec is not None else GapDecisions([])
    return {"rejoined": rejoined, "gap_objects": dec.new, "gap_cores": cores, "gap_floods": floods,
            "gap_inside": dec.inside, "gap_joined": dec.joined, "gap_steps": steps, "voxels_filled": 0}


def check_flood_options(cfg: RefineConfig, flood: InferenceConfig) -> None:
    """Refuses, before any work, refine steps the flood's options make impossible."""
    if "rejoin" in cfg.steps and (flood.split_components or flood.dust_size > 0):
        raise RefineError("refine step 'rejoin' needs the flood's overlaps, which split_components and dust_size "
                          "drop (they change ids): leave 'rejoin' out of refine.steps or turn them off")


def check_gap_box(cfg: RefineConfig, fov_zyx: Sequence[int]) -> None:
    """Refuses, before any work, a ``gap_box`` smaller than the model's FOV on some axis (a gap
    flood's canvas must hold the FOV) when the ``gap_objects`` step runs."""
    if "gap_objects" in cfg.steps and any(int(b) < int(f) for b, f in zip(cfg.gap_box, fov_zyx)):
        fmt = ",".join
        raise RefineError(f"refine.gap_box={fmt(map(str, cfg.gap_box))}: smaller than the model's FOV "
                          f"{fmt(map(str, fov_zyx))} (z,y,x); a gap flood needs at least the FOV: give refine.gap_box "
                          f">= {fmt(map(str, fov_zyx))}")


def check_ids(max_id: int, step: str) -> None:
    if max_id >= 2**31 - 1:
        raise RefineError(f"segmentation ids up to {max_id}: the {step} step needs ids below 2**31 (a flood's ids)")


def rejoin_lut(own_voxels: np.ndarray, overlaps: dict | None, cfg: RefineConfig) -> dict[int, int]:
    """The rejoin step's decisions (``{}`` when the step is not chosen)."""
    if "rejoin" not in cfg.steps:
        return {}
    if overlaps is None:
        raise RefineError("the rejoin step needs the flood's overlaps (overlaps=...); postprocessing "
                          "(split_components, dust_size) drops them")
    check_ids(len(own_voxels) - 1, "rejoin")
    return rejoin_targets(own_voxels, overlaps, cfg.rejoin_fraction) if len(own_voxels) > 1 else {}


def check_inputs(image: np.ndarray, seg: np.ndarray) -> None:
    """What every refinement needs: scikit-image (the watershed), an image and a flood of one
    shape; :class:`RefineError` otherwise."""
    try:
        import skimage.segmentation  # noqa: F401
    except ImportError:
        raise RefineError("refinement needs scikit-image: pip install 'floodfilling[refine]'") from None
    if image.shape != seg.shape:
        raise RefineError(f"image shape {image.shape} and segmentation shape {seg.shape} differ")


def refine_array(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig, network: FloodNetwork | None = None,
                 overlaps: dict | None = None, tile: Sequence[int] | None = None,
                 inflight: int | None = None) -> Refined:
    """Refines ``seg`` (the flood's segmentation of ``image``, the normalised float image) in
    memory; ``network`` is needed for the gap objects step, ``overlaps`` (the flood's: id ->
    (ids, voxels), as :class:`~floodfilling.inference.canvas.CanvasState` keeps them) for
    rejoin; ``tile``: the tile size (default ``cfg.tile``; block inference: its block size);
    ``inflight``: gap floods sharing each network call."""
    check_inputs(image, seg)
    t0 = time.perf_counter()
    cfg = cfg.validate()
    out = np.asarray(seg)
    first_new = int(out.max(initial=0))  # ids above it are new objects (not reused after a rejoin)
    markers = out.astype(np.int64 if first_new >= 2**31 - 1 else np.int32)
    joined = rejoin_lut(np.bincount(markers.ravel(), minlength=first_new + 1) if out.size else np.zeros(1, np.int64),
                        overlaps, cfg)
    if "gap_objects" in cfg.steps and network is None:
        raise RefineError("the gap_objects step needs the network (network=FloodNetwork(...))")
    if joined:
        lut = np.arange(first_new + 1, dtype=markers.dtype)
        lut[list(joined)] = list(joined.values())
        markers = lut[markers]
    tiles = tiles_of(markers.shape, cfg.tile if tile is None else tile, cfg.halo)
    counters = step_counters(len(joined))
    floods, dec = [], GapDecisions([])
    if "gap_objects" in cfg.steps:
        check_ids(first_new, "gap_objects")
        centres = [c for t in tiles for c in tile_gap_centres(array_reader(image), array_reader(markers), t, cfg)]
        floods, steps = flood_gaps(array_reader(image), array_reader(markers), markers.shape, centres, network,
                                   first_new, cfg.gap_box, inflight) if centres else ([], [])
        dec = resolve_gap_floods(floods, first_new, cfg.gap_join_fraction)
        counters = step_counters(len(joined), len(centres), sum(f is not None for f in floods), dec, sum(steps))
    result = markers
    if floods or "watershed" in cfg.steps:
        result = np.zeros(markers.shape, np.int64)
        for t in tiles:
            core, filled = fill_tile(array_reader(image), array_reader(markers), t, cfg, floods, dec.targets)
            result[t.core] = core
            counters["voxels_filled"] += filled
    origins = {t: f.origin for f, t in zip(floods, dec.targets) if t > first_new}
    dtype = out.dtype if int(result.max(initial=0)) <= np.iinfo(out.dtype).max else np.uint64
    counters["seconds"] = time.perf_counter() - t0
    log.info("refine: %d objects rejoined, %d gap objects, %d voxels filled", counters["rejoined"],
             counters["gap_objects"], counters["voxels_filled"])
    return Refined(result.astype(dtype), origins, counters, joined)
