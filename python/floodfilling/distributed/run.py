"""Block inference: ``[mpiexec -n N] ffn segment IMAGE OUT --block z,y,x [--halo z,y,x] [--workdir DIR]``.

Four phases; every rank runs :func:`segment_blocks` (rank 0 is also a worker):

1. **Plan** (rank 0, result broadcast; :mod:`.workdir`): validate the options, ONE normalisation
   for the whole volume, the block grid, the manifest ``DIR/manifest.json`` (with the digest of
   the image's box, its slabs read over all ranks), the workdir lock ``DIR/run.json`` and the
   output's lock; what a killed run left is removed. From here on, any failure gives both locks
   back (:func:`~.workdir.release`; under ``mpiexec`` before the abort).
2. **Blocks** (all ranks, dynamic; :mod:`.worker`): each rank claims the next unfinished block
   (``DIR/claims/<name>``, ``O_CREAT | O_EXCL``) and writes its result atomically to
   ``DIR/blocks/<name>.h5`` (:mod:`.blockstore`). A block whose file exists is done and
   skipped on a rerun.
3. **Reconcile** (pairs spread over ranks, union-find on rank 0; :mod:`.labels` calling
   :mod:`.reconcile`, and :mod:`.split` with ``split_components``): match objects in every
   overlap, merge, number the objects 1..N.
4. **Write** (:mod:`.output`): each block's core, relabelled, into ``OUT`` with
   ``<ds>_origins``, built at a temporary path (by rank 0 alone with one rank, by every rank
   with several) and renamed onto ``OUT`` by rank 0 at the very end, so nothing half-written
   is ever at ``OUT``. Zarr chunks divide the block shape, so every chunk lies in exactly one
   block's core and the ranks never share a chunk::

       z=0        block 128          256              box stop
       |  chunk 64 | chunk 64 | chunk 64 | chunk 64 | chunk (partial)
       |<----- core of block 0 ------>|<---- core of block 1 ---->|...

Killing any rank at any moment (mpiexec then ends the others) and rerunning the same command
finishes the job with the same output. A rerun after ``OUT`` was written does nothing.
One job per workdir at a time (checked through ``DIR/run.json`` on the same host).

Block results depend only on the block (its image, the global normalisation, the model and
options), never on the rank that ran it or on ``inflight`` (on CPU every FOV runs at batch 1;
with several threads per rank, bitwise equality across thread counts is up to the BLAS/oneDNN
build, so compare runs at the same ``threads``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .. import boxes, disk, kernels, volumes
from ..config import InferenceConfig, RefineConfig
from ..inference.engine import check_inflight
from ..inference.learned import check_refine_options, load_refine_model
from ..inference.refine import check_gap_box
from ..model import load_model
from ..source import ImageSource, combine_digests, image_source
from . import labels, mpi, output, worker
from . import learned as learned_mod
from . import refine as refine_mod
from ..geometry import BlockError, fmt_zyx
from .labels import FinalLabels, Reconciled
from .reconcile import MergeRule
from .workdir import Plan, make_plan, release, tidy, write_report
from .worker import RankStats

log = logging.getLogger(__name__)


@dataclass
class BlocksResult:
    """Summary of a block run (the same on every rank)."""

    out: str
    workdir: str
    n_objects: int = 0
    n_blocks: int = 0
    blocks_run: int = 0  # blocks segmented by this invocation (all ranks)
    blocks_skipped: int = 0  # blocks found finished at the start
    n_pairs: int = 0
    n_merges: int = 0
    ranks: int = 1
    counters: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    already_complete: bool = False


def segment_blocks(image_spec: str | volumes.VolumeSpec, out_spec: str, *, block: tuple[int, int, int] | None = None,
                   halo: tuple[int, int, int] | None = None, workdir: str | None = None, model: str | None = None,
                   config: InferenceConfig | None = None, bbox: boxes.BBox | None = None, overwrite: bool = False,
                   inflight: int | None = None, progress: bool = False, merge_rule: MergeRule | None = None,
                   comm: mpi.Comm | None = None, refine: RefineConfig | None = None) -> BlocksResult:
    """Segments ``image_spec`` block by block (on every rank of an MPI launch) into ``out_spec``.

    ``block``/``halo``: 3 integers (z, y, x) (default block 128,256,256, halo the FOV radius +
    deltas; on a rerun, those recorded in the workdir); ``bbox``: a :class:`~floodfilling.boxes.BBox`
    of the image (default: all of it); ``workdir``: block results and manifest (default
    ``OUT.blocks`` next to the output file); ``merge_rule``: overlap rule (default from
    ``config``'s ``merge_*`` options, see :mod:`.reconcile`). User errors raise a ValueError
    (:class:`~.blocks.BlockError`, or :class:`~floodfilling.boxes.ParameterError` naming the
    parameter) with a one-line message on every rank. ``refine``: refine the reconciled flood
    block by block (:mod:`.refine`; with ``refine.model``, the learned refinement, :mod:`.learned`)
    into ``OUT``, the flood kept as ``<ds>_forward``.
    """
    started = time.perf_counter()
    comm = comm or mpi.world()
    cfg = (config or InferenceConfig()).validate()
    rule = (merge_rule or MergeRule.from_config(cfg)).validate()
    check_inflight(inflight)
    refine = refine.validate() if refine is not None else None
    if refine is not None:
        check_refine_options(refine, cfg)
    if refine is not None and any(refine.tile):
        raise BlockError(f"refine.tile={fmt_zyx(refine.tile)}: with block inference the tiles are the blocks; "
                         "leave refine.tile at 0,0,0")
    learned = None
    if refine is not None and refine.learned_model:  # the learned refinement (.learned): its model read first
        learned = comm.collective(lambda: load_refine_model(refine.learned_model))
    net, info = comm.collective(lambda: load_model(model, "cpu"))
    if refine is not None and (learned is None or learned.base == "gap_cores"):  # (gap floods: the hand step's)
        check_gap_box(refine, info.fov_zyx)
    # the image's spec, parsed once (rank 0 opens it; every rank gets the same ImageSource)
    source = comm.on_root(lambda: image_source(image_spec, bbox))
    with contextlib.ExitStack() as stack:  # the kernel launcher, opened on every rank or on none
        comm.collective(lambda: stack.enter_context(kernels.launcher(cfg.kernels)))
        return _plan_and_run(source, out_spec, block, halo, workdir, info, net, cfg, overwrite, rule,
                             comm, inflight, progress, refine, started, learned)


def _plan_and_run(source: ImageSource, out_spec, block, halo, workdir, info, net, cfg: InferenceConfig, overwrite,
                  rule: MergeRule, comm: mpi.Comm, inflight, progress, refine: RefineConfig | None,
                  started: float, learned=None) -> BlocksResult:
    """Phases 1 to 4 of :func:`segment_blocks` (under the kernel launcher of ``cfg``)."""
    # phase 1: plan (the image's digest read over all ranks, slab by slab)
    run_id = uuid.uuid4().hex[:12]
    parts = comm.gather(comm.collective(lambda: source.slab_digests(comm.rank, comm.size)), root=0)
    plan, source = comm.on_root(lambda: make_plan(source, out_spec, block, halo, workdir, info, info.source, cfg,
                                                  overwrite, rule, run_id, comm.size,
                                                  learned_mod.refine_record(refine, learned),
                                                  image_digest=combine_digests(parts)))
    if plan.complete:
        return _already_complete(plan, comm)
    # any failure from here on: rank 0 gives back what it holds (locks, temporaries; the blocks stay)
    with comm.releasing(lambda: release(plan)) if comm.is_root else contextlib.nullcontext():
        return _run(plan, source, started, net, info, cfg, comm, inflight, progress, refine, learned)


def _run(plan: Plan, source: ImageSource, started: float, net, info, cfg: InferenceConfig, comm: mpi.Comm,
         inflight: int | None, progress: bool, refine: RefineConfig | None, learned=None) -> BlocksResult:
    """Phases 2 to 4 of :func:`segment_blocks`."""
    if comm.is_root:
        log.info("%d blocks (grid %s, block %s, halo %s; halo overhead %.0f%%), %d already done, %d rank(s)",
                 len(plan.grid), fmt_zyx(plan.grid.grid_shape), fmt_zyx(plan.grid.block), fmt_zyx(plan.grid.halo),
                 100 * plan.grid.halo_overhead(), plan.n_done, comm.size)
    plan_s = time.perf_counter() - started

    # phase 2: blocks
    with comm.abort_on_error("block inference"):
        stats = worker.run_blocks(plan, source, net, info, cfg, comm, inflight, progress)
    idle_from = time.perf_counter()
    comm.wait_all()
    blocks_end = time.perf_counter()

    # phase 3: reconcile
    timings = {"plan_s": plan_s, "blocks_s": blocks_end - plan_s - started}
    reconciled, final, match_end = _reconcile(plan, source, cfg, info, comm, stats, blocks_end - idle_from,
                                              blocks_end, timings)

    # phase 3b: refine
    layers = output.Layers(final) if comm.is_root else None
    if refine is not None:
        refine_from = time.perf_counter()
        with comm.abort_on_error("refinement"):
            if learned is not None:
                refined = learned_mod.learned_blocks(plan, source, reconciled, final, refine, learned, info, cfg,
                                                     comm, net, inflight)
            else:
                refined = refine_mod.refine_blocks(plan, source, reconciled, final, refine, net, info, cfg, comm,
                                                   inflight)
        if comm.is_root:
            layers = _refined_layers(plan, reconciled, final, refined, refine, learned)
            reconciled.timings["refine_s"] = time.perf_counter() - refine_from

    # phase 4: write
    result = _write(plan, reconciled, layers, comm, match_end)
    result.timings["total_s"] = time.perf_counter() - started
    return result


def _already_complete(plan: Plan, comm: mpi.Comm) -> BlocksResult:
    if comm.is_root:
        log.info("%s is already complete (blocks in %s); nothing to do", plan.out_path, plan.workdir)
        tidy(plan)
    comm.wait_all()
    n = len(plan.grid)
    return BlocksResult(plan.out_path, plan.workdir, n_blocks=n, blocks_skipped=n, ranks=comm.size,
                        already_complete=True)


def _reconcile(plan: Plan, source: ImageSource, cfg: InferenceConfig, info, comm: mpi.Comm, stats: RankStats, idle_s: float,
               blocks_end: float, timings: dict[str, float]) -> tuple[Reconciled | None, FinalLabels | None, float]:
    """Phase 3: the reconciled blocks and the labels to write (on rank 0; None elsewhere) and
    when matching ended."""
    with comm.abort_on_error("reconciliation"):
        missing = [b.index for b in plan.grid if not plan.block_path(b).exists()] if comm.is_root else []
        if missing:
            raise BlockError(f"{len(missing)} block result(s) missing after all ranks finished "
                             f"(first: {plan.block_path(plan.grid[missing[0]])})")
        mine = labels.match_my_pairs(plan, comm, stats, idle_s)
    results = comm.gather(mine, root=0)
    match_end = time.perf_counter()

    reconciled, final = None, None
    if comm.is_root:
        with comm.abort_on_error("reconciliation"):
            reconciled = labels.reconcile(plan, source, results, cfg, info, comm.size,
                                          dict(timings, match_s=match_end - blocks_end))
    if cfg.split_components:
        split_from = time.perf_counter()
        with comm.abort_on_error("splitting components"):
            final = labels.split_components(plan, reconciled, comm, int(cfg.dust_size))
        if comm.is_root:
            reconciled.timings["split_s"] = time.perf_counter() - split_from
    elif comm.is_root:
        final = labels.final_labels(plan, reconciled)
    return reconciled, final, match_end


def _refined_layers(plan: Plan, reconciled: Reconciled, final: FinalLabels, refined: refine_mod.RefinedBlocks,
                    refine: RefineConfig, learned=None) -> output.Layers:
    """Rank 0: ``<ds>`` from the refined tiles, ``<ds>_forward`` the flood, ``<ds>_overlaps``."""
    # n_objects: the largest id (rejoined ids are gone, so ids are not 1..N), which sets the dtype
    values = refined.values if refined.values is not None else refined.keys  # (learned: through its merges)
    main = FinalLabels(refined.max_id, refined.keys, values, refined.origins, final.n_merges,
                       comp_dir=refined.comp_dir)
    reconciled.counters.update({f"refine_{k}": v for k, v in refined.counters.items()})
    # the refined result's objects (ids are not 1..N once rejoined ids are gone)
    reconciled.counters["refine_objects"] = int(np.unique(np.concatenate([np.asarray(k, np.uint64)
                                                                          for k in values] or [[]])).size)
    reconciled.counters["flood_objects"] = int(final.n_objects)
    reconciled.attrs.counters = reconciled.counters
    reconciled.attrs.refine = refine.to_dict()
    if learned is not None:  # which model decided, and what it was trained on (as in memory)
        reconciled.attrs.refine["learned"] = learned.describe()
    return output.Layers(main, {f"{plan.out_ds}_forward": final}, {f"{plan.out_ds}_overlaps": refined.overlaps})


def _write(plan: Plan, reconciled: Reconciled | None, layers: output.Layers | None, comm: mpi.Comm,
           match_end: float) -> BlocksResult:
    """Phase 4: rank 0 creates the output (and with one rank fills it), every rank writes its
    blocks' cores (several ranks), rank 0 renames it into place; the summary on every rank."""
    parallel = comm.size > 1
    tasks = None
    if comm.is_root:
        with comm.abort_on_error("writing the output"):
            create_from = time.perf_counter()
            with output.discard_on_error(plan), disk.disk_errors(plan.out_path):
                target = output.create(plan, layers, reconciled.attrs, parallel)
            reconciled.timings["create_output_s"] = time.perf_counter() - create_from
            if parallel:
                tasks = output.write_tasks(plan, layers, target, comm.size)
    if parallel:
        comm.wait_all()  # sleep while rank 0 reconciles
        task = comm.scatter(tasks, root=0)
        write_from = time.perf_counter()
        with comm.abort_on_error("writing the output"):
            with output.discard_on_error(plan), disk.disk_errors(plan.out_path):
                nbytes = output.write_cores(plan, task)
        written = comm.gather((time.perf_counter() - write_from, nbytes), root=0)
        if comm.is_root:
            reconciled.timings["parallel_write_s_max"] = max(seconds for seconds, _ in written)
            reconciled.timings["parallel_write_bytes"] = sum(size for _, size in written)
    summary = None
    if comm.is_root:
        with comm.abort_on_error("writing the output"), output.discard_on_error(plan):
            summary = _finish(plan, reconciled, layers.main, match_end)
    comm.wait_all()
    return comm.bcast(summary, root=0)


def _finish(plan: Plan, reconciled: Reconciled, final: FinalLabels, match_end: float) -> BlocksResult:
    """Rank 0: the output goes live (rename), the report is written, the workdir tidied."""
    output.commit(plan)
    timings = reconciled.timings
    timings["write_s"] = time.perf_counter() - match_end - timings["gather_s"] - timings["union_find_s"]
    n = len(plan.grid)
    blocks_run = sum(s.blocks for s in reconciled.rank_stats)
    objects = int(reconciled.counters.get("refine_objects", final.n_objects))  # refined: the refined result's
    result = BlocksResult(plan.out_path, plan.workdir, n_objects=objects, n_blocks=n, blocks_run=blocks_run,
                          blocks_skipped=plan.n_done, n_pairs=len(plan.grid.pairs()), n_merges=final.n_merges,
                          ranks=reconciled.ranks, counters=reconciled.counters, timings=timings)
    write_report(plan, {
        "n_blocks": n, "grid": list(plan.grid.grid_shape), "block": list(plan.grid.block),
        "halo": list(plan.grid.halo), "halo_overhead": plan.grid.halo_overhead(), "n_pairs": result.n_pairs,
        "candidate_pairs": reconciled.candidates, "merges": final.n_merges, "objects": objects,
        "merge_rule": plan.rule.to_dict(), "ranks": reconciled.ranks, "blocks_run": blocks_run,
        "blocks_skipped": plan.n_done, "writer": "all ranks" if reconciled.ranks > 1 else "rank 0",
        "timings": timings, "per_rank": [dataclasses.asdict(s) for s in reconciled.rank_stats]})
    tidy(plan)
    flood = f" (the flood: {int(reconciled.counters['flood_objects'])})" if "flood_objects" in reconciled.counters \
        else ""
    log.info("wrote %s: %d objects%s from %d blocks (%d run now, %d reused), %d merges over %d block pairs",
             plan.out_path, objects, flood, n, blocks_run, plan.n_done, final.n_merges, result.n_pairs)
    return result
