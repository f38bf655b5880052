"""Phase 2 of block inference, on every rank: claim blocks and run them through the engine.

A rank takes the next block nobody claimed through the workdir's bookkeeper
(:mod:`.bookkeeper`: its claim file ``DIR/claims/<name>`` created complete and exclusively, a
hard link, atomic on POSIX file systems, Lustre and GPFS included), so a slow block never idles
other ranks and no scheduler is needed. Each rank keeps ``inflight`` blocks active in the
multi-canvas engine; a finished block is written to its result file (:mod:`.blockstore`). A
block whose file exists is done and skipped; claims of a previous (killed) run were removed by
the plan.

The host work of a block (read, normalise, seeds) runs ahead in ``prefetch`` background
threads (:mod:`.prefetch`; option ``prefetch``, by default 4 on cuda/xpu and 0 on cpu) while
the engine drives the device: a block is claimed, then prepared, then handed to the engine
when a slot frees. The time the engine waited for a prepared block is ``host_wait_seconds``
of the rank's stats (``per_rank`` in ``reconcile.json``).

Block results depend only on the block (its image, the global normalisation, the model and
options), never on the rank that ran it or on ``inflight``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..config import InferenceConfig
from ..model import select_device
from ..source import ImageSource
from . import blockstore, mpi
from ..geometry import Block
from .prefetch import Prefetch
from .workdir import Plan

log = logging.getLogger(__name__)


@dataclass
class RankStats:
    """What one rank did in phase 2 (``per_rank`` in ``reconcile.json``)."""

    blocks: int = 0
    steps: int = 0
    seconds: float = 0.0
    voxels: int = 0
    host_wait_seconds: float = 0.0  # the engine waiting for a block to be read, normalised and seeded
    prepare_seconds: float = 0.0  # reading, normalising and seeding blocks (summed over prefetch threads)


class BlockTicket:
    """One engine job: the block it got (None: nothing was left to claim) and when it started."""

    __slots__ = ("block", "started")

    def __init__(self):
        self.block: Block | None = None
        self.started = 0.0


class _ProgressBar:
    """Rank 0's bar over all blocks; every 10 s it counts the result files (other ranks' too)."""

    def __init__(self, plan: Plan, size: int):
        from tqdm.auto import tqdm

        self.blocks_dir = plan.blocks_dir
        self.bar = tqdm(total=len(plan.grid), initial=plan.n_done, unit="block",
                        desc=f"segment ({size} rank{'s' if size > 1 else ''})", dynamic_ncols=True)
        self.last_sync = time.monotonic()

    def advance(self) -> None:
        if time.monotonic() - self.last_sync > 10:  # other ranks' blocks too
            self.bar.n = blockstore.count_results(self.blocks_dir)
            self.last_sync = time.monotonic()
            self.bar.refresh()
        else:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _rank_device_threads(cfg: InferenceConfig, comm: mpi.Comm) -> tuple[str, int]:
    dev = select_device(cfg.device)
    device = str(cfg.device)
    if comm.local_size > 1 and dev.type in ("cuda", "xpu") and dev.index is None:
        import torch

        count = torch.cuda.device_count() if dev.type == "cuda" else torch.xpu.device_count()
        device = f"{dev.type}:{comm.local_rank % max(count, 1)}"
    threads = int(cfg.threads)
    if threads == 0 and comm.local_size > 1 and dev.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // comm.local_size)
    return device, threads


def prefetch_on(device, prefetch: int | None = None) -> int:
    """Blocks prepared ahead on ``device`` (a torch.device): ``prefetch``, by default 0 on a CPU
    (the network is the host's work there) and 4 elsewhere (a block's host work took ~0.4-0.8 us
    per voxel on one core of this project's CPU: 1.2-2.4 cores keep a 3 M voxels/s device fed)."""
    if prefetch is not None:
        return int(prefetch)
    return 0 if device.type == "cpu" else 4


def run_blocks(plan: Plan, source: ImageSource, net, info, cfg: InferenceConfig, comm: mpi.Comm, inflight: int | None,
               progress: bool) -> RankStats:
    """Segments blocks until none is left to claim; this rank's stats."""
    from ..inference.engine import Job, inflight_on, make_predictor, run_jobs, subvolume_canvas, subvolume_seeds
    from ..results import origins_table, overlaps_table

    grid = plan.grid
    n = len(grid)
    device, threads = _rank_device_threads(cfg, comm)
    if threads > 0:
        kernels.set_num_threads(threads)
    dev = select_device(device)
    n_inflight = inflight_on(dev, inflight)
    predictor = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=dev, threads=threads,
                               inflight=n_inflight)
    n_prefetch = prefetch_on(dev, cfg.prefetch)
    log.info("rank %d/%d: device %s, %d thread(s), %d block(s) in flight, %d prepared ahead", comm.rank, comm.size,
             device, threads, n_inflight, n_prefetch)
    host = socket.gethostname()
    claimer = plan.blocks_stage().claimer(plan.run_id, comm.rank, comm.size)

    def claim() -> Block | None:  # the next unfinished block nobody claimed (bookkeeper)
        i = claimer.next()
        return None if i is None else grid[i]
    stats = RankStats()

    reader = source.reader("block")
    bar = _ProgressBar(plan, comm.size) if progress and comm.is_root else None

    def prepare(b: Block) -> tuple[np.ndarray, np.ndarray]:  # host work only (a prefetch thread)
        image = reader(b.outer_start, b.outer_stop)
        sd = subvolume_seeds(image, cfg, info, source.resolution_zyx_nm or (1, 1, 1))
        log.debug("rank %d: block %d %s: %d seeds", comm.rank, b.index, source.window(b.outer_start, b.outer_stop),
                  len(sd))
        return image, sd

    prefetch = Prefetch(claim, prepare, n_prefetch, name=f"ffn-prefetch-r{comm.rank}")

    def make(ticket: BlockTicket):
        started = time.perf_counter()
        got = prefetch.next()
        if got is None:  # nothing left: an empty canvas finishes at once
            return subvolume_canvas(predictor, np.zeros(info.fov_zyx, np.float32), cfg, info,
                                    seeds=np.zeros((0, 3), np.int64))
        ticket.block, ticket.started = got[0], started
        image, sd = got[1]
        return subvolume_canvas(predictor, image, cfg, info, seeds=sd)

    def on_done(ticket: BlockTicket, cv) -> None:
        b = ticket.block
        if b is None:
            return
        seg = cv.final_segmentation()
        secs = time.perf_counter() - ticket.started
        counters = {key: float(v) for key, v in cv.state.counters.items()}
        blockstore.write_block(plan.block_path(b), b, plan.box.start, seg, origins_table(cv.state.origins),
                               cv.state.max_id, counters, secs, plan.digest, comm.rank, host,
                               overlaps_table(cv.state.overlaps))
        stats.blocks += 1
        stats.steps += int(counters.get("steps", 0))
        stats.seconds += secs
        stats.voxels += b.outer_voxels
        log.info("rank %d: block %d/%d %s: %d objects, %d steps, %.1f s", comm.rank, b.index + 1, n,
                 b.name(plan.box.start), int(counters.get("objects", 0)), int(counters.get("steps", 0)), secs)
        if bar is not None:
            bar.advance()

    tickets = [BlockTicket() for _ in range(n - plan.n_done)]
    try:
        run_jobs([Job(ticket, (lambda ticket=ticket: make(ticket))) for ticket in tickets], predictor,
                 inflight=n_inflight, on_done=on_done)
    finally:
        prefetch.close()  # before the volume: a running preparation still reads it
        reader.close()
        if bar is not None:
            bar.close()
    stats.host_wait_seconds, stats.prepare_seconds = prefetch.wait_seconds, prefetch.prepare_seconds
    log.info("rank %d: waited %.2f s for blocks to be prepared (%.2f s of preparation, %d ahead)", comm.rank,
             prefetch.wait_seconds, prefetch.prepare_seconds, n_prefetch)
    return stats
