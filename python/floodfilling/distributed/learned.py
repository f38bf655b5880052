"""``ffn segment IMAGE OUT --block z,y,x --refine --refine-model M``: the learned refinement of
:mod:`floodfilling.inference.learned` on the reconciled block flood, tile by tile (the tiles are
the blocks, as for the hand steps, :mod:`.refine`), each piece saved in the workdir so that a
killed run resumes. The result equals
:func:`~floodfilling.inference.learned.learned_refine` of the assembled flood with ``tile`` =
the block size and the flood's overlaps table (``<ds>_overlaps``), bit for bit (tested).

1. **Tables** (rank 0): the flood's overlaps in output ids (:func:`.refine.flood_overlaps`;
   none recorded with ``split_components`` / ``dust_size``: the overlap feature is NaN, as in
   memory), written to ``<ds>_overlaps``.
1b. **Gap objects** (base ``gap_cores``): the hand step's gap floods and decisions, block by
   block as ``--refine`` makes them (:func:`.refine.refine_blocks` with the one step
   ``gap_objects``: its own resumable stages, cores, floods and tiles, the tiles holding the
   flood with the gap objects painted in, no watershed). Everything below reads those tiles as
   its markers in place of the flood.
2. **Cores** (bases ``cores``, ``gap_cores``; tiles claimed by the ranks): each tile's gap cores
   (:func:`~floodfilling.inference.learned.tile_cores`), ``lcores/<block>.h5``. Their ids follow
   the flood's in tile order, then in each tile's core order
   (:func:`~floodfilling.inference.learned.core_offsets`): the same whoever found them.
3. **Base** (tiles claimed): the watershed of each tile's window from the flood and every core
   reaching it (:func:`~floodfilling.inference.learned.base_tile`), its core to ``lbase/<block>.h5``.
4. **Statistics** (tiles claimed): each tile's contact statistics over the assembled base
   (:func:`~floodfilling.inference.learned.tile_contacts`: its core's voxels, the faces whose
   lower voxel is in its core, so a face across two tiles is counted once),
   ``lstats/<block>.npz``.
5. **Merges** (rank 0): the tiles' statistics summed in tile order
   (:func:`~floodfilling.inference.contacts.sum_graphs`), the overlap statistic from the
   table, the agglomeration on the whole (small) graph, saved as ``agglomeration.npz``. The
   output phase writes each tile's base core through the merges' id map.

Each of 2-4 is a resumable stage of the bookkeeper (:func:`.bookkeeper.learned_stages`): items
claimed dynamically, an item whose file exists is done, a rerun does only what is missing. The
refinement directory is named by the output's digest, which holds the refine model file's
digest (a changed model never reuses these files).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from .. import disk, results, storage
from ..config import InferenceConfig, RefineConfig
from ..geometry import BlockError
from ..inference import learned as ln
from ..inference import refine as rf
from ..inference.agglomeration import agglomerate
from ..inference.contacts import ContactGraph, sum_graphs
from ..source import ImageSource
from . import bookkeeper, mpi, split
from .refine import FloodReader, ImageReader, RefinedBlocks, block_tiles, flood_overlaps, refine_blocks

log = logging.getLogger(__name__)


class TileReader:
    """:data:`~floodfilling.inference.refine.Reader` of a volume stored tile by tile (each tile's
    core in ``stage``'s files, dataset ``comp``); ``offsets``: per tile, added to its non-zero
    ids (the gap cores' local labels -> their ids)."""

    def __init__(self, tiles, stage: bookkeeper.Stage, offsets=None):
        self.tiles, self.stage, self.offsets = tiles, stage, offsets

    def __call__(self, start, stop) -> np.ndarray:
        out = np.zeros(tuple(b - a for a, b in zip(start, stop)), np.int64)
        for i, t in enumerate(self.tiles):
            box = rf.box_intersection(start, stop, t.core_start, t.core_stop)
            if box is None:
                continue
            s, e = box
            src = split.read_components(self.stage.result(i), tuple(slice(x - c, y - c)
                                                                     for x, y, c in zip(s, e, t.core_start)))
            src = src.astype(np.int64)
            if self.offsets is not None:
                src = np.where(src > 0, src + self.offsets[i], 0)
            out[tuple(slice(x - a, y - a) for x, y, a in zip(s, e, start))] = src
        return out


def _save_graph(path, g: ContactGraph) -> None:
    disk.atomic_write_npz(path, ids=g.ids, node_stats=g.node_stats, pairs=g.pairs, edge_stats=g.edge_stats)


def _load_npz(path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        log.debug("%s: %s", path, exc)
        raise BlockError(f"{path}: damaged {what} file; delete it and rerun") from None


def load_graph(path) -> ContactGraph:
    d = _load_npz(path, "contact statistics")
    try:
        return ContactGraph(d["ids"].astype(np.int64), d["node_stats"], d["pairs"].astype(np.int64).reshape(-1, 2),
                            d["edge_stats"])
    except KeyError:
        raise BlockError(f"{path}: damaged contact statistics file; delete it and rerun") from None


def _core_centres(path) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f["centres"][:].astype(np.int64).reshape(-1, 3)
    except (OSError, KeyError) as exc:
        raise BlockError(f"{path}: unreadable gap cores file ({exc}); delete it and rerun") from None


def learned_blocks(plan, source: ImageSource, reconciled, final, rcfg: RefineConfig, model: ln.RefineModel, info, cfg: InferenceConfig,
                   comm: mpi.Comm, net=None, inflight: int | None = None) -> RefinedBlocks | None:
    """Collective: the learned refinement of the reconciled flood ``final`` (module docstring);
    the result on rank 0, None elsewhere. Base ``gap_cores`` runs the gap floods with ``net``
    (``inflight``: canvases in flight, as ``--refine``)."""
    t0 = time.perf_counter()
    bcfg = model.base_config(rcfg)
    stages = bookkeeper.learned_stages(plan.layout, plan.refine_dir, plan.grid)
    final = comm.bcast(final, root=0)
    painted = None  # base gap_cores: the hand step's gap objects (rank 0), their tiles on disk
    if model.base == "gap_cores":
        painted = refine_blocks(plan, source, reconciled, final, dataclasses.replace(bcfg, steps=("gap_objects",),
                                                                                     model=""),
                                net, info, cfg, comm, inflight)
    tables = None
    if comm.is_root:
        for stage in stages.all():
            stage.prepare()  # (a killed writer's temporaries go)
        recorded = not (cfg.split_components or cfg.dust_size > 0)  # postprocessing drops the overlaps
        if not recorded:
            overlaps = np.zeros(0, results.OVERLAP_DTYPE)
        else:  # (base gap_cores: the gap objects' stage made the same table already)
            overlaps = painted.overlaps if painted is not None else flood_overlaps(plan, reconciled.labels)
        top = max((int(np.max(v)) for v in final.values if len(v)), default=0)  # the flood's largest id
        top_markers = top if painted is None else max([top] + [int(k[-1]) for k in painted.keys if len(k)])
        tables = (overlaps, recorded, top, top_markers)
    comm.wait_all()
    overlaps, recorded, top, top_markers = comm.bcast(tables, root=0)
    tiles = block_tiles(plan, rcfg, info)
    flood = FloodReader(plan, final, {})
    # the base's markers: the flood, or with base gap_cores the flood with the gap objects painted in
    seg = flood if model.base != "gap_cores" else \
        TileReader(tiles, bookkeeper.refine_stages(plan.layout, plan.refine_dir, plan.grid).tiles)
    image = ImageReader(source)
    shape = tuple(plan.box.shape)
    work = {"cores": 0, "base": 0, "stats": 0}  # tiles this rank computed now
    try:
        offsets = None
        if model.base in ("cores", "gap_cores"):
            for i in stages.cores.claimed(plan.run_id, comm.rank, comm.size):
                lab, centres = ln.tile_cores(image, seg, tiles[i], bcfg)
                storage.write_hdf5_atomic(stages.cores.result(i), {
                    "comp": lab.astype(np.int32), "centres": np.asarray(centres, np.int64).reshape(-1, 3)},
                    overwrite=True, compression="gzip")
                work["cores"] += 1
            comm.wait_all()
            counts = comm.on_root(lambda: [len(_core_centres(stages.cores.result(i))) for i in range(len(tiles))])
            offsets = ln.core_offsets(counts, top_markers)
        cores = TileReader(tiles, stages.cores, offsets) if offsets is not None else \
            (lambda s, e: np.zeros(tuple(b - a for a, b in zip(s, e)), np.int64))
        for i in stages.base.claimed(plan.run_id, comm.rank, comm.size):
            core = ln.base_tile(image, seg, cores, tiles[i], bcfg, model.boundary_map())
            ids = np.unique(core)
            flood_voxels = int(np.count_nonzero(flood(tiles[i].core_start, tiles[i].core_stop)))
            storage.write_hdf5_atomic(stages.base.result(i), {"comp": core.astype(np.uint64),
                                                              "ids": ids[ids > 0].astype(np.uint64)},
                                      file_attrs={"filled": int(np.count_nonzero(core)) - flood_voxels},
                                      overwrite=True, compression="gzip")
            work["base"] += 1
        comm.wait_all()
        base = TileReader(tiles, stages.base)
        for i in stages.stats.claimed(plan.run_id, comm.rank, comm.size):
            _save_graph(stages.stats.result(i), ln.tile_contacts(image, base, lambda s, e: seg(s, e) > 0, tiles[i],
                                                                 shape, bcfg))
            work["stats"] += 1
    finally:
        image.close()
    comm.wait_all()
    gathered = comm.gather(work, root=0)
    if not comm.is_root:
        return None
    return _merge(plan, stages, tiles, final, model, overlaps if recorded else None, overlaps, offsets, top,
                  gathered, t0, painted)


def _merge(plan, stages: bookkeeper.LearnedStages, tiles, final, model: ln.RefineModel, recorded_overlaps,
           overlaps_table, offsets, top: int, gathered, t0: float, painted: RefinedBlocks | None) -> RefinedBlocks:
    """Rank 0: the merges (saved, or read back on a resume), each tile's id map, the origins
    (``painted``: the gap objects of base gap_cores)."""
    import h5py

    t_merge = time.perf_counter()
    agg_path = stages.agglomeration
    if agg_path.exists():
        d = _load_npz(agg_path, "learned merges")
        lut = dict(zip(d["keys"].tolist(), d["values"].tolist()))
        n_merges, n_base = int(d["merges"]), int(d["base_objects"])
    else:
        graph = sum_graphs([load_graph(stages.stats.result(i)) for i in range(len(tiles))],
                           results.overlaps_dict(recorded_overlaps) if recorded_overlaps is not None else None)
        agg = agglomerate(graph, model.predict, model.threshold)
        lut, n_merges, n_base = agg.lut, len(agg.merges), len(graph.ids)
        disk.atomic_write_npz(agg_path, keys=np.fromiter(lut.keys(), np.int64, len(lut)),
                              values=np.fromiter(lut.values(), np.int64, len(lut)), merges=np.int64(n_merges),
                              base_objects=np.int64(n_base))
    keys, values, filled, max_id = [], [], 0, 0
    for i in range(len(tiles)):
        with h5py.File(stages.base.result(i), "r") as f:
            k = f["ids"][:].astype(np.uint64)
            filled += int(f.attrs["filled"])
        v = np.asarray([lut.get(int(x), int(x)) for x in k], np.uint64)
        keys.append(k)
        values.append(v)
        if len(v):
            max_id = max(max_id, int(v.max()))
    origins_core: dict[int, results.Origin] = {}
    if painted is not None:  # the gap objects: the rows after the flood's in the hand step's origins
        for row in painted.origins[painted.origins["id"].astype(np.int64) > top]:
            origins_core[int(row["id"])] = results.Origin((int(row["z"]), int(row["y"]), int(row["x"])),
                                                          int(row["steps"]), float(row["seconds"]))
    if offsets is not None:
        for i in range(len(tiles)):
            for j, c in enumerate(_core_centres(stages.cores.result(i))):
                origins_core[offsets[i] + 1 + j] = results.Origin(tuple(int(v) for v in c), 0, 0.0)
    joined = {k: v for k, v in lut.items() if k <= top}
    stay = final.origins[~np.isin(final.origins["id"].astype(np.int64), list(joined))] if joined else final.origins
    kept = {k: o for k, o in origins_core.items() if k not in lut}
    added = results.origins_table(kept)
    counters = {"learned_merges": n_merges, "learned_base_objects": n_base, "rejoined": len(joined),
                "gap_objects": len(kept), "gap_cores": len(origins_core), "voxels_filled": filled,
                "learned_merge_s": time.perf_counter() - t_merge, "seconds": time.perf_counter() - t0}
    for name in ("cores", "base", "stats"):
        counters[f"learned_{name}_tiles_run"] = sum(g[name] for g in gathered)
    if painted is not None:
        counters.update({k: painted.counters[k] for k in ("gap_floods", "gap_steps", "gap_joined")})
    log.info("learned refine (%s base): %d merges, %d core objects kept of %d, %.1f s", model.base, n_merges,
             len(kept), len(origins_core), counters["seconds"])
    return RefinedBlocks(keys, np.concatenate([stay, added.astype(stay.dtype)]), overlaps_table, max(max_id, 0),
                         stages.base.results, counters, values=values)


def refine_record(refine: RefineConfig | None, model: ln.RefineModel | None) -> dict | None:
    """The [refine] options as the output's digest holds them (:func:`.workdir.make_plan`): with a
    refine model, its file's digest too, so that a changed model (same path) is another output
    and never reuses the refinement files of the old one."""
    if refine is None:
        return None
    d = refine.to_dict()
    if model is not None:
        d["model_digest"] = results.file_digest(model.source)
    return d
