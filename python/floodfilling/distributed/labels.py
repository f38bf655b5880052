"""Phase 3 of block inference: from the block results to the output's labels.

:func:`match_my_pairs` (every rank, its share of the block pairs and blocks) matches the objects
in each overlap (:func:`.reconcile.match_overlap`) and reads the block metadata;
:func:`reconcile` (rank 0) runs union-find over all merge edges (:func:`.reconcile.global_labels`)
and collects attributes, counters and timings into a :class:`Reconciled`; :func:`final_labels`
(rank 0) or, with ``split_components``, :func:`split_components` (collective, :mod:`.split`)
turn it into the :class:`FinalLabels` the output is written from (:mod:`.output`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..results import BlockRunAttrs, ResultAttrs
from . import blockstore, mpi, split
from .blockstore import BlockMeta
from .reconcile import GlobalLabels, global_labels, match_overlap, relabel_core
from .workdir import Plan

if TYPE_CHECKING:
    from ..source import ImageSource
    from .worker import RankStats

log = logging.getLogger(__name__)


@dataclass
class MatchStats:
    """Overlap matching on one rank (or summed over ranks)."""

    pairs: int = 0
    read_s: float = 0.0
    match_s: float = 0.0
    voxels: int = 0
    candidates: int = 0

    def add(self, other: "MatchStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class RankResult:
    """What each rank hands rank 0 after matching."""

    edges: list  # (block i, block j, (M, 2) local ids) merge edges
    match: MatchStats
    metas: dict[int, BlockMeta]  # this rank's share of the blocks
    stats: RankStats  # phase 2 on this rank
    idle_s: float  # waiting for the other ranks after phase 2


@dataclass
class Reconciled:
    """Rank 0 after union-find: everything the write phase needs besides the plan."""

    labels: GlobalLabels
    metas: dict[int, BlockMeta]  # every block's
    attrs: ResultAttrs  # the output segmentation's attributes (its counters: ``counters``)
    counters: dict[str, float]  # summed over the blocks
    timings: dict[str, float]
    rank_stats: list[RankStats]
    candidates: int  # candidate pairs over all overlaps
    ranks: int


@dataclass
class FinalLabels:
    """What the output is written from: per block, core ids -> output ids."""

    n_objects: int
    keys: list  # per block: sorted ids found in the core source
    values: list  # per block: their output ids (0: removed)
    origins: np.ndarray
    n_merges: int = 0
    comp_dir: Path | None = None  # split_components: cores come from the component volumes here

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.n_objects < 2**32 else np.dtype(np.uint64)

    def blocks(self, indices) -> list:
        """(block index, keys, values) of each of ``indices``."""
        return [(k, self.keys[k], self.values[k]) for k in indices]


@dataclass
class OriginRows:
    """Every block's origins in box coordinates."""

    prov: np.ndarray  # provisional id (uint64)
    seeds: np.ndarray  # (M, 3) int64
    steps: np.ndarray
    seconds: np.ndarray
    incore: np.ndarray  # whether the seed lies in its own block's core
    final: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # the object's final id (0: dropped)


def _match_pairs(plan: Plan, pairs: list[tuple[int, int]]) -> tuple[list, MatchStats]:
    edges = []
    stats = MatchStats()
    for i, j in pairs:
        ov = plan.grid.overlap(i, j)
        if ov is None:
            continue
        t_read = time.perf_counter()
        a = blockstore.read_region(plan.block_path(plan.grid[i]), *ov)
        b = blockstore.read_region(plan.block_path(plan.grid[j]), *ov)
        t_match = time.perf_counter()
        m = match_overlap(a, b, plan.rule)
        stats.read_s += t_match - t_read
        stats.match_s += time.perf_counter() - t_match
        stats.pairs += 1
        stats.voxels += a.size
        stats.candidates += len(m.pairs)
        if m.merge.any():
            edges.append((i, j, m.edges))
    return edges, stats


def match_my_pairs(plan: Plan, comm: mpi.Comm, stats: RankStats, idle_s: float) -> RankResult:
    """Every rank: the pairs r, r + N, ... and the metadata of blocks r, r + N, ..."""
    edges, match = _match_pairs(plan, plan.grid.pairs()[comm.rank::comm.size])
    metas = {k: blockstore.read_meta(plan.block_path(plan.grid[k])) for k in range(comm.rank, len(plan.grid),
                                                                                      comm.size)}
    return RankResult(edges, match, metas, stats, idle_s)


def reconcile(plan: Plan, source: ImageSource, results: list[RankResult], cfg, info, ranks: int,
              timings: dict[str, float]) -> Reconciled:
    """Rank 0: union-find over every rank's merge edges; the output's attributes."""
    t_gather = time.perf_counter()
    n = len(plan.grid)
    all_edges, metas = [], {}
    match = MatchStats()
    for r in results:
        all_edges += r.edges
        metas.update(r.metas)
        match.add(r.match)
    rank_stats = [r.stats for r in results]
    t_union = time.perf_counter()
    # with split_components, dust is removed after splitting (as on a whole volume)
    labels = global_labels([metas[k].max_id for k in range(n)], [metas[k].core_ids for k in range(n)],
                           all_edges, [metas[k].core_counts for k in range(n)],
                           0 if cfg.split_components else int(cfg.dust_size))
    t_done = time.perf_counter()
    counters: dict[str, float] = {}
    for k in range(n):
        for key, v in metas[k].counters.items():
            counters[key] = counters.get(key, 0) + v
    attrs = ResultAttrs(
        resolution_zyx_nm=tuple(source.resolution_zyx_nm) if source.resolution_zyx_nm is not None else None,
        bbox_zyx=(tuple(plan.box.start), tuple(plan.box.stop)), source_image=source.name, model=info.source,
        config=cfg.to_dict(), normalisation=source.norm.to_dict(), counters=counters,
        block=BlockRunAttrs(block_zyx=tuple(plan.grid.block), halo_zyx=tuple(plan.grid.halo),
                            merge_rule=plan.rule.to_dict(),
                            # blocks + reconciliation options: a rerun's "already complete" test
                            block_manifest=plan.out_digest, workdir=os.path.abspath(plan.workdir)))
    timings = dict(timings, gather_s=t_union - t_gather, union_find_s=t_done - t_union,
                   block_seconds_sum=sum(s.seconds for s in rank_stats),
                   block_seconds_max_rank=max(s.seconds for s in rank_stats),
                   host_wait_seconds_sum=sum(s.host_wait_seconds for s in rank_stats),
                   prepare_seconds_sum=sum(s.prepare_seconds for s in rank_stats),
                   wait_for_others_s_max=max(r.idle_s for r in results), pair_read_s=match.read_s,
                   pair_match_s=match.match_s, pairs_matched=match.pairs, pair_voxels=match.voxels)
    return Reconciled(labels, metas, attrs, counters, timings, rank_stats, match.candidates, ranks)


def _origin_rows(plan: Plan, labels: GlobalLabels, metas: dict[int, BlockMeta]) -> OriginRows:
    """Every block's origins in box coordinates: provisional id, seed, steps, seconds, whether the
    seed lies in its own block's core, and the object's final id (0: dropped)."""
    prov, seeds, steps, secs, incore = [], [], [], [], []
    for k, b in enumerate(plan.grid):
        o = metas[k].origins
        if not len(o):
            continue
        s = np.stack([o["z"], o["y"], o["x"]], axis=1) + np.asarray(b.outer_start)
        prov.append(o["id"].astype(np.uint64) + labels.offsets[k])
        seeds.append(s.astype(np.int64))
        steps.append(o["steps"])
        secs.append(o["seconds"])
        incore.append(np.all((s >= np.asarray(b.core_start)) & (s < np.asarray(b.core_stop)), axis=1))
    if not prov:
        return OriginRows(np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros(0, np.int64), np.zeros(0),
                          np.zeros(0, bool), np.zeros(0, np.uint64))
    prov_ids = np.concatenate(prov)
    return OriginRows(prov_ids, np.concatenate(seeds), np.concatenate(steps), np.concatenate(secs),
                      np.concatenate(incore), labels.final_of(prov_ids))


def _origins_table(rows: OriginRows, n_objects: int, dense: bool = True) -> np.ndarray:
    """One row per final object (``dense``: all of 1..N; else those holding an origin): the seed
    of a member whose seed lies in its block's core, smallest provisional id first; steps and
    seconds summed over the members."""
    from ..results import ORIGIN_DTYPE

    keep = rows.final > 0
    prov, seeds, steps, secs, incore, final = (getattr(rows, c)[keep] for c in ("prov", "seeds", "steps", "seconds",
                                                                                "incore", "final"))
    if dense:
        ids = np.arange(1, n_objects + 1, dtype=np.uint64)
    else:
        ids = np.unique(final)
    if not ids.size:
        return np.zeros(0, ORIGIN_DTYPE)
    order = np.lexsort((prov, ~incore, final))
    first = order[np.r_[True, final[order][1:] != final[order][:-1]]] if final.size else order
    row = np.searchsorted(ids, final)  # final is in ids
    table = np.zeros(ids.size, ORIGIN_DTYPE)
    table["id"] = ids
    r = row[first]
    table["z"][r], table["y"][r], table["x"][r] = seeds[first, 0], seeds[first, 1], seeds[first, 2]
    table["steps"] = np.bincount(row, weights=steps, minlength=ids.size).astype(np.int64)
    table["seconds"] = np.bincount(row, weights=secs, minlength=ids.size)
    return table


def final_labels(plan: Plan, reconciled: Reconciled) -> FinalLabels:
    """Rank 0, without split_components: the reconciled labels as they are."""
    labels = reconciled.labels
    origins = _origins_table(_origin_rows(plan, labels, reconciled.metas), labels.n_objects)
    return FinalLabels(labels.n_objects, labels.keys, labels.values, origins, labels.n_merges)


def _core_block_of(grid, zyx: np.ndarray) -> np.ndarray:
    """Index of the block whose core holds each (z, y, x) (box coordinates)."""
    g = [np.clip(np.searchsorted(grid.bounds[a], zyx[:, a], side="right") - 1, 0, grid.grid_shape[a] - 1)
         for a in range(3)]
    return ((g[0] * grid.grid_shape[1] + g[1]) * grid.grid_shape[2] + g[2]).astype(np.int64)


def split_components(plan: Plan, reconciled: Reconciled | None, comm: mpi.Comm,
                     dust_size: int) -> FinalLabels | None:
    """Collective: every object's connected components across blocks (:mod:`.split`). Returns
    the output tables on rank 0 (None elsewhere); the origins table keeps the components that
    hold a seed of their object (as on a whole volume)."""
    n = len(plan.grid)
    sdir = plan.layout.split_dir(plan.run_id)
    per_rank, rows = None, None
    if comm.is_root:
        labels = reconciled.labels
        rows = _origin_rows(plan, labels, reconciled.metas)
        owner = _core_block_of(plan.grid, rows.seeds)
        sdir.mkdir(parents=True, exist_ok=True)
        per_rank = [[(k, labels.keys[k], labels.values[k], np.flatnonzero(owner == k), rows.seeds[owner == k])
                     for k in range(r, n, comm.size)] for r in range(comm.size)]
    comm.wait_all()  # sleep while rank 0 reconciles
    mine = comm.scatter(per_rank, root=0)

    def path(k: int) -> Path:
        return plan.layout.per_block(sdir, plan.grid[k])

    comps, hits = {}, []
    for k, keys, values, oidx, seeds in mine:
        b = plan.grid[k]
        core = relabel_core(blockstore.read_region(plan.block_path(b), b.core_start, b.core_stop), keys, values,
                            np.uint64)
        comp, cc = split.label_core(core, b.core_start)
        split.write_components(path(k), comp, cc)
        loc = seeds - np.asarray(b.core_start)
        hits.append((k, oidx, comp[loc[:, 0], loc[:, 1], loc[:, 2]]))
        comps[k] = cc
    comm.wait_all()  # every component volume is on disk
    edges = []
    for k, *_ in mine:
        for axis, j in split.face_neighbours(plan.grid, k):
            pi, gi = split.read_plane(path(k), axis, last=True)
            pj, gj = split.read_plane(path(j), axis, last=False)
            e = split.face_edges(pi, pj, gi, gj)
            if len(e):
                edges.append((k, j, e))
    gathered = comm.gather((comps, hits, edges), root=0)
    if not comm.is_root:
        return None
    all_comps, all_hits, all_edges = {}, [], []
    for c, h, e in gathered:
        all_comps.update(c)
        all_hits += h
        all_edges += e
    num = split.number_components([all_comps[k] for k in range(n)], all_edges, dust_size)
    final = np.zeros(rows.final.size, np.uint64)  # each origin: the component at its seed, if of its object
    for k, oidx, c in all_hits:
        c = c.astype(np.int64)
        ok = c > 0
        ok[ok] = all_comps[k].gid[c[ok] - 1] == rows.final[oidx[ok]]
        final[oidx[ok]] = num.values[k][c[ok] - 1]
    keys = [np.arange(1, all_comps[k].gid.size + 1, dtype=np.uint64) for k in range(n)]
    log.info("split_components: %d objects -> %d components (%d joins across block faces%s)",
             reconciled.labels.n_objects, num.n_objects, num.n_joins,
             f", dust < {dust_size} removed" if dust_size > 0 else "")
    return FinalLabels(num.n_objects, keys, num.values,
                       _origins_table(dataclasses.replace(rows, final=final), num.n_objects, dense=False),
                       reconciled.labels.n_merges, comp_dir=sdir)
