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

An error while writing (no space left, say) removes the temporary output and releases the
output's lock (:func:`discard_on_error`); the blocks stay in the workdir for the rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import disk, locks, storage, volumes
from . import blockstore, split
from .reconcile import relabel_core

if TYPE_CHECKING:  # no import at run time: workdir imports this module
    from .labels import FinalLabels
    from .workdir import Plan


@dataclass
class WriteTask:
    """One rank's share of a parallel write: the cores of ``blocks`` (block index, core ids,
    output ids), relabelled, into the temporary output."""

    offset: int | None  # HDF5: the dataset's byte offset in the file; zarr: None
    dtype: np.dtype
    blocks: list[tuple[int, np.ndarray, np.ndarray]]
    comp_dir: Path | None = None  # split_components: cores come from the component volumes here


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


def tmp_output(plan: Plan) -> Path:
    """HDF5: the temporary output file. Zarr: the hidden array in the output group."""
    if plan.out_kind == "zarr":
        return Path(plan.out_path) / storage.zarr_tmp_name(plan.out_ds, plan.run_id)
    return Path(plan.out_path).with_name(Path(plan.out_path).name + f".tmp-{plan.run_id}")


def _tmp_origins_zarr(plan: Plan) -> Path:
    return Path(plan.out_path) / storage.zarr_tmp_name(f"{plan.out_ds}_origins", plan.run_id)


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
        tmp = tmp_output(plan)
        if plan.out_kind == "zarr":
            for p in (tmp, _tmp_origins_zarr(plan)):
                shutil.rmtree(p, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if plan.lock is not None:
            locks.release(plan.lock)
        raise


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


def create(plan: Plan, final: FinalLabels, attrs: dict, parallel: bool) -> int | None:
    """Rank 0: writes the output at its temporary path: the segmentation with its attributes
    and ``<ds>_origins``. Single writer: fills the segmentation (HDF5: chunked, gzip).
    Parallel: HDF5 allocates it contiguous and uncompressed (no fill) and returns its byte
    offset in the file, where every rank then writes its blocks' cores (:func:`write_cores`)."""
    if plan.out_kind == "zarr":
        _create_zarr(plan, final, attrs, parallel)
        return None
    return _create_hdf5(plan, final, attrs, parallel)


def _create_zarr(plan: Plan, final: FinalLabels, attrs: dict, parallel: bool) -> None:
    tmp, tmp_origins = tmp_output(plan), _tmp_origins_zarr(plan)
    for p in (tmp, tmp_origins):
        shutil.rmtree(p, ignore_errors=True)
    group = storage.open_zarr_group(plan.out_path)
    array = storage.zarr_create_volume(group, tmp.name, plan.box.shape, final.dtype, zarr_chunks_for(plan.grid.block))
    for key, v in storage.zarr_attrs(plan.out_ds, {k: v for k, v in attrs.items() if v is not None}).items():
        array.attrs[key] = v
    storage.zarr_put_table(group, tmp_origins.name, final.origins)
    if not parallel:
        _write_cores_zarr(plan, WriteTask(None, final.dtype, final.blocks(range(len(plan.grid))), final.comp_dir),
                          array)


def _create_hdf5(plan: Plan, final: FinalLabels, attrs: dict, parallel: bool) -> int | None:
    import h5py

    tmp = tmp_output(plan)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shape = plan.box.shape
    offset = None
    names = [plan.out_ds, f"{plan.out_ds}_origins"]
    space = disk.SpaceCheck(plan.out_path)
    with h5py.File(tmp, "w") as f:
        if os.path.exists(plan.out_path):  # an existing file (check_output saw to it): its other datasets stay
            storage.hdf5_copy_others(plan.out_path, f, names, space)
        if parallel:
            space.need(int(np.prod(shape)) * final.dtype.itemsize + final.origins.nbytes)  # the ranks' pwrites fill it
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            d = f.create_dataset(plan.out_ds, shape=shape, dtype=final.dtype.newbyteorder("<"), dcpl=dcpl)
            offset = int(d.id.get_offset())
        else:
            d = f.create_dataset(plan.out_ds, shape=shape, dtype=final.dtype, chunks=tuple(min(64, s) for s in shape),
                                 compression="gzip", fillvalue=0)
            for sl, core in _cores(plan, final.blocks(range(len(plan.grid))), final.dtype, final.comp_dir):
                space.need(core.nbytes)
                d[sl] = core
        for key, v in attrs.items():
            if v is not None:
                d.attrs[key] = _h5_attr(v)
        f.create_dataset(f"{plan.out_ds}_origins", data=final.origins)
        f.flush()
    return offset


def write_tasks(plan: Plan, final: FinalLabels, offset: int | None, ranks: int) -> list[WriteTask]:
    """Rank r writes blocks r, r + ranks, ... (as it matched their pairs)."""
    n = len(plan.grid)
    return [WriteTask(offset, final.dtype, final.blocks(range(r, n, ranks)), final.comp_dir) for r in range(ranks)]


def write_cores(plan: Plan, task: WriteTask) -> int:
    """Every rank (parallel write): its blocks' cores into the temporary output; the bytes written."""
    if plan.out_kind == "zarr":
        return _write_cores_zarr(plan, task)
    return _pwrite_cores(plan, task)


def _write_cores_zarr(plan: Plan, task: WriteTask, array=None) -> int:
    """Writes relabelled cores into the hidden zarr array (chunks never straddle two cores)."""
    if array is None:
        array = volumes.import_zarr().open_array(str(tmp_output(plan)), mode="r+")
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
    if plan.out_kind == "zarr":  # the table first: the array (with block_manifest) is the commit
        group = storage.open_zarr_group(out)
        origins = f"{plan.out_ds}_origins"
        storage.zarr_commit(group, str(out), storage.zarr_tmp_name(origins, plan.run_id), origins, plan.run_id)
        storage.zarr_commit(group, str(out), tmp.name, plan.out_ds, plan.run_id)
        disk.fsync_dir(str(out.resolve()))
    else:
        os.replace(tmp, out)
        disk.fsync_dir(str(out.parent.resolve()))
    if plan.lock is not None:
        locks.release(plan.lock)
