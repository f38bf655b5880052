"""The output of block inference: which blocks' cores go where, written through the one result
writer (:class:`floodfilling.results.ResultWriter`, which owns the file format).

HDF5 (``out.h5:ds``) and zarr (``out.zarr/ds``) alike: the result is built at its temporary place
(``OUT.tmp-<run id>``, the hidden ``.ds.tmp-<run id>`` of the group) and :func:`commit` (rank 0)
makes it the output at the very end, so nothing half-written is ever at ``OUT``. One rank:
:func:`create` fills it (HDF5 chunked, gzip). Several ranks: :func:`create` allocates it
(HDF5 contiguous, uncompressed) and every rank writes the cores of its blocks into it
(:func:`write_cores`, :func:`floodfilling.results.write_region`: HDF5 ``pwrite`` at the
volume's byte offset, no parallel HDF5 needed; zarr chunks divide the block shape,
:func:`zarr_chunks_for`, so ranks never share one).

With ``--refine`` the output holds two segmentations (:class:`Layers`): ``<ds>`` (refined)
and ``<ds>_forward`` (the reconciled flood), and the tables ``<ds>_origins`` and
``<ds>_overlaps``.

An error while writing (no space left, say) removes the temporary output and releases the
output's lock (:func:`discard_on_error`); the blocks stay in the workdir for the rerun.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .. import disk, locks, volumes
from ..results import ResultAttrs, ResultTarget, ResultWriter, write_region
from . import blockstore, split
from .reconcile import relabel_core

if TYPE_CHECKING:  # no import at run time: workdir imports this module
    from .labels import FinalLabels
    from .workdir import Plan


@dataclass
class Layers:
    """What the output is written from: ``<ds>`` from ``main`` (its origins table is
    ``<ds>_origins``), further segmentations of the box (``<ds>_forward`` of a refined run) and
    tables (``<ds>_overlaps``) by dataset name."""

    main: "FinalLabels"
    extra: dict[str, "FinalLabels"] = field(default_factory=dict)
    tables: dict[str, np.ndarray] = field(default_factory=dict)

    def segmentations(self, ds: str) -> dict[str, "FinalLabels"]:
        return {ds: self.main, **self.extra}


@dataclass
class WriteTask:
    """One rank's share of a parallel write of one segmentation ``name``: the cores of
    ``blocks`` (block index, core ids, output ids), relabelled, into the result being built."""

    target: ResultTarget  # where (the temporary output)
    dtype: np.dtype
    blocks: list[tuple[int, np.ndarray, np.ndarray]]
    comp_dir: Path | None = None  # split_components / refine: cores come from the volumes stored here
    name: str = ""  # the dataset


def zarr_chunks_for(block) -> tuple[int, ...]:
    """Zarr chunk shape for block output: per axis the largest divisor of the block size that
    is <= 64, or the block size itself when that divisor would be < 16 (a prime block size,
    say). Dividing the block size makes every chunk lie inside one block's core."""
    out = []
    for b in block:
        b = int(b)
        c = max(d for d in range(1, min(b, 64) + 1) if b % d == 0)
        out.append(c if c >= 16 or c == b else b)
    return tuple(out)


def writer(plan: Plan, parallel: bool = False) -> ResultWriter:
    """The result writer of the plan's output (its temporaries are named by the run id)."""
    chunks = zarr_chunks_for(plan.grid.block) if plan.out_kind == "zarr" else None
    return ResultWriter(plan.out_path, plan.out_ds, plan.out_names, plan.run_id, parallel=parallel, chunks=chunks)


def tmp_output(plan: Plan, name: str | None = None) -> Path:
    """HDF5: the temporary output file. Zarr: the hidden array (of ``name``, default the plan's
    dataset) in the output group."""
    return writer(plan).tmp_path(name)


def recorded_digest(plan: Plan) -> str | None:
    """The ``block_manifest`` attribute of an existing output (None: absent, not ours, unreadable)."""
    try:
        if plan.out_kind == "zarr":
            zarr = volumes.import_zarr()
            value = zarr.open_array(os.path.join(plan.out_path, plan.out_ds), mode="r").attrs.get("block_manifest")
        else:
            import h5py

            with h5py.File(plan.out_path, "r") as f:
                value = f[plan.out_ds].attrs.get("block_manifest")
        return value.decode() if isinstance(value, bytes) else (str(value) if value is not None else None)
    except Exception:  # noqa: BLE001 - not ours / unreadable: treated as foreign
        return None


@contextlib.contextmanager
def discard_on_error(plan: Plan) -> Iterator[None]:
    """On an error while writing the output (no space left, say): the temporary output is
    removed and the output's lock released, on the rank that raised (rank 0 holds the lock);
    the blocks stay in the workdir for the rerun."""
    try:
        yield
    except BaseException:
        discard(plan)
        raise


def discard(plan: Plan) -> None:
    """The temporary output goes and the output's lock is released (this process's)."""
    writer(plan).discard()
    if plan.lock is not None:
        locks.release(plan.lock)


def _cores(plan: Plan, blocks, dtype, comp_dir: Path | None = None):
    """(slices into the output, relabelled core) of each ``(block, keys, values)``; the core is
    the block result's, or with ``comp_dir`` its component volume (split_components)."""
    for k, keys, values in blocks:
        b = plan.grid[k]
        if comp_dir is not None:
            src = split.read_components(plan.layout.per_block(comp_dir, b))
        else:
            src = blockstore.read_region(plan.block_path(b), b.core_start, b.core_stop)
        yield tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop)), relabel_core(src, keys, values,
                                                                                           np.dtype(dtype))


def create(plan: Plan, layers: Layers, attrs: ResultAttrs, parallel: bool) -> ResultTarget:
    """Rank 0: the output at its temporary place: the segmentations with their attributes,
    ``<ds>_origins`` and the tables. One writer: it fills the segmentations too. Parallel: they
    are left for every rank's :func:`write_cores`. Returns where the ranks write."""
    w = writer(plan, parallel)
    segs = layers.segmentations(plan.out_ds)
    a = attrs.to_dict()
    target = w.create({name: (plan.box.shape, final.dtype) for name, final in segs.items()},
                      {name: a for name in segs}, {f"{plan.out_ds}_origins": layers.main.origins, **layers.tables})
    if not parallel:
        space = disk.SpaceCheck(plan.out_path)
        for name, final in segs.items():
            _write_task(plan, WriteTask(target, final.dtype, final.blocks(range(len(plan.grid))), final.comp_dir,
                                        name), sync=False, space=space)
    return target


def write_tasks(plan: Plan, layers: Layers, target: ResultTarget, ranks: int) -> list[list[WriteTask]]:
    """Rank r writes blocks r, r + ranks, ... (as it matched their pairs) of every segmentation."""
    n = len(plan.grid)
    return [[WriteTask(target, final.dtype, final.blocks(range(r, n, ranks)), final.comp_dir, name)
             for name, final in layers.segmentations(plan.out_ds).items()] for r in range(ranks)]


def write_cores(plan: Plan, tasks: list[WriteTask]) -> int:
    """Every rank (parallel write): its blocks' cores into the temporary output; the bytes written."""
    return sum(_write_task(plan, task, sync=True) for task in tasks)


def _write_task(plan: Plan, task: WriteTask, sync: bool, space: disk.SpaceCheck | None = None) -> int:
    written = 0
    for sl, core in _cores(plan, task.blocks, task.dtype, task.comp_dir):
        written += write_region(task.target, task.name, sl, core, space)
    if sync and task.target.kind == "hdf5":  # this rank's writes on disk before rank 0 commits
        disk.fsync_file(task.target.path)
    return written


def commit(plan: Plan) -> None:
    """Rank 0, at the very end: the output goes live and its lock is released."""
    writer(plan).commit()
    if plan.lock is not None:
        locks.release(plan.lock)
