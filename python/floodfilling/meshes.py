"""Meshes, skeletons and segment properties of an exported segmentation layer
(``ffn export SEG DEST --meshes --skeletons``; ``pip install 'floodfilling[meshes]'``).

The work is igneous' (``igneous-pipeline``: zmesh marching cubes and kimimaro TEASAR skeletons
under it): its tasks are put on a task-queue ``FileQueue`` (a directory of task files with
leases) and run by workers that take one task at a time until the queue is empty. Stages, each
waiting for the one before::

    mesh            igneous MeshTask: mesh fragments of every object in each block of mesh_shape
    mesh-merge      MultiResUnshardedMeshMergeTask: one multi-resolution (draco, mesh_lods
                    levels of detail) mesh per object: neuroglancer_multilod_draco
    skeleton        SkeletonTask: kimimaro skeleton fragments per block (TEASAR parameters below)
    skeleton-merge  UnshardedSkeletonMergeTask: one skeleton per object (dust and ticks removed)

Segment properties (each object's voxel count, ``segment_properties/info``) come from the
export's level-0 pass (:func:`write_segment_properties`); the layer's ``info`` points at the
mesh, skeleton and property directories, so neuroglancer shows all three.

Parallel and resumable (:func:`run_stages`): the work directory (``DEST.partial`` beside the
layer) holds the layer being built, the queue and ``export.json`` (the request and the stages
done). ``parallel`` workers run on this machine (processes; 1: in this process); other nodes
join through the queue on a shared file system (:func:`join`: ``ffn export SEG DEST ... --join``
there, the same path on every node). A killed export, rerun with the same arguments, takes the
stages up where they were: the tasks of a stage that finished are gone from the queue and are
not redone; a task that was running when the process was killed is run again (its lease is
released on resume). Leases expire after ``LEASE_S`` seconds, so a node that dies mid-task
does not hold its task for ever.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from . import disk

log = logging.getLogger(__name__)

LEASE_S = 600  # seconds a worker holds a task before another may take it
STAGES = ("mesh", "mesh-merge", "skeleton", "skeleton-merge")
MANIFEST = "export.json"


class MeshError(ValueError):
    """Bad input to meshing / skeletonising (one line naming the culprit)."""


@dataclass(frozen=True)
class MeshOptions:
    """What to build beside the segmentation layer, and how (defaults: igneous' for data of a few nm)."""

    meshes: bool = False  # multi-resolution meshes
    skeletons: bool = False  # skeletons
    mesh_shape: tuple[int, int, int] = (256, 256, 256)  # voxels (x, y, z) per mesh task
    mesh_lods: int = 3  # levels of detail of each multi-resolution mesh
    simplification_error_nm: float = 40.0  # largest distance a simplified mesh vertex moves (nm)
    skeleton_shape: tuple[int, int, int] = (512, 512, 512)  # voxels (x, y, z) per skeleton task
    teasar_scale: float = 4.0  # TEASAR: invalidation radius = scale * distance to boundary + const
    teasar_const_nm: float = 500.0  # TEASAR constant (nm)
    skeleton_dust: int = 1000  # objects with fewer voxels get no skeleton
    tick_threshold_nm: float = 1500.0  # skeleton branches shorter than this (nm) are removed

    def stages(self) -> list[str]:
        return [s for s in STAGES if (self.meshes and s.startswith("mesh")) or (self.skeletons and s.startswith("skel"))]


def _imports():
    try:
        import igneous.task_creation as tc
        from taskqueue import TaskQueue
    except ImportError:
        raise MeshError("meshes and skeletons need the optional package igneous-pipeline: install "
                        "floodfilling[meshes] (pip install 'floodfilling[meshes]')") from None
    return tc, TaskQueue


def check_available() -> None:
    """A :class:`MeshError` naming the extra when igneous is not installed."""
    _imports()


def merge_magnitude(n_objects: int) -> int:
    """igneous' merge magnitude m (10^m - 1 merge tasks, by id prefix): about 100 objects a task, 9 to 999 tasks."""
    return int(min(3, max(1, len(str(max(int(n_objects), 1))) - 2)))


# ---- segment properties ------------------------------------------------------------------------


def segment_properties(ids: np.ndarray, voxels: np.ndarray) -> dict[str, Any]:
    """neuroglancer's ``neuroglancer_segment_properties`` (inline) with each object's voxel count."""
    ids = np.asarray(ids, np.uint64)
    voxels = np.asarray(voxels, np.int64)
    dt = "uint32" if voxels.size == 0 or voxels.max() < 2**32 else "float32"
    return {"@type": "neuroglancer_segment_properties",
            "inline": {"ids": [str(int(i)) for i in ids],
                       "properties": [{"id": "voxels", "type": "number", "data_type": dt,
                                       "description": "voxels of the object at full resolution",
                                       "values": [int(v) for v in voxels]}]}}


def write_segment_properties(layer_dir: str, ids: np.ndarray, voxels: np.ndarray) -> None:
    """``layer_dir/segment_properties/info`` and the layer info's pointer to it."""
    os.makedirs(os.path.join(layer_dir, "segment_properties"), exist_ok=True)
    disk.atomic_write_bytes(os.path.join(layer_dir, "segment_properties", "info"),
                            json.dumps(segment_properties(ids, voxels)).encode())
    _update_info(layer_dir, {"segment_properties": "segment_properties"})


def _update_info(layer_dir: str, entries: dict) -> None:
    path = os.path.join(layer_dir, "info")
    with open(path) as f:
        info = json.load(f)
    info.update(entries)
    disk.atomic_write_bytes(path, json.dumps(info).encode())


class VoxelCounter:
    """Voxel count of every non-zero id over the tiles given to :meth:`add` (memory: the objects)."""

    def __init__(self):
        self.ids = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)

    def add(self, tile: np.ndarray) -> None:
        u, c = np.unique(tile, return_counts=True)
        keep = u != 0
        u, c = u[keep].astype(np.uint64), c[keep].astype(np.int64)
        allu, inv = np.unique(np.concatenate([self.ids, u]), return_inverse=True)
        n = np.zeros(len(allu), np.int64)
        np.add.at(n, inv, np.concatenate([self.counts, c]))
        self.ids, self.counts = allu, n


# ---- the work directory: manifest and queue ----------------------------------------------------


@dataclass
class WorkState:
    """``export.json`` of a work directory: the request it builds and how far it got."""

    request: dict  # what the export was asked (input identity, options): a rerun resumes only the same
    layer_done: bool = False  # the segmentation layer (all levels) is written
    objects: int = 0  # non-zero ids in the segmentation
    enqueued: list | None = None  # stages whose tasks are all in the queue
    done: list | None = None  # stages finished

    def __post_init__(self):
        self.enqueued = list(self.enqueued or [])
        self.done = list(self.done or [])


def read_state(work: str) -> WorkState | None:
    try:
        with open(os.path.join(work, MANIFEST)) as f:
            return WorkState(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def write_state(work: str, st: WorkState) -> None:
    disk.atomic_write_bytes(os.path.join(work, MANIFEST), json.dumps(asdict(st), indent=1).encode())


def queue_dir(work: str) -> str:
    return os.path.join(work, "queue")


def _tasks(stage: str, url: str, opts: MeshOptions, objects: int):
    tc, _ = _imports()
    m = merge_magnitude(objects)
    if stage == "mesh":
        return tc.create_meshing_tasks(url, mip=0, shape=opts.mesh_shape, sharded=False, spatial_index=True,
                                       compress=False, max_simplification_error=opts.simplification_error_nm,
                                       mesh_dir="mesh")
    if stage == "mesh-merge":
        return tc.create_unsharded_multires_mesh_tasks(url, num_lod=opts.mesh_lods, magnitude=m, mesh_dir="mesh")
    if stage == "skeleton":
        return tc.create_skeletonizing_tasks(
            url, mip=0, shape=opts.skeleton_shape, sharded=False, spatial_index=True,
            teasar_params={"scale": opts.teasar_scale, "const": opts.teasar_const_nm},
            dust_threshold=opts.skeleton_dust)
    if stage == "skeleton-merge":
        return tc.create_unsharded_skeleton_merge_tasks(url, magnitude=m, dust_threshold=opts.skeleton_dust,
                                                        tick_threshold=opts.tick_threshold_nm)
    raise MeshError(f"stage={stage!r}: expected one of {', '.join(STAGES)}")


def _queue(work: str):
    _, TaskQueue = _imports()
    return TaskQueue("fq://" + queue_dir(work), progress=False)


# ---- workers -----------------------------------------------------------------------------------


def work_queue(qdir: str, lease_s: int = LEASE_S, stop: Callable[[], bool] | None = None,
               on_task: Callable[[], None] | None = None) -> int:
    """Runs tasks of the FileQueue ``qdir`` one at a time until it is empty (or ``stop()``);
    returns how many it ran. A task leased by another worker is waited for (it may be
    given back when its lease expires)."""
    _, TaskQueue = _imports()
    from taskqueue import QueueEmptyError

    tq = TaskQueue("fq://" + qdir, progress=False)
    n = 0
    while not tq.is_empty() and not (stop and stop()):
        try:
            task = tq.lease(seconds=int(lease_s))
        except QueueEmptyError:
            time.sleep(0.5)  # only leased tasks left: another worker runs them
            continue
        task.execute()
        tq.delete(task, tally=True)
        n += 1
        if on_task:
            on_task()
    return n


def _worker_process(qdir: str, lease_s: int, parent: int) -> int:
    """One worker process of :func:`run_queue`: stops when the queue is empty or its parent is gone."""
    logging.basicConfig(level=logging.WARNING)
    return work_queue(qdir, lease_s, stop=lambda: os.getppid() != parent)


def run_queue(qdir: str, parallel: int, total: int, desc: str, progress: bool = True,
              lease_s: int = LEASE_S, wait_empty: bool = True) -> None:
    """Runs the queue ``qdir`` to its end with ``parallel`` workers here (1: this process; 0:
    none, other nodes do the work) and a progress bar of its ``total`` tasks; ``wait_empty``:
    then waits for the tasks other workers still hold (the planner; a joiner goes back to
    :func:`join`, where the planner may have queued the next stage)."""
    from tqdm import tqdm

    _, TaskQueue = _imports()
    tq = TaskQueue("fq://" + qdir, progress=False)
    bar = tqdm(total=total, desc=desc, unit="task", disable=not progress, initial=min(total, tq.completed))

    def tick():
        bar.n = min(total, tq.completed)
        bar.refresh()

    try:
        if parallel == 1:
            work_queue(qdir, lease_s, on_task=tick)
        elif parallel == 0:
            pass  # the wait below
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

            with ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_worker_process, qdir, lease_s, os.getpid()) for _ in range(parallel)]
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    tick()
                    for f in done:
                        f.result()  # a worker's error ends the export with it
        # a worker may stop while another (here or on another node) still runs the last task
        while wait_empty and not tq.is_empty():
            time.sleep(0.5)
            tick()
        tick()
    finally:
        bar.close()


def run_stages(work: str, url: str, st: WorkState, opts: MeshOptions, parallel: int,
               progress: bool = True) -> None:
    """The stages of ``opts`` on the layer at ``url``, from where ``st`` says they are (resume)."""
    for stage in opts.stages():
        if stage in st.done:
            continue
        tq = _queue(work)
        if stage not in st.enqueued:
            tq.purge()  # tasks of a stage whose enqueueing was cut short, or none
            n = tq.insert(_tasks(stage, url, opts, st.objects))  # counted in tq.inserted
            st.enqueued.append(stage)
            write_state(work, st)
            log.info("%s: %d tasks", stage, n)
        else:
            tq.release_all()  # tasks that a killed run had leased
            log.info("%s: resuming, %d of %d tasks left", stage, tq.enqueued, tq.inserted)
        run_queue(queue_dir(work), parallel, int(tq.inserted), stage, progress)
        st.done.append(stage)
        write_state(work, st)


def join(work: str, dest: str, request: dict, parallel: int, progress: bool = True, poll_s: float = 1.0,
         wait_s: float = 600.0) -> None:
    """Works on the export building in ``work`` (another node's, same ``request``) until it is
    finished (``work`` gone, ``dest`` there); waits up to ``wait_s`` seconds for it to start."""
    t0 = time.monotonic()
    seen = False
    while True:
        st = read_state(work)
        if st is None:
            if seen or (os.path.isdir(dest) and not os.path.exists(work)):
                if seen and os.path.isdir(work):  # only queue directories re-created by opening the queue late
                    shutil.rmtree(work, ignore_errors=True)
                return  # finished: the layer was renamed onto dest, the work directory removed
            if time.monotonic() - t0 > wait_s:
                raise MeshError(f"{work}: no export to join (none started within {wait_s:.0f} s)")
            time.sleep(poll_s)
            continue
        if st.request != request:
            raise MeshError(f"{work}: the export there was started with other arguments; join it with the same ones")
        seen = True
        open_stages = [s for s in st.enqueued if s not in st.done]
        if open_stages:
            try:
                tq = _queue(work)
                run_queue(queue_dir(work), max(parallel, 1), int(tq.inserted), open_stages[0] + " (joined)",
                          progress, wait_empty=False)
            except OSError:
                if read_state(work) is not None:
                    raise
                # the planner finished and removed the work directory under us; the queue's
                # directories that opening it re-created are removed
                shutil.rmtree(work, ignore_errors=True)
                return
        time.sleep(poll_s)
