"""``ffn segment IMAGE OUT --block z,y,x --refine``: the refinement of
:mod:`floodfilling.inference.refine` on the reconciled block flood, tile by tile, every rank
taking its share, each piece saved in the workdir so that a killed run resumes.

The tiles are the blocks: a tile's core is its block's core, its window the core grown by
``[refine] halo``. What a tile or a flood computes depends only on the volume and the tables
below, so the result equals :func:`~floodfilling.inference.refine.refine_array` of the
assembled flood with ``tile`` = the block size and the flood's overlaps table (tested).

1. **Tables** (rank 0): the flood's overlaps in output ids (each block's, through the
   reconciled labels, summed; pairs within one object dropped), the voxels of each object (its
   cores' counts) and the rejoin decisions. Written to ``<ds>_overlaps``.
2. **Cores** (tiles claimed by the ranks): the gap cores of each tile's core
   (``cores/<block>.npy``), then on rank 0 all of them in tile order (``centres.npy``).
3. **Gap floods** (floods claimed by the ranks as canvases free, batched through the engine):
   ``floods/<i>.h5`` each. Rank 0 then resolves them in order, reading them through a cache
   (each flood is compared only with earlier floods near it), and broadcasts the decisions and
   each flood's box.
4. **Tiles** (tiles claimed by the ranks): markers (flood after rejoin, the gap floods that
   reach the window painted, read from their files) and watershed in the window, the core to
   ``tiles/<block>.h5``.

Each of 2-4 is a resumable stage of the workdir's bookkeeper (:mod:`.bookkeeper`, which owns
the paths under ``DIR/refine-<digest>/``): items are claimed dynamically (a slow rank takes
fewer), an item whose file exists is done, and a rerun does only what is missing.
No rank holds more than a window, the floods near it and the tables (per object and per flood).
The output phase writes ``<ds>`` from the tiles and ``<ds>_forward`` from the blocks.
"""

from __future__ import annotations

import io
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import disk, results, storage
from ..config import InferenceConfig, RefineConfig
from ..source import ImageSource
from ..inference import refine as rf
from . import blockstore, bookkeeper, mpi, split
from ..geometry import BlockError
from .reconcile import relabel_core

log = logging.getLogger(__name__)


@dataclass
class RefinedBlocks:
    """What the output phase needs of the refinement (rank 0)."""

    keys: list  # per block: ids in its refined core
    origins: np.ndarray  # ORIGIN_DTYPE: the flood's objects that stay, then the gap objects
    overlaps: np.ndarray  # OVERLAP_DTYPE: the flood's overlaps in output ids
    max_id: int
    comp_dir: Path
    counters: dict[str, float] = field(default_factory=dict)
    values: list | None = None  # per block: the output ids of keys (None: the keys themselves; learned: merged)


def flood_overlaps(plan, labels) -> np.ndarray:
    """Every block's overlaps table in output ids (``labels``: the reconciled
    :class:`~.reconcile.GlobalLabels`), summed per pair; pairs within one object dropped."""
    rows = []
    for b in plan.grid:
        t = blockstore.read_overlaps(plan.block_path(b))
        if not len(t):
            continue
        off = labels.offsets[b.index]
        a = labels.final_of(t["id"].astype(np.uint64) + off)
        c = labels.final_of(t["other_id"].astype(np.uint64) + off)
        keep = (a > 0) & (c > 0) & (a != c)
        rows.append(np.stack([a[keep].astype(np.int64), c[keep].astype(np.int64), t["voxels"][keep]], 1))
    allrows = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
    pairs, inv = np.unique(allrows[:, :2], axis=0, return_inverse=True)
    voxels = np.bincount(inv.ravel(), weights=allrows[:, 2], minlength=len(pairs)).astype(np.int64)
    out = np.zeros(len(pairs), results.OVERLAP_DTYPE)
    if len(pairs):
        out["id"], out["other_id"], out["voxels"] = pairs[:, 0], pairs[:, 1], voxels
    return out


class FloodReader:
    """:data:`~floodfilling.inference.refine.Reader` of the reconciled flood (output ids, after
    the rejoin decisions ``joined``), read from the block results' cores."""

    def __init__(self, plan, final, joined: dict[int, int]):
        self.plan, self.final = plan, final
        self.lut = None
        if joined:
            self.lut = np.arange(final.n_objects + 1, dtype=np.int64)
            self.lut[list(joined)] = list(joined.values())

    def __call__(self, start, stop) -> np.ndarray:
        out = np.zeros(tuple(b - a for a, b in zip(start, stop)), np.int64)
        for b in self.plan.grid:
            s = tuple(max(x, y) for x, y in zip(start, b.core_start))
            e = tuple(min(x, y) for x, y in zip(stop, b.core_stop))
            if any(y <= x for x, y in zip(s, e)):
                continue
            if self.final.comp_dir is not None:  # split_components: the core's component volume
                src = split.read_components(self.plan.layout.per_block(self.final.comp_dir, b),
                                            tuple(slice(x - c, y - c) for x, y, c in zip(s, e, b.core_start)))
            else:
                src = blockstore.read_region(self.plan.block_path(b), s, e)
            core = relabel_core(src, self.final.keys[b.index], self.final.values[b.index], np.uint64).astype(np.int64)
            out[tuple(slice(x - a, y - a) for x, y, a in zip(s, e, start))] = core
        return self.lut[out] if self.lut is not None else out


class ImageReader:
    """:data:`~floodfilling.inference.refine.Reader` of the image (box coordinates), normalised
    as the blocks were. The windows read are kept (least recently used first out, at most
    ``cache_bytes``): a tile's window, read and normalised for its gap cores, is read again for
    its watershed, and a rank takes first the tiles whose cores it found (:func:`refine_blocks`).
    ``read_window`` reads without keeping: a gap flood's window, read once, goes through it (kept,
    thousands of them would fill the cache and a rank's memory for nothing)."""

    CACHE_BYTES = 1 << 30  # normalised windows kept per rank (a 128x256x256 block + halo: ~50 MB)

    def __init__(self, source: ImageSource, cache_bytes: int = CACHE_BYTES):
        self.read_window = source.reader()  # normalised windows, not kept
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.reads = 0  # windows read from the image (misses)
        self.hits = 0

    def __call__(self, start, stop) -> np.ndarray:
        key = (tuple(int(v) for v in start), tuple(int(v) for v in stop))
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return got
        window = self.read_window(start, stop)
        window.flags.writeable = False  # shared by the readers of the cache
        self.reads += 1
        if window.nbytes <= self.cache_bytes:
            self._cache[key] = window
            while sum(w.nbytes for w in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return window

    def close(self) -> None:
        self.read_window.close()


def _save_flood(path: Path, flood: rf.GapFlood | None, steps: int) -> None:
    """One gap flood's file (``steps``: its network steps; a seed too weak to flood has a file too)."""
    if flood is None:
        storage.write_hdf5_atomic(path, {"none": np.zeros(0, np.uint8)}, file_attrs={"network_steps": steps},
                                  overwrite=True)
        return
    storage.write_hdf5_atomic(path, {"mask": flood.mask.astype(np.uint8), "overlap_ids": flood.overlaps[0],
                                     "overlap_voxels": flood.overlaps[1]},
                              file_attrs={"seed": list(flood.seed), "start": list(flood.start),
                                          "steps": int(flood.origin.steps), "seconds": float(flood.origin.seconds),
                                          "canvas_voxels": int(flood.canvas_voxels), "network_steps": steps},
                              overwrite=True, compression="gzip")


def _load_flood(path: Path) -> tuple[rf.GapFlood | None, int]:
    """(the flood or None, its network steps)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if "none" in f:
                return None, int(a["network_steps"])
            seed = tuple(int(v) for v in a["seed"])
            return rf.GapFlood(seed, results.Origin(seed, int(a["steps"]), float(a["seconds"])),
                               tuple(int(v) for v in a["start"]), f["mask"][:].astype(bool), int(a["canvas_voxels"]),
                               (f["overlap_ids"][:].astype(np.int64), f["overlap_voxels"][:].astype(np.int64))), \
                int(a["network_steps"])
    except (OSError, KeyError) as exc:
        raise BlockError(f"{path}: unreadable gap flood ({exc}); delete it and rerun") from None


def _save_centres(path: Path, centres) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(centres, np.int64).reshape(-1, 3))
    disk.atomic_write_bytes(path, buf.getvalue())


def load_centres(path: Path) -> np.ndarray:
    """The gap cores' centres saved in ``path`` ((N, 3) integers); a one-line BlockError naming
    the file when it is damaged (as a damaged gap flood's file)."""
    try:
        centres = np.load(path, allow_pickle=False)
        if centres.ndim != 2 or centres.shape[1] != 3 or centres.dtype.kind not in "iu":
            raise ValueError(f"an array of shape {centres.shape} and dtype {centres.dtype}, not (N, 3) integers")
    except (OSError, ValueError, EOFError) as exc:
        log.debug("%s: %s", path, exc)
        raise BlockError(f"{path}: damaged gap centres file (not a .npy array of (N, 3) integers); delete it and "
                         "rerun (the gap cores are found again)") from None
    return centres.astype(np.int64)


def block_tiles(plan, rcfg: RefineConfig, info) -> list:
    """The refinement's tiles of a block run: the blocks (their cores), each read with
    ``rcfg.halo`` around it."""
    tiles = rf.tiles_of(plan.box.shape, plan.grid.block, rcfg.halo, min_core=info.fov_zyx)
    if [t.core_start for t in tiles] != [b.core_start for b in plan.grid]:
        raise BlockError("refine: the tile grid does not follow the block grid (a bug; please report it)")
    return tiles


def refine_blocks(plan, source: ImageSource, reconciled, final, rcfg: RefineConfig, net, info, cfg: InferenceConfig, comm: mpi.Comm,
                  inflight: int | None) -> RefinedBlocks | None:
    """Collective: the refinement of the reconciled flood ``final`` (see the module docstring);
    the result on rank 0, None elsewhere."""
    t0 = time.perf_counter()
    stages = bookkeeper.refine_stages(plan.layout, plan.refine_dir, plan.grid)
    n = len(plan.grid)
    final = comm.bcast(final, root=0)  # every rank reads the flood through its tables
    tables = None
    if comm.is_root:
        for stage in (stages.cores, stages.floods, stages.tiles):
            stage.prepare()  # (a killed writer's temporaries go)
        overlaps = flood_overlaps(plan, reconciled.labels)
        joined = {}
        if "rejoin" in rcfg.steps:  # (refused with split_components, whose tables count components)
            own = np.zeros(final.n_objects + 1, np.int64)  # each object's voxels: its cores' counts
            for k in range(n):
                np.add.at(own, final.values[k].astype(np.int64), reconciled.metas[k].core_counts)
            own[0] = 0
            joined = rf.rejoin_lut(own, results.overlaps_dict(overlaps), rcfg)
        tables = (overlaps, joined)
    comm.wait_all()
    overlaps, joined = comm.bcast(tables, root=0)
    first_new = int(final.n_objects)
    tiles = block_tiles(plan, rcfg, info)
    seg = FloodReader(plan, final, joined)
    image = ImageReader(source)
    counters = rf.step_counters(len(joined))
    gaps: GapPlan | None = None
    dec = rf.GapDecisions([])
    mine_cores: list[int] = []  # the tiles whose cores this rank found (their windows are in its cache)
    try:
        if "gap_objects" in rcfg.steps:
            rf.check_ids(first_new, "gap_objects")
            gaps = _gap_floods(plan, stages, rcfg, tiles, image, seg, net, info, cfg, comm, inflight, first_new,
                               mine_cores)
            dec = gaps.decisions
            counters = rf.step_counters(len(joined), gaps.n_cores, sum(b is not None for b in gaps.boxes), dec,
                                        gaps.steps)
        filled = 0
        for i in stages.tiles.claimed(plan.run_id, comm.rank, comm.size, prefer=mine_cores):
            path = stages.tiles.result(i)
            floods, targets = gaps.touching(tiles[i]) if gaps is not None else ([], [])
            core, nfill = rf.fill_tile(image, seg, tiles[i], rcfg, floods, targets)
            ids = np.unique(core)
            storage.write_hdf5_atomic(path, {"comp": core.astype(np.uint64), "ids": ids[ids > 0].astype(np.uint64)},
                                      file_attrs={"filled": nfill}, overwrite=True, compression="gzip")
            filled += nfill
    finally:
        image.close()
    log.info("rank %d: %d image windows read and normalised, %d reused from its cache", comm.rank, image.reads,
             image.hits)
    comm.wait_all()
    gathered = comm.gather(filled, root=0)
    if not comm.is_root:
        return None
    import h5py

    keys, max_id = [], first_new
    for k in range(n):
        with h5py.File(stages.tiles.result(k), "r") as f:
            keys.append(f["ids"][:])
            counters["voxels_filled"] += int(f.attrs["filled"])
            if len(keys[-1]):
                max_id = max(max_id, int(keys[-1][-1]))
    stay = final.origins[~np.isin(final.origins["id"].astype(np.int64), list(joined))] if joined else final.origins
    added = results.origins_table({t: gaps.floods[i].origin for i, t in enumerate(dec.targets) if t > first_new})
    counters["seconds"] = time.perf_counter() - t0
    log.info("refine: %d objects rejoined, %d gap objects, %d voxels filled (%d this run), %.1f s",
             counters["rejoined"], counters["gap_objects"], counters["voxels_filled"], sum(gathered), counters["seconds"])
    return RefinedBlocks(keys, np.concatenate([stay, added.astype(stay.dtype)]), overlaps, max_id, stages.tiles.results,
                         counters)


class FloodFiles(Sequence):
    """The gap floods of a run as a sequence that reads each from its file on demand, keeping
    the last ``cache`` read (the resolution reads floods in order and their neighbours again)."""

    def __init__(self, stage: bookkeeper.Stage, cache: int = 512):
        self.stage, self.n, self.cache = stage, stage.items, cache
        self._cached: OrderedDict[int, rf.GapFlood | None] = OrderedDict()
        self.steps: dict[int, int] = {}  # network steps of each flood read so far

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> rf.GapFlood | None:
        if i in self._cached:
            self._cached.move_to_end(i)
            return self._cached[i]
        flood, self.steps[i] = _load_flood(self.stage.result(i))
        self._cached[i] = flood
        if len(self._cached) > self.cache:
            self._cached.popitem(last=False)
        return flood


@dataclass
class GapPlan:
    """The resolved gap floods, as every rank needs them for its tiles."""

    floods: FloodFiles
    targets: list[int]  # per flood: its id in the result (0: none or dropped)
    boxes: list  # per flood: (start, stop) of its voxels, or None
    decisions: rf.GapDecisions
    n_cores: int
    steps: int  # network steps of all floods

    def touching(self, tile: rf.Tile) -> tuple[list, list[int]]:
        """(floods, ids) of the kept floods whose voxels reach into ``tile``'s window, in order."""
        idx = [i for i, (t, b) in enumerate(zip(self.targets, self.boxes))
               if t and b is not None and rf.box_intersection(tile.window_start, tile.window_stop, *b) is not None]
        return [self.floods[i] for i in idx], [self.targets[i] for i in idx]


def _gap_floods(plan, stages: bookkeeper.RefineStages, rcfg, tiles, image, seg, net, info, cfg, comm, inflight,
                first_new, mine_cores: list[int]) -> GapPlan:
    """Phases 2 and 3 (cores, floods, resolution on rank 0): the same plan on every rank."""
    cpath = stages.centres
    if not comm.bcast(cpath.exists() if comm.is_root else None, root=0):  # one answer for all ranks
        for i in stages.cores.claimed(plan.run_id, comm.rank, comm.size):
            mine_cores.append(i)
            _save_centres(stages.cores.result(i), rf.tile_gap_centres(image, seg, tiles[i], rcfg))
        comm.wait_all()
        if comm.is_root:
            centres = np.concatenate([load_centres(stages.cores.result(i)) for i in range(len(tiles))]
                                     or [np.zeros((0, 3), np.int64)]).reshape(-1, 3)
            _save_centres(cpath, centres)
        comm.wait_all()
    centres = comm.on_root(lambda: load_centres(cpath))  # (a damaged file: the same one-line error on every rank)
    floods_stage = stages.with_floods(len(centres)).floods
    if comm.is_root:
        done = floods_stage.n_done()
        log.info("refine: %d gap cores in %d tiles; flooding %d of them over %d rank(s) (%d on disk)",
                 len(centres), len(tiles), len(centres) - done, comm.size, done)
    if floods_stage.n_done() < len(centres):
        claimer = floods_stage.claimer(plan.run_id, comm.rank, comm.size)
        # (a gap flood's window is read once: not kept in the tiles' cache)
        rf.flood_gaps(image.read_window, seg, plan.box.shape, [tuple(int(v) for v in c) for c in centres],
                      rf.FloodNetwork(net, info, cfg), first_new, rcfg.gap_box, inflight,
                      on_flood=lambda i, f, steps: _save_flood(floods_stage.result(i), f, steps), claim=claimer.next)
    comm.wait_all()
    floods = FloodFiles(floods_stage)
    resolved = None
    if comm.is_root:  # reads every flood once, in order (and its neighbours again, mostly cached)
        dec = rf.resolve_gap_floods(floods, first_new, rcfg.gap_join_fraction)
        boxes = []
        for i in range(len(floods)):
            f = floods[i]
            boxes.append((f.start, f.stop) if f is not None else None)
        resolved = (dec, boxes, sum(floods.steps.values()))
        log.info("refine: gap floods resolved: %d new objects, %d joined an object, %d inside an earlier flood; "
                 "filling %d tiles", dec.new, dec.joined, dec.inside, len(tiles))
    dec, boxes, steps = comm.bcast(resolved, root=0)
    return GapPlan(floods, dec.targets, boxes, dec, len(centres), steps)
