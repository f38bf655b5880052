"""Writing arrays, atomically and safely: named arrays (volumes, tables) with their attributes
into an HDF5 file or a zarr group (:func:`write_arrays`), keeping everything else there. Each
HDF5 write first checks its bytes fit on the disk; the file-system layer under these writes
(atomic files, free space, one-line disk errors) is :mod:`floodfilling.disk`. Every failure is
a :class:`~floodfilling.errors.VolumeError` naming the file. Reading is
:mod:`floodfilling.volumes`.

An existing file keeps its identity (:func:`floodfilling.disk.commit_file`: a symbolic link is
written through, mode, owner and hard links are kept); an array of a zarr group that is
replaced keeps its directory's mode. A write may also ``drop`` named datasets (the stale
companions of an earlier result, :func:`floodfilling.outputs.companion_names`) in the same
write. Dataset names are checked (:func:`check_dataset_name`) before anything is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from . import disk
from .disk import SpaceCheck, atomic_path, disk_errors, fsync_dir, os_error_text
from .errors import VolumeError
from .volumes import (PathLike, VolumeSpec, check_volume_array, decode_attr, encode_attr, hdf5_datasets, import_zarr,
                      parse_volume_spec)

logger = logging.getLogger(__name__)


def check_dataset_name(where: str, name: str) -> str:
    """``name`` (a dataset or array path inside a file or zarr group, ``a/b``) stripped of outer
    slashes; :class:`VolumeError` naming ``where`` when a part of it is empty (``a//b``), ``.``
    or ``..`` (HDF5 reads them as the group itself or a literal name; in a zarr group ``..``
    leaves the store), or holds a control character."""
    text = str(name)
    clean = text.strip("/")
    bad = ""
    if not clean:
        bad = "is empty"
    elif any(ord(c) < 32 or ord(c) == 127 for c in clean):
        bad = "holds a control character"
    else:
        parts = clean.split("/")
        if any(p == "" for p in parts):
            bad = "has an empty part (//)"
        elif any(p in (".", "..") for p in parts):
            bad = "has a part '.' or '..'"
    if bad:
        raise VolumeError(f"{where}: dataset name {text!r} {bad}; use names like seg or volumes/seg")
    return clean


def hdf5_storage_bytes(obj: Any) -> int:
    """Bytes an HDF5 dataset, or every dataset under a group, occupies in its file."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        return int(obj.id.get_storage_size())
    total = [0]

    def visit(_name: str, o: Any) -> None:
        if isinstance(o, h5py.Dataset):
            total[0] += int(o.id.get_storage_size())

    obj.visititems(visit)
    return total[0]


def hdf5_copy_others(src_path: PathLike, dst: Any, replaced: Sequence[str], space: SpaceCheck) -> list[str]:
    """Copies everything of the HDF5 file ``src_path`` into the open file ``dst`` except the
    datasets named in ``replaced`` (and, for a group on the way to one of them, only its other
    members): datasets with their chunks, filters and attributes, groups, soft and external
    links, and the root attributes. Returns the names of the objects copied. This is how an
    output written into an existing file keeps the file's other datasets (the raw image and
    labels beside a segmentation)."""
    import h5py

    replaced = [r.strip("/") for r in replaced]
    copied: list[str] = []
    with h5py.File(src_path, "r") as src:
        def walk(sg: Any, dg: Any, prefix: str) -> None:
            for k, v in sg.attrs.items():
                dg.attrs[k] = v
            for name in sg:
                full = f"{prefix}{name}"
                if full in replaced:
                    continue
                link = sg.get(name, getlink=True)
                if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                    dg[name] = link
                    copied.append(full)
                    continue
                obj = sg[name]
                if isinstance(obj, h5py.Group) and any(r.startswith(full + "/") for r in replaced):
                    walk(obj, dg.require_group(name), full + "/")
                    continue
                space.need(hdf5_storage_bytes(obj))
                sg.copy(obj, dg, name=name)
                copied.append(full)

        walk(src, dst, "")
    return copied


def _slab_planes(shape: tuple[int, ...], itemsize: int, chunks: tuple[int, ...] | None) -> int:
    """Planes (first axis) per write: whole chunks, about 64 MiB."""
    plane = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    step = max(1, (64 << 20) // max(plane, 1))
    if chunks:
        step = max(chunks[0], step // chunks[0] * chunks[0])
    return step


def hdf5_write_array(group: Any, name: str, arr: np.ndarray, space: SpaceCheck,
                     compression: str | None = "gzip", chunks: Any = None) -> Any:
    """Creates dataset ``name`` in ``group`` and fills it from ``arr`` slab by slab along the
    first axis, checking before each slab that its uncompressed bytes fit on the disk."""
    kwargs: dict[str, Any] = {}
    if compression and arr.ndim > 0 and arr.size > 0:
        kwargs["compression"] = compression
        kwargs["chunks"] = chunks if chunks is not None else True
    elif chunks is not None:
        kwargs["chunks"] = chunks
    dset = group.create_dataset(name, shape=arr.shape, dtype=arr.dtype, **kwargs)
    if arr.size == 0:
        return dset
    if arr.ndim == 0:
        space.need(arr.nbytes)
        dset[()] = arr
        return dset
    step = _slab_planes(arr.shape, arr.dtype.itemsize, dset.chunks)
    for z0 in range(0, arr.shape[0], step):
        part = arr[z0:z0 + step]
        space.need(part.nbytes)
        dset[z0:z0 + step] = part
    return dset


def existing_hdf5(target: str) -> bool:
    """True when ``target`` is an existing HDF5 file; :class:`VolumeError` when something else
    is there (never written into or replaced)."""
    import h5py

    if not os.path.lexists(target):
        return False
    if os.path.isdir(target):
        raise VolumeError(f"output {target}: is a directory")
    try:
        ok = h5py.is_hdf5(target)
    except OSError as exc:
        raise VolumeError(os_error_text(exc, target, "reading")) from None
    if not ok:
        raise VolumeError(f"output {target}: exists and is not an HDF5 file; nothing is written into it "
                          "(move it away or choose another name)")
    return True


def existing_hdf5_names(target: str, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that exist in the HDF5 file ``target`` (which must exist)."""
    import h5py

    try:
        with h5py.File(target, "r") as f:
            for n in names:
                obj = f.get(n.strip("/"))
                if isinstance(obj, h5py.Group):
                    inside = hdf5_datasets(obj)
                    raise VolumeError(f"output {target}:{n.strip('/')} is a group (holding "
                                      f"{', '.join(n.strip('/') + '/' + d for d in inside[:3]) or 'nothing'}"
                                      f"{', ...' if len(inside) > 3 else ''}); an output never replaces a group: "
                                      "choose another dataset name")
                parts = n.strip("/").split("/")
                for i in range(1, len(parts)):
                    if isinstance(f.get("/".join(parts[:i])), h5py.Dataset):
                        raise VolumeError(f"output {target}:{n.strip('/')}: {'/'.join(parts[:i])} is a dataset, "
                                          "not a group")
            return [n for n in names if n.strip("/") in f]
    except OSError as exc:
        raise VolumeError(f"output {target}: cannot open the existing HDF5 file ({exc}); nothing is written "
                          "into it") from None


def write_hdf5_atomic(
    path: PathLike,
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    file_attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    compression: str | None = "gzip",
    drop: Sequence[str] = (),
) -> str:
    """Write datasets into an HDF5 file atomically and return its path.

    ``datasets`` maps dataset names (``"a/b"`` creates group ``a``) to arrays; ``attrs`` maps
    dataset names to their attribute dicts; ``file_attrs`` go on the root group. Attribute
    values: strings, numbers, numeric arrays and flat numeric lists are stored natively; dicts
    and other lists as JSON strings (:attr:`Volume.attrs` decodes them).

    A new file holds just these datasets. Into an existing HDF5 file they are added: every
    other dataset, group, link and root attribute of the file is kept (copied into the new
    file, :func:`hdf5_copy_others`), and a dataset of the same name is replaced only with
    ``overwrite`` (:class:`VolumeError` "... exists; pass overwrite=True" otherwise, before
    anything is written). Something at ``path`` that is not an HDF5 file is never replaced,
    nor is a group by a dataset. ``drop``: datasets of the file removed in the same write (those
    present need ``overwrite`` too). Everything goes into ``FILE + ".tmp-<pid>"``, is flushed
    and fsynced, then becomes the file (:func:`floodfilling.disk.atomic_path`: a symbolic link
    ``path`` is written through; mode, owner and hard links are kept): a failure leaves no
    partial file and the previous ``path`` intact. Each write first checks that it fits on the
    disk (:class:`SpaceCheck`).
    """
    import h5py

    target = disk.real_path(path)
    disk.complete_journals(target)  # an in-place write cut short: the file is whole again first
    if not datasets:
        raise VolumeError(f"{target}: no datasets to write")
    attrs = dict(attrs or {})
    unknown = sorted(set(attrs) - set(datasets))
    if unknown:
        raise VolumeError(f"{target}: attrs given for unknown datasets: {', '.join(unknown)}")
    # Encode (and validate) every attribute before touching the disk.
    enc_attrs = {
        name: {str(k): encode_attr(f"{name}:{k}", v) for k, v in (attrs.get(name) or {}).items()}
        for name in datasets
    }
    enc_file_attrs = {str(k): encode_attr(str(k), v) for k, v in (file_attrs or {}).items()}
    arrays = {}
    for name, arr in datasets.items():
        arr = np.asarray(arr)
        compound = arr.dtype.names is not None and all(
            arr.dtype.fields[n][0].kind in "biuf" for n in arr.dtype.names)  # tables (origins, ...)
        if arr.dtype.kind not in "biuf" and not compound:
            raise VolumeError(f"{target}:{name}: unsupported dtype {arr.dtype}")
        arrays[check_dataset_name(target, name)] = arr
    drop = [check_dataset_name(target, n) for n in drop if str(n).strip("/") not in arrays]
    keep = existing_hdf5(target)
    if keep:
        there = existing_hdf5_names(target, list(arrays) + drop)  # a group there: refused
        if there and not overwrite:
            raise VolumeError(f"{target}:{there[0]} exists; pass overwrite=True to replace it (the file's other "
                              "datasets are kept)")
    with atomic_path(target, overwrite=True) as tmp:
        space = SpaceCheck(target)
        with h5py.File(tmp, "w") as f:
            if keep:
                hdf5_copy_others(target, f, list(arrays) + drop, space)
            for k, v in enc_file_attrs.items():
                f.attrs[k] = v
            for name, arr in arrays.items():
                dset = hdf5_write_array(f, name, arr, space, compression)
                for k, v in enc_attrs[name].items():
                    dset.attrs[k] = v
            f.flush()
    logger.debug("wrote %s (%s)", target, ", ".join(arrays))
    return target


def _zarr_chunks(shape: tuple[int, ...], chunks: Sequence[int] | None) -> tuple[int, ...]:
    if not shape:
        return ()
    if chunks is None:
        chunks = (64,) * len(shape) if len(shape) == 3 else (max(1, min(65536, shape[0])),) + tuple(shape[1:])
    return tuple(max(1, min(int(c), int(n))) if n else 1 for c, n in zip(chunks, shape))


def _zarr_create(group: Any, name: str, shape, dtype, chunks) -> Any:
    """An empty (zero-filled) array in a zarr group; zarr 3 (create_array) or 2 (create_dataset)."""
    make = getattr(group, "create_array", None) or group.create_dataset
    return make(name, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), fill_value=0)


def write_zarr_atomic(
    store: PathLike,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
    drop: Sequence[str] = (),
) -> str:
    """Write arrays into the zarr group ``store`` (created when missing), each atomically.

    Each array is written complete under a hidden temporary name in the group
    (``.NAME.tmp-<pid>``), then renamed onto ``NAME``; an existing ``NAME`` is moved aside
    first and removed after the rename (only with ``overwrite``; otherwise
    :class:`VolumeError` before anything is written). Other arrays of the group (the raw
    image beside its segmentation, say) are left alone. Structured arrays (tables such as
    origins) become a subgroup with one 1-D array per field. 3-D volumes are chunked
    ``chunks`` (default 64^3, clipped to the shape); attributes as for HDF5 (JSON for dicts).
    A replaced array's directory keeps its mode. ``drop``: arrays of the group removed before
    the arrays are committed (those present need ``overwrite`` too; :func:`zarr_remove`).
    """
    root_path = os.fspath(store)
    attrs = dict(attrs or {})
    targets = {check_dataset_name(root_path, name): np.asarray(arr) for name, arr in arrays.items()}
    if not targets:
        raise VolumeError(f"{root_path}: no arrays to write")
    drop = [check_dataset_name(root_path, n) for n in drop if str(n).strip("/") not in targets]
    for name, arr in targets.items():
        if arr.dtype.names is None and arr.dtype.kind not in "biuf":
            raise VolumeError(f"{root_path}/{name}: unsupported dtype {arr.dtype}")
    for name in list(targets) + drop:
        if os.path.exists(os.path.join(root_path, name)) and not overwrite:
            raise VolumeError(f"{root_path}/{name} exists; pass overwrite=True")
    enc = {name: zarr_attrs(name, attrs.get(name)) for name in targets}
    group = open_zarr_group(root_path)
    tag = str(os.getpid())
    with disk_errors(root_path):
        zarr_remove(root_path, drop, zarr_tmp_name(next(iter(targets)), tag))
    for name, arr in targets.items():
        tmp_name = zarr_tmp_name(name, tag)
        tmp_path = os.path.join(root_path, tmp_name)
        shutil.rmtree(tmp_path, ignore_errors=True)  # a crashed run's leftover
        try:
            with disk_errors(os.path.join(root_path, name)):
                _zarr_write_one(group, root_path, tmp_name, name, tag, arr, enc[name], chunks)
        except BaseException:
            shutil.rmtree(tmp_path, ignore_errors=True)
            raise
    fsync_dir(root_path)
    logger.debug("wrote %s (%s)", root_path, ", ".join(targets))
    return root_path


def _zarr_write_one(group: Any, root_path: str, tmp_name: str, name: str, tag: str, arr: np.ndarray,
                    attrs: Mapping[str, Any], chunks: Sequence[int] | None) -> None:
    """One array (or table) of :func:`write_zarr_atomic`: built under ``tmp_name``, then committed."""
    if arr.dtype.names is not None:  # a table: one array per field
        target_obj = zarr_put_table(group, tmp_name, arr)
    else:
        target_obj = _zarr_create(group, tmp_name, arr.shape, arr.dtype, _zarr_chunks(arr.shape, chunks))
        if arr.size:
            target_obj[...] = arr
    for k, v in attrs.items():
        target_obj.attrs[k] = v
    zarr_commit(group, root_path, tmp_name, name, tag)


def write_arrays(path: PathLike, arrays: Mapping[str, np.ndarray],
                 attrs: Mapping[str, Mapping[str, Any]] | None = None, overwrite: bool = False,
                 drop: Sequence[str] = ()) -> str:
    """Named arrays (volumes or tables) with their attributes into the HDF5 file or the zarr
    group at ``path`` (by its suffix), atomically, keeping everything else there except the
    datasets named in ``drop``, which are removed by the same write (:func:`write_hdf5_atomic`,
    :func:`write_zarr_atomic`). The one way this package writes results."""
    if os.fspath(path).lower().endswith(".zarr"):
        return write_zarr_atomic(path, arrays, attrs=attrs, overwrite=overwrite, drop=drop)
    return write_hdf5_atomic(path, arrays, attrs=attrs, overwrite=overwrite, drop=drop)


def zarr_tmp_name(name: str, tag: str) -> str:
    """The hidden name an array of a zarr group is built under before :func:`zarr_commit`."""
    return f".{name.strip('/').replace('/', '_')}.tmp-{tag}"


def zarr_attrs(name: str, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes as zarr stores them (JSON types; dicts and arrays as for HDF5)."""
    return {str(k): decode_attr(encode_attr(f"{name}:{k}", v)) for k, v in (attrs or {}).items()}


def open_zarr_group(store: PathLike) -> Any:
    """The zarr group at ``store``, created when missing (:class:`VolumeError` otherwise)."""
    zarr = import_zarr()
    root_path = os.fspath(store)
    if os.path.exists(root_path) and not os.path.isdir(root_path):
        raise VolumeError(f"{root_path}: exists and is not a zarr store (directory)")
    try:
        return zarr.open_group(root_path, mode="a")
    except Exception as exc:  # zarr raises various types across versions
        raise VolumeError(f"{root_path}: cannot open or create a zarr group: {exc}") from None


def zarr_create_volume(group: Any, name: str, shape, dtype, chunks: Sequence[int] | None = None) -> Any:
    """An empty (zero-filled, nothing stored) 3-D array ``name`` in a zarr group."""
    return _zarr_create(group, name, tuple(shape), np.dtype(dtype), _zarr_chunks(tuple(shape), chunks))


def zarr_put_table(group: Any, name: str, table: np.ndarray) -> Any:
    """A structured array as a subgroup ``name`` with one 1-D array per field."""
    sub = group.create_group(name)
    for field in table.dtype.names:
        col = np.ascontiguousarray(table[field])
        z = _zarr_create(sub, field, col.shape, col.dtype, _zarr_chunks(col.shape, None))
        if col.size:
            z[...] = col
    sub.attrs["columns"] = list(table.dtype.names)
    return sub


def zarr_remove(root_path: PathLike, names: Sequence[str], aside: str) -> list[str]:
    """Removes the arrays (or tables) ``names`` of the zarr group at ``root_path`` that exist:
    each is first renamed to the hidden ``<aside>.drop-<name>`` (so a kill never leaves half an
    array under its name; ``aside`` is a temporary name of the write, whose leftovers the
    output's lock removes), then deleted. Returns the names removed."""
    root_path = os.fspath(root_path)
    gone = []
    for name in names:
        path = os.path.join(root_path, name.strip("/"))
        if not os.path.lexists(path):
            continue
        hidden = os.path.join(root_path, f"{aside}.drop-{name.strip('/').replace('/', '_')}")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True) if os.path.isdir(hidden) else os.remove(hidden)
        gone.append(name)
    if gone:
        fsync_dir(root_path)
        logger.info("%s: removed %s (belonging to the result replaced)", root_path, ", ".join(gone))
    return gone


def zarr_commit(group: Any, root_path: str, tmp_name: str, name: str, tag: str) -> None:
    """Renames the finished ``tmp_name`` of the group onto ``name`` (an existing ``name`` is
    moved aside first and removed after the rename; the new directory gets its mode and,
    where this process may set them, owner and group)."""
    final = os.path.join(root_path, name)
    old = None
    if os.path.exists(final):
        disk.keep_identity(os.path.join(root_path, tmp_name), os.stat(final))
        old = os.path.join(root_path, f".{name.replace('/', '_')}.old-{tag}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    parent = name.rpartition("/")[0]
    if parent:  # intermediate groups, with their metadata
        group.require_group(parent)
    os.replace(os.path.join(root_path, tmp_name), final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_volume(
    spec: PathLike | VolumeSpec,
    array: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    compression: str | None = "gzip",
) -> VolumeSpec:
    """Write one 3-D array as ``file.h5:dataset`` atomically (into an existing HDF5 file its
    other datasets are kept; an existing dataset of that name is replaced only with
    ``overwrite=True``, :func:`write_hdf5_atomic`). Returns the parsed spec. ``dir.zarr/array``
    writes that array of the zarr group (:func:`write_zarr_atomic`; other arrays stay)."""
    parsed = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec)
    arr = np.asarray(array)
    check_volume_array(str(parsed), arr.shape, arr.dtype)
    if parsed.kind == "zarr":
        if not parsed.dataset:
            raise VolumeError(f"{parsed}: name the array to write, as {parsed.path}/ARRAY")
        write_zarr_atomic(parsed.path, {parsed.dataset: arr}, attrs={parsed.dataset: dict(attrs or {})},
                          overwrite=overwrite)
        return parsed
    assert parsed.dataset is not None
    write_hdf5_atomic(
        parsed.path,
        {parsed.dataset: arr},
        attrs={parsed.dataset: dict(attrs or {})},
        overwrite=overwrite,
        compression=compression,
    )
    return parsed
