"""The segmentation result format, written and read in this one place.

A result named ``DS`` lives in an HDF5 file (``out.h5:DS``) or a zarr group (``out.zarr/DS``)::

    DS             (z, y, x) uint32 (uint64 when ids need it); 0 = unsegmented
    DS_origins     table ORIGIN_DTYPE, one row per object: id, seed z/y/x, FOV steps, seconds
    DS_overlaps    table OVERLAP_DTYPE: (id, other_id, voxels) an object flooded over (plain
                   segment only; dropped when ids were renumbered)
    DS_forward     (refined results only, ``ffn segment --refine``) the exact flood before
                   refinement, same ids; objects the refinement added have origins with 0 steps
    DS_agglomeration  (``ffn agglomerate`` only) the table of merge candidates

These companions belong to ``DS`` (:func:`floodfilling.outputs.companion_names`): a write of
``DS`` removes, in the same atomic write, those it does not write, so that no table or flood of
an earlier result is left beside a new one (``--overwrite`` of a refined result by a plain one,
say); datasets of other names are kept.

Tables are compound HDF5 datasets, or zarr groups with one 1-D array per column. Attributes of
``DS`` (:class:`ResultAttrs`): ``resolution_zyx_nm``, ``bbox_zyx`` (where the result sits in
the source image), ``source_image``, ``model``, ``config``, ``normalisation`` and ``counters``
(JSON), ``refine`` (JSON, refined results); block runs add :class:`BlockRunAttrs`
(``block_manifest``, ...), consensus and agglomeration their own keys on top of their source's
(:func:`derived_attrs`). Every writer encodes them the same way (:func:`encode_attrs`:
``resolution_zyx_nm`` a numeric array, ``bbox_zyx`` JSON, dicts JSON).

Writers, all here:

- :func:`write_result`: a whole result from memory (``ffn segment``, the demo, agglomeration),
  through :func:`floodfilling.storage.write_arrays` (atomic; the file's or group's other
  datasets are kept);
- :class:`ResultWriter`: a result built in place at a temporary path, its volumes written region
  by region (:func:`write_region`), then committed atomically: streamed slab by slab by one
  process (consensus), or by every rank of a block run at once (``parallel``: HDF5 volumes
  allocated contiguous, each rank writing its regions at their byte offsets with ``pwrite``;
  zarr chunks that never straddle two ranks' regions).

Digests that tie a result or a resume state to its inputs (:func:`file_digest`,
:func:`image_digest`) are here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import disk, errors, storage, volumes
from .outputs import companions_not_written

ORIGIN_DTYPE = np.dtype([("id", "<u8"), ("z", "<i8"), ("y", "<i8"), ("x", "<i8"), ("steps", "<i8"), ("seconds", "<f8")])
OVERLAP_DTYPE = np.dtype([("id", "<u8"), ("other_id", "<u8"), ("voxels", "<i8")])
# Attributes a derived result (consensus, agglomeration) carries over from its source segmentation.
PROVENANCE_KEYS = ("resolution_zyx_nm", "bbox_zyx", "source_image")


@dataclass
class Origin:
    """How an object was created: its seed, FOV steps and wall seconds."""

    seed_zyx: tuple[int, int, int]
    steps: int
    seconds: float


@dataclass
class ResultAttrs:
    """The attributes of a segmentation (see the module docstring); ``None`` values are left out."""

    resolution_zyx_nm: tuple[float, float, float] | None  # voxel size of the source image
    bbox_zyx: tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, stop) in the source image
    source_image: str  # the image spec segmented
    model: str  # the model file used
    config: dict[str, Any]  # InferenceConfig.to_dict()
    normalisation: dict[str, Any]  # Normalisation.to_dict()
    counters: dict[str, Any]  # objects, FOV steps, ...
    refine: dict[str, Any] | None = None  # RefineConfig.to_dict() of a refined result (None: the exact flood)
    block: "BlockRunAttrs | None" = None  # a block run's own attributes (None: a run in one piece)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "resolution_zyx_nm": list(self.resolution_zyx_nm) if self.resolution_zyx_nm is not None else None,
            "bbox_zyx": [list(self.bbox_zyx[0]), list(self.bbox_zyx[1])],
            "source_image": self.source_image,
            "model": self.model,
            "config": json.dumps(self.config),
            "normalisation": json.dumps(self.normalisation),
            "counters": json.dumps(self.counters),
            "refine": json.dumps(self.refine) if self.refine is not None else None,
        }
        if self.block is not None:
            out.update(self.block.to_dict())
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class BlockRunAttrs:
    """What a block run adds to :class:`ResultAttrs`."""

    block_zyx: tuple[int, int, int]  # the block size
    halo_zyx: tuple[int, int, int]  # the halo around each block
    merge_rule: dict[str, Any]  # MergeRule.to_dict(): how blocks' objects were matched
    block_manifest: str  # digest of the blocks + reconciliation options: a rerun's "already complete" test
    workdir: str  # the run's workdir (absolute)

    def to_dict(self) -> dict[str, Any]:
        return {"block_zyx": list(self.block_zyx), "halo_zyx": list(self.halo_zyx),
                "merge_rule": json.dumps(self.merge_rule), "block_manifest": self.block_manifest,
                "workdir": self.workdir}


def derived_attrs(source: Mapping[str, Any], **own: Any) -> dict[str, Any]:
    """The attributes of a result derived from the segmentation whose attributes are ``source``
    (consensus, agglomeration): its :data:`PROVENANCE_KEYS`, then ``own`` (``None`` left out)."""
    out = {k: v for k, v in source.items() if k in PROVENANCE_KEYS}
    out.update({k: v for k, v in own.items() if v is not None})
    return out


def encode_attrs(name: str, attrs: Mapping[str, Any], kind: str = "hdf5") -> dict[str, Any]:
    """Result attributes as the file stores them, the one encoding of every writer (``None``
    values left out): HDF5 (:func:`floodfilling.volumes.encode_attr`: flat numeric lists as
    arrays, dicts and nested lists as JSON), zarr (the same values as JSON types)."""
    clean = {str(k): v for k, v in attrs.items() if v is not None}
    if kind == "zarr":
        return storage.zarr_attrs(name, clean)
    return {k: volumes.encode_attr(f"{name}:{k}", v) for k, v in clean.items()}


def result_names(ds: str, refined: bool = False) -> list[str]:
    """The datasets a segmentation result ``ds`` consists of: itself, ``ds_origins``,
    ``ds_overlaps``, and for a refined result ``ds_forward`` (the exact flood it refined)."""
    return [ds, f"{ds}_origins", f"{ds}_overlaps"] + ([f"{ds}_forward"] if refined else [])


def origins_table(origins: Mapping[int, Origin]) -> np.ndarray:
    """``{id: Origin}`` as an ORIGIN_DTYPE table, by id."""
    ids = sorted(origins)
    tab = np.zeros(len(ids), dtype=ORIGIN_DTYPE)
    for r, i in enumerate(ids):
        o = origins[i]
        tab[r] = (i, *o.seed_zyx, o.steps, o.seconds)
    return tab


def overlaps_table(overlaps: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``{id: (other ids, voxels)}`` as an OVERLAP_DTYPE table, by id."""
    rows = [(i, a, c) for i in sorted(overlaps) for a, c in zip(*overlaps[i])]
    return np.array(rows, dtype=OVERLAP_DTYPE)


def overlaps_dict(table: np.ndarray, ids=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """An overlaps table (OVERLAP_DTYPE, or rows (id, other id, voxels)) as ``{id: (other ids,
    voxels)}`` int64, for ``ids`` (default: the ids in the table; an id without rows gets empty arrays)."""
    t = np.asarray(table)
    cols = np.stack([t[n] for n in t.dtype.names], 1) if t.dtype.names else t.reshape(-1, 3)
    cols = cols.astype(np.int64)
    cols = cols[np.argsort(cols[:, 0], kind="stable")]  # grouped by id, rows of an id in table order
    uniq, starts = np.unique(cols[:, 0], return_index=True)
    stops = np.r_[starts[1:], len(cols)].astype(np.int64)
    groups = {int(u): (cols[a:b, 1].copy(), cols[a:b, 2].copy()) for u, a, b in zip(uniq, starts, stops)}
    if ids is None:
        return groups
    return {int(i): groups.get(int(i), (np.zeros(0, np.int64), np.zeros(0, np.int64))) for i in ids}


def write_result(out_path: str | os.PathLike, ds: str, segmentation: np.ndarray, origins: np.ndarray | None,
                 attrs: Mapping[str, Any], overwrite: bool, overlaps: np.ndarray | None = None,
                 extra: Mapping[str, np.ndarray] | None = None) -> None:
    """``ds`` (+ ``ds_origins``, ``ds_overlaps`` when given, + ``extra`` tables) into the HDF5
    file or zarr group ``out_path``, atomically, keeping its other datasets; the companions of
    ``ds`` not written are removed by the same write (see the module docstring). ``attrs``: a
    :class:`ResultAttrs` dict or any attributes (``None`` values left out)."""
    arrays = {ds: segmentation}
    if origins is not None:
        arrays[f"{ds}_origins"] = origins
    if overlaps is not None:
        arrays[f"{ds}_overlaps"] = overlaps
    arrays.update(extra or {})
    clean = {k: v for k, v in attrs.items() if v is not None}
    stale = companions_not_written(ds, arrays)  # an earlier result's, removed with it
    storage.write_arrays(out_path, arrays, attrs={ds: clean}, overwrite=overwrite, drop=stale)


@dataclass
class ResultTarget:
    """Where the regions of a result being built are written (sent to every rank of a block run):
    HDF5, the temporary file and, for a parallel write, each volume's byte offset in it (the
    volume contiguous, uncompressed, little-endian); zarr, the group and each volume's hidden
    array."""

    kind: str  # "hdf5" or "zarr"
    path: str  # HDF5: the temporary file; zarr: the group
    shape: tuple[int, int, int]  # every volume's shape
    dtypes: dict[str, str]  # volume name -> dtype
    offsets: dict[str, int] = field(default_factory=dict)  # HDF5, parallel: volume name -> byte offset
    arrays: dict[str, str] = field(default_factory=dict)  # zarr: volume name -> hidden array name


class ResultWriter:
    """One result built at a temporary place and committed atomically: :meth:`create` writes its
    volumes (empty), attributes and tables and returns the :class:`ResultTarget` that
    :func:`write_region` fills (on any rank), :meth:`commit` makes it the result (removing the
    stale companions of an earlier result in the same step), :meth:`discard` removes it.

    ``out_path``: the HDF5 file (a symbolic link is written through; an existing file keeps its
    other datasets, mode, owner and hard links) or the zarr group. ``ds``: the result's name;
    ``names``: every dataset it writes (``ds`` first). ``tag``: names the temporaries
    (``FILE.tmp-<tag>``, ``.NAME.tmp-<tag>``; the output's lock removes a killed writer's).
    ``parallel``: several processes write regions at once (HDF5: contiguous volumes written with
    ``pwrite``); else one process writes them (HDF5: chunked, gzip). ``chunks``: the volumes'
    chunks (zarr: they must not straddle two writers' regions)."""

    def __init__(self, out_path: str | os.PathLike, ds: str, names: Sequence[str], tag: str, *,
                 parallel: bool = False, chunks: Sequence[int] | None = None):
        self.out_path, self.ds, self.names, self.tag = os.fspath(out_path), ds, list(names), str(tag)
        self.kind = "zarr" if self.out_path.lower().endswith(".zarr") else "hdf5"
        self.parallel, self.chunks = parallel, (tuple(int(c) for c in chunks) if chunks else None)
        self.stale = companions_not_written(ds, self.names)

    # -- where
    def real_file(self) -> Path:
        """HDF5: the file the result goes to (a symbolic link's file)."""
        return Path(disk.real_path(self.out_path))

    def tmp_path(self, name: str | None = None) -> Path:
        """HDF5: the temporary file (beside :meth:`real_file`). Zarr: the hidden array of
        ``name`` (default ``ds``) in the group."""
        if self.kind == "zarr":
            return Path(self.out_path) / storage.zarr_tmp_name(name or self.ds, self.tag)
        real = self.real_file()
        return real.with_name(real.name + f".tmp-{self.tag}")

    # -- phases
    def create(self, volumes_: Mapping[str, tuple[Sequence[int], Any]], attrs: Mapping[str, Mapping[str, Any]],
               tables: Mapping[str, np.ndarray]) -> ResultTarget:
        """The result at its temporary place: ``volumes_`` (name -> (shape, dtype); zero-filled,
        or for a parallel HDF5 write allocated and left for the ranks to fill), their attributes
        (name -> attributes, :func:`encode_attrs`) and the ``tables``."""
        shapes = {tuple(int(v) for v in shp) for shp, _ in volumes_.values()}
        if len(shapes) != 1:
            raise ValueError(f"volumes: one shape for all, got {sorted(shapes)}")
        shape = shapes.pop()
        dtypes = {n: np.dtype(dt).str for n, (_, dt) in volumes_.items()}
        target = ResultTarget(self.kind, "", shape, dtypes)
        if self.kind == "zarr":
            self._create_zarr(target, volumes_, attrs, tables)
        else:
            self._create_hdf5(target, volumes_, attrs, tables)
        return target

    def _create_zarr(self, target, volumes_, attrs, tables) -> None:
        for name in self.names:
            shutil.rmtree(self.tmp_path(name), ignore_errors=True)
        group = storage.open_zarr_group(self.out_path)
        target.path = self.out_path
        for name, (shape, dtype) in volumes_.items():
            tmp = self.tmp_path(name).name
            array = storage.zarr_create_volume(group, tmp, shape, dtype, self.chunks)
            for key, v in encode_attrs(name, attrs.get(name, {}), "zarr").items():
                array.attrs[key] = v
            target.arrays[name] = tmp
        for name, table in tables.items():
            storage.zarr_put_table(group, self.tmp_path(name).name, table)

    def _create_hdf5(self, target, volumes_, attrs, tables) -> None:
        import h5py

        tmp = self.tmp_path()
        with disk.disk_errors(self.out_path):
            tmp.parent.mkdir(parents=True, exist_ok=True)
        disk.check_file_writable(self.real_file())
        disk.complete_journals(self.real_file())  # an in-place write cut short: the file is whole again first
        space = disk.SpaceCheck(self.out_path)
        target.path = str(tmp)
        with disk.disk_errors(self.out_path), h5py.File(tmp, "w") as f:
            if os.path.exists(self.out_path):  # an existing file (check_output saw to it): its other datasets stay
                storage.hdf5_copy_others(self.out_path, f, self.names + self.stale, space)
            for name, (shape, dtype) in volumes_.items():
                dtype = np.dtype(dtype)
                shape = tuple(int(v) for v in shape)
                if self.parallel:  # the ranks' pwrites fill it
                    space.need(int(np.prod(shape)) * dtype.itemsize)
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                    d = f.create_dataset(name, shape=shape, dtype=dtype.newbyteorder("<"), dcpl=dcpl)
                    target.offsets[name] = int(d.id.get_offset())
                else:
                    d = f.create_dataset(name, shape=shape, dtype=dtype, compression="gzip", fillvalue=0,
                                         chunks=self.chunks or tuple(min(64, s) for s in shape))
                for key, v in encode_attrs(name, attrs.get(name, {})).items():
                    d.attrs[key] = v
            for name, table in tables.items():
                storage.hdf5_write_array(f, name, table, space, compression=None)
            f.flush()

    def add_tables(self, tables: Mapping[str, np.ndarray]) -> None:
        """Tables known only after the volumes were written (consensus: the origins of the ids
        that survive), into the result being built (names among ``names``)."""
        if self.kind == "zarr":
            group = storage.open_zarr_group(self.out_path)
            for name, table in tables.items():
                shutil.rmtree(self.tmp_path(name), ignore_errors=True)
                storage.zarr_put_table(group, self.tmp_path(name).name, table)
            return
        import h5py

        space = disk.SpaceCheck(self.out_path)
        with disk.disk_errors(self.out_path), h5py.File(self.tmp_path(), "r+") as f:
            for name, table in tables.items():
                storage.hdf5_write_array(f, name, table, space, compression=None)

    def commit(self) -> None:
        """The result goes live: HDF5, the temporary file (fsynced) replaces the file; zarr, the
        tables and further volumes, then (after the stale companions go) ``ds`` itself."""
        out = Path(self.out_path)
        if self.kind == "zarr":
            group = storage.open_zarr_group(out)
            with disk.disk_errors(out):
                for name in self.names[1:]:
                    storage.zarr_commit(group, str(out), self.tmp_path(name).name, name, self.tag)
                storage.zarr_remove(out, self.stale, self.tmp_path().name)
                storage.zarr_commit(group, str(out), self.tmp_path().name, self.ds, self.tag)
            disk.fsync_dir(str(out.resolve()))
            return
        with disk.disk_errors(out):
            disk.fsync_file(self.tmp_path())
            disk.commit_file(self.tmp_path(), self.real_file())  # mode, owner, hard links kept

    def discard(self) -> None:
        """The temporary result goes (nothing of the result is changed)."""
        if self.kind == "zarr":
            for name in self.names:
                shutil.rmtree(self.tmp_path(name), ignore_errors=True)
        else:
            self.tmp_path().unlink(missing_ok=True)


def write_region(target: ResultTarget, name: str, slices: tuple[slice, slice, slice], values: np.ndarray,
                 space: disk.SpaceCheck | None = None, h5file=None) -> int:
    """Writes ``values`` at ``slices`` of volume ``name`` of a result being built (any rank; the
    regions of concurrent writers must not overlap, nor share a zarr chunk); returns the bytes
    written. HDF5, parallel: ``pwrite`` at the volume's offset (C order, little-endian; the writer
    fsyncs the file once after its regions, :func:`floodfilling.disk.fsync_file`);
    HDF5, one writer: through ``h5file`` (the temporary file, open) or opening it; ``space``
    checks the bytes fit first."""
    values = np.asarray(values, dtype=np.dtype(target.dtypes[name]))
    if space is not None:
        space.need(values.nbytes)
    if target.kind == "zarr":
        zarr = volumes.import_zarr()
        zarr.open_array(os.path.join(target.path, target.arrays[name]), mode="r+")[slices] = values
        return values.nbytes
    if name in target.offsets:
        return _pwrite(target, name, slices, values)
    if h5file is not None:
        h5file[name][slices] = values
        return values.nbytes
    import h5py

    with h5py.File(target.path, "r+") as f:
        f[name][slices] = values
    return values.nbytes


def _pwrite(target: ResultTarget, name: str, slices, values: np.ndarray) -> int:
    shape, offset = target.shape, target.offsets[name]
    values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    isz = values.dtype.itemsize
    (z0, y0, x0), (cz, cy, cx) = (s.start or 0 for s in slices), values.shape
    fd = os.open(target.path, os.O_WRONLY)
    written = 0
    try:
        if cx == shape[2]:  # whole rows: one write per z plane
            for z in range(cz):
                buf = values[z].tobytes()
                os.pwrite(fd, buf, offset + ((z0 + z) * shape[1] + y0) * shape[2] * isz)
                written += len(buf)
        else:
            for z in range(cz):
                for y in range(cy):
                    buf = values[z, y].tobytes()
                    os.pwrite(fd, buf, offset + (((z0 + z) * shape[1] + y0 + y) * shape[2] + x0) * isz)
                    written += len(buf)
    finally:
        os.close(fd)
    return written


def read_origins(spec: str) -> np.ndarray | None:
    """The origins table ``<ds>_origins`` beside a segmentation ``spec`` as an ORIGIN_DTYPE
    array (extra columns dropped); None when absent; :class:`errors.VolumeError` naming the
    table when it is not an origins table."""
    parsed = volumes.parse_volume_spec(spec)
    name = f"{parsed.dataset}_origins"
    raw = volumes.read_table(parsed.path, name)
    if raw is None:
        return None
    where = f"{parsed.path}/{name}" if parsed.kind == "zarr" else f"{parsed.path}:{name}"
    if raw.dtype.names is None or not set(ORIGIN_DTYPE.names) <= set(raw.dtype.names):
        raise errors.VolumeError(f"{where}: not an origins table (columns {raw.dtype.names})")
    tab = np.zeros(len(raw), ORIGIN_DTYPE)
    for col in ORIGIN_DTYPE.names:
        tab[col] = raw[col]
    return tab


def file_digest(path: str | os.PathLike, digits: int | None = 16) -> str:
    """sha256 of a file's bytes, its first ``digits`` hex digits (16: a model file in manifests;
    None: all 64, as a fine-tuned model records its parent)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits]


def image_digest(raw: np.ndarray) -> str:
    """A digest of an image's voxels (shape, dtype and bytes), recorded in the resume state so that
    a rerun after the image changed is refused, not mixed."""
    h = hashlib.sha256(f"{raw.shape}|{raw.dtype.str}".encode())
    h.update(memoryview(np.ascontiguousarray(raw)).cast("B"))
    return h.hexdigest()[:16]
