"""The output of block inference: the segmentation ``<ds>`` and its origins table ``<ds>_origins``.

HDF5 (``out.h5:ds``): always written into a temporary file ``OUT.tmp-<run id>`` that
:func:`commit` (rank 0) renames onto ``OUT`` at the very end, so nothing half-written is ever at
``OUT``. One rank: :func:`create` writes a chunked, gzip-compressed dataset. Several ranks:
:func:`create` allocates the dataset contiguous and uncompressed and every rank writes the cores
of its blocks straight into it (:func:`write_cores`: ``pwrite`` at the dataset's byte offset; no
parallel HDF5 needed).

Zarr (``out.zarr/ds``): the array is built under a hidden name in the group
(``.ds.tmp-<run id>``) and renamed onto ``ds`` by :func:`commit` (other arrays of the group
stay). Its chunks divide the block shape (:func:`zarr_chunks_for`), so the ranks write their
cores concurrently, compressed, without ever sharing a chunk.

With ``--refine`` the output holds two segmentations written the same way (:class:`Layers`):
``<ds>`` (refined) and ``<ds>_forward`` (the reconciled flood), and the tables ``<ds>_origins``
and ``<ds>_overlaps``.

An error while writing (no space left, say) removes the temporary output and releases the
output's lock (:func:`discard_on_error`); the blocks stay in the workdir for the rerun.

File identity (:func:`floodfilling.disk.commit_file`): an HDF5 output that is a symbolic link is
written through (the temporary lies beside the file it points to, :func:`out_file`); an
existing file keeps its mode, owner and hard links. The companions of an earlier result of
the same name that this run does not write (``<ds>_overlaps`` of a refined run beside a plain
one, :func:`floodfilling.outputs.companion_names`) are removed by the same write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import disk, locks, outputs, storage, volumes
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
    ``blocks`` (block index, core ids, output ids), relabelled, into the temporary output."""

    offset: int | None  # HDF5: the dataset's byte offset in the file; zarr: None
    dtype: np.dtype
    blocks: list[tuple[int, np.ndarray, np.ndarray]]
    comp_dir: Path | None = None  # split_components / refine: cores come from the volumes stored here
    name: str = ""  # the dataset (default: the plan's)


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


def out_file(plan: Plan) -> Path:
    """HDF5: the file the output is written to (a symbolic link's file, :func:`disk.real_path`)."""
    return Path(disk.real_path(plan.out_path))


def stale_names(plan: Plan) -> list[str]:
    """Companions of an earlier result ``<ds>`` that this run does not write (removed with it)."""
    return outputs.companions_not_written(plan.out_ds, plan.out_names)


def tmp_output(plan: Plan, name: str | None = None) -> Path:
    """HDF5: the temporary output file (beside :func:`out_file`). Zarr: the hidden array (of
    ``name``, default the plan's dataset) in the output group."""
    if plan.out_kind == "zarr":
        return Path(plan.out_path) / storage.zarr_tmp_name(name or plan.out_ds, plan.run_id)
    real = out_file(plan)
    return real.with_name(real.name + f".tmp-{plan.run_id}")


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
    tmp = tmp_output(plan)
    if plan.out_kind == "zarr":
        for name in plan.out_names:
            shutil.rmtree(tmp_output(plan, name), ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    if plan.lock is not None:
        locks.release(plan.lock)


def _h5_attr(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _cores(plan: Plan, blocks, dtype, comp_dir: Path | None = None):
    """(slices into the output, relabelled core) of each ``(block, keys, values)``; the core is
    the block result's, or with ``comp_dir`` its component volume (split_components)."""
    for k, keys, values in blocks:
        b = plan.grid[k]
        if comp_dir is not None:
            src = split.read_components(comp_dir / f"{b.name(plan.box.start)}.h5")
        else:
            src = blockstore.read_region(plan.block_path(b), b.core_start, b.core_stop)
        yield tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop)), relabel_core(src, keys, values,
                                                                                           np.dtype(dtype))


def create(plan: Plan, layers: Layers, attrs: dict, parallel: bool) -> dict[str, int] | None:
    """Rank 0: writes the output at its temporary path: the segmentations with their attributes,
    ``<ds>_origins`` and the tables. Single writer: fills the segmentations (HDF5: chunked,
    gzip). Parallel: HDF5 allocates them contiguous and uncompressed (no fill) and returns
    their byte offsets in the file by name, where every rank then writes its blocks' cores
    (:func:`write_cores`)."""
    if plan.out_kind == "zarr":
        _create_zarr(plan, layers, attrs, parallel)
        return None
    return _create_hdf5(plan, layers, attrs, parallel)


def _tables(plan: Plan, layers: Layers) -> dict[str, np.ndarray]:
    return {f"{plan.out_ds}_origins": layers.main.origins, **layers.tables}


def _create_zarr(plan: Plan, layers: Layers, attrs: dict, parallel: bool) -> None:
    for name in plan.out_names:
        shutil.rmtree(tmp_output(plan, name), ignore_errors=True)
    group = storage.open_zarr_group(plan.out_path)
    for name, final in layers.segmentations(plan.out_ds).items():
        array = storage.zarr_create_volume(group, tmp_output(plan, name).name, plan.box.shape, final.dtype,
                                           zarr_chunks_for(plan.grid.block))
        for key, v in storage.zarr_attrs(name, {k: v for k, v in attrs.items() if v is not None}).items():
            array.attrs[key] = v
        if not parallel:
            _write_cores_zarr(plan, _task(plan, final, None, range(len(plan.grid)), name), array)
    for name, table in _tables(plan, layers).items():
        storage.zarr_put_table(group, tmp_output(plan, name).name, table)


def _create_hdf5(plan: Plan, layers: Layers, attrs: dict, parallel: bool) -> dict[str, int] | None:
    import h5py

    tmp = tmp_output(plan)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shape = plan.box.shape
    offsets = {}
    space = disk.SpaceCheck(plan.out_path)
    with h5py.File(tmp, "w") as f:
        if os.path.exists(plan.out_path):  # an existing file (check_output saw to it): its other datasets stay
            storage.hdf5_copy_others(plan.out_path, f, list(plan.out_names) + stale_names(plan), space)
        for name, final in layers.segmentations(plan.out_ds).items():
            if parallel:
                space.need(int(np.prod(shape)) * final.dtype.itemsize + final.origins.nbytes)  # the ranks' pwrites fill it
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                d = f.create_dataset(name, shape=shape, dtype=final.dtype.newbyteorder("<"), dcpl=dcpl)
                offsets[name] = int(d.id.get_offset())
            else:
                d = f.create_dataset(name, shape=shape, dtype=final.dtype, chunks=tuple(min(64, s) for s in shape),
                                     compression="gzip", fillvalue=0)
                for sl, core in _cores(plan, final.blocks(range(len(plan.grid))), final.dtype, final.comp_dir):
                    space.need(core.nbytes)
                    d[sl] = core
            for key, v in attrs.items():
                if v is not None:
                    d.attrs[key] = _h5_attr(v)
        for name, table in _tables(plan, layers).items():
            f.create_dataset(name, data=table)
        f.flush()
    return offsets if parallel else None


def _task(plan: Plan, final: FinalLabels, offset: int | None, blocks, name: str) -> WriteTask:
    return WriteTask(offset, final.dtype, final.blocks(blocks), final.comp_dir, name)


def write_tasks(plan: Plan, layers: Layers, offsets: dict[str, int] | None, ranks: int) -> list[list[WriteTask]]:
    """Rank r writes blocks r, r + ranks, ... (as it matched their pairs) of every segmentation."""
    n = len(plan.grid)
    return [[_task(plan, final, (offsets or {}).get(name), range(r, n, ranks), name)
             for name, final in layers.segmentations(plan.out_ds).items()] for r in range(ranks)]


def write_cores(plan: Plan, tasks: list[WriteTask]) -> int:
    """Every rank (parallel write): its blocks' cores into the temporary output; the bytes written."""
    if plan.out_kind == "zarr":
        return sum(_write_cores_zarr(plan, task) for task in tasks)
    return sum(_pwrite_cores(plan, task) for task in tasks)


def _write_cores_zarr(plan: Plan, task: WriteTask, array=None) -> int:
    """Writes relabelled cores into the hidden zarr array (chunks never straddle two cores)."""
    if array is None:
        array = volumes.import_zarr().open_array(str(tmp_output(plan, task.name or None)), mode="r+")
    written = 0
    for sl, core in _cores(plan, task.blocks, task.dtype, task.comp_dir):
        array[sl] = core
        written += core.nbytes
    return written


def _pwrite_cores(plan: Plan, task: WriteTask) -> int:
    """Writes relabelled cores straight into the contiguous dataset at ``task.offset`` of the
    temporary output (C order, little-endian); returns the bytes written."""
    shape = plan.box.shape
    offset = task.offset
    isz = np.dtype(task.dtype).itemsize
    fd = os.open(tmp_output(plan), os.O_WRONLY)
    written = 0
    try:
        for sl, core in _cores(plan, task.blocks, task.dtype, task.comp_dir):
            core = core.astype(np.dtype(task.dtype).newbyteorder("<"), copy=False)
            (z0, y0, x0), (cz, cy, cx) = (s.start for s in sl), core.shape
            if cx == shape[2]:  # whole rows: one write per z plane
                for z in range(cz):
                    buf = core[z].tobytes()
                    os.pwrite(fd, buf, offset + ((z0 + z) * shape[1] + y0) * shape[2] * isz)
                    written += len(buf)
            else:
                for z in range(cz):
                    for y in range(cy):
                        buf = core[z, y].tobytes()
                        os.pwrite(fd, buf, offset + (((z0 + z) * shape[1] + y0 + y) * shape[2] + x0) * isz)
                        written += len(buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def commit(plan: Plan) -> None:
    """Rank 0, at the very end: the output goes live (rename) and its lock is released."""
    out = Path(plan.out_path)
    tmp = tmp_output(plan)
    if plan.out_kind == "zarr":  # the tables first: the array (with block_manifest) is the commit
        group = storage.open_zarr_group(out)
        for name in plan.out_names[1:]:
            storage.zarr_commit(group, str(out), tmp_output(plan, name).name, name, plan.run_id)
        storage.zarr_remove(out, stale_names(plan), tmp_output(plan).name)
        storage.zarr_commit(group, str(out), tmp_output(plan).name, plan.out_ds, plan.run_id)
        disk.fsync_dir(str(out.resolve()))
    else:
        with disk.disk_errors(out):
            disk.commit_file(tmp, out_file(plan))  # mode, owner, hard links kept
    if plan.lock is not None:
        locks.release(plan.lock)
