"""The rules an output obeys, checked before any work (:func:`check_output`): it never replaces
an input (files compared by identity), an existing output needs ``overwrite``, a group or a
file that is not HDF5 is never replaced, its dataset names are sound, a symbolic link is
written through (to a file that exists), and its directory and an existing file can be
written. The datasets that belong to a segmentation result (:func:`companion_names`) are
replaced or removed with it, never left stale beside a new result.
"""

from __future__ import annotations

import os
from typing import Sequence

from .disk import check_file_writable, complete_journals, os_error_text, real_path
from .errors import VolumeError
from .storage import check_dataset_name, existing_hdf5, existing_hdf5_names
from .volumes import PathLike, VolumeSpec, import_zarr, parse_volume_spec

# The datasets that belong to a segmentation result DS besides DS itself (the result format,
# :mod:`floodfilling.results`): its origins and overlaps tables, the flood a refined result was
# refined from, an agglomeration's table of candidates.
COMPANION_SUFFIXES = ("_origins", "_overlaps", "_forward", "_agglomeration")


def companion_names(ds: str) -> list[str]:
    """Every dataset that belongs to the result ``ds`` besides ``ds`` (:data:`COMPANION_SUFFIXES`):
    a write of ``ds`` replaces those it writes and removes the others (they described the
    result it replaces), so no companion of an earlier result is left beside a new one."""
    ds = str(ds).strip("/")
    return [ds + s for s in COMPANION_SUFFIXES]


def companions_not_written(ds: str, names: Sequence[str]) -> list[str]:
    """The companions of the result ``ds`` that a write of the datasets ``names`` does not write
    (they described the result it replaces: removed by the same write)."""
    names = {str(n).strip("/") for n in names}
    return [c for c in companion_names(ds) if c not in names]


def stale_companions(ds: str | None, names: Sequence[str]) -> list[str]:
    """The companions of the result ``ds`` that a write of ``names`` removes: none unless the
    write is a segmentation result (``names`` holds ``ds_origins``), else those it does not
    write (:func:`companions_not_written`)."""
    if ds is None or companion_names(ds)[0] not in {str(n).strip("/") for n in names}:
        return []
    return companions_not_written(ds, names)


def names_clash(a: str, b: str) -> bool:
    """True when writing dataset ``a`` would replace dataset ``b`` of the same file or group
    (equal, or one inside the other: replacing group ``v`` removes ``v/raw``)."""
    a, b = a.strip("/"), b.strip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or directory: by identity (symlinks
    resolved, same device and inode) when both exist, else by resolved absolute path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _writable_dir_check(what: str, directory: str) -> None:
    """``directory`` (created later when missing) can receive files: its nearest existing
    ancestor is a directory and is writable; :class:`VolumeError` naming ``what`` otherwise."""
    d = os.path.abspath(directory)
    while not os.path.lexists(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        raise VolumeError(f"cannot write {what}: {d} exists and is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        import errno

        ro = False
        try:
            ro = bool(os.statvfs(d).f_flag & os.ST_RDONLY)
        except OSError:  # pragma: no cover
            pass
        why = "read-only file system" if ro else "permission denied"
        raise VolumeError(os_error_text(OSError(errno.EROFS if ro else errno.EACCES, why, d), what))


def check_output(spec: PathLike | VolumeSpec, overwrite: bool = False, *, names: Sequence[str] | None = None,
                 inputs: Sequence[PathLike | VolumeSpec | None] = ()) -> VolumeSpec:
    """Checks an output spec before any work; returns it parsed (an HDF5 output that is a
    symbolic link: the file it points to, resolved once here, so that the lock, the temporary
    and the write all go to that file and the link stays), :class:`VolumeError` otherwise.

    - A zarr output names its array (and zarr is installed); dataset names have no empty,
      ``.`` or ``..`` part and no control character.
    - A result (``names`` holds ``<ds>_origins``) also removes the companions of ``ds`` it does
      not write (:func:`stale_companions`): they count as datasets written below.
    - No input is ever replaced: none of the datasets to be written (``names``: default the
      output dataset alone; ``ffn segment`` adds its ``_origins`` and ``_overlaps``) may be
      (or contain, or lie inside) one of ``inputs``, the volumes the same command reads, in
      the same file or zarr group. Files are compared by identity (symlinks resolved, same
      inode), not by their names. ``overwrite`` does not lift this.
    - HDF5: something at the path that is not an HDF5 file is refused; an existing dataset of
      ``names`` needs ``overwrite`` (the file's other datasets are always kept, see
      :func:`write_hdf5_atomic`). Zarr: an existing array of ``names`` needs ``overwrite``.
    - The directory that receives the output can be written (not a regular file on the way,
      not a read-only file system), and so can an existing output file (its mode).
    - A symbolic link (HDF5) points to a file or to nothing yet created: a dangling link or a
      loop is refused; an in-place write of the file that a kill cut short is completed first
      (:func:`floodfilling.disk.complete_journals`).
    """
    out = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec)
    if out.kind == "zarr":
        if not out.dataset:
            raise VolumeError(f"output {out.path}: name the array to write, as {out.path}/ARRAY")
        import_zarr()
    names = [check_dataset_name(f"output {out}", n) for n in (names if names is not None else [str(out.dataset)])]
    stale = stale_companions(out.dataset, names)
    names += stale
    sep = "/" if out.kind == "zarr" else ":"
    if out.kind == "hdf5":
        real = real_path(out.path)
        if VolumeSpec(real, out.dataset).kind != "hdf5":
            raise VolumeError(f"output {out.path}: a symbolic link to {real}, a zarr name; give {real} itself")
        complete_journals(real)  # an in-place write a kill cut short: the file is whole again first
    for inp in inputs:
        if inp is None:
            continue
        ip = inp if isinstance(inp, VolumeSpec) else parse_volume_spec(inp)
        if ip.kind != out.kind or not same_path(ip.path, out.path):
            continue
        for n in names:
            if ip.dataset is None or names_clash(n, ip.dataset):
                what = "replace" if n not in stale else \
                    f"remove (it belongs to the earlier result {out.dataset}, replaced)"
                raise VolumeError(f"output {out.path}{sep}{n} would {what} the input {ip}; write the output to "
                                  f"another dataset or file")
    there = existing_outputs(out, names)
    if there and not overwrite:
        if all(n in stale for n in there):
            raise VolumeError(f"output {out.path}{sep}{there[0]} exists and belongs to a result {out.dataset} (a "
                              f"new {out.dataset} would leave it stale); pass overwrite=True to remove it with that "
                              "result, or choose another dataset name")
        if out.kind == "zarr":
            raise VolumeError(f"output {os.path.join(out.path, there[0])} exists; pass overwrite=True to replace it")
        raise VolumeError(f"output {out.path}{sep}{there[0]} exists; pass overwrite=True to replace it (the "
                          "file's other datasets are kept)")
    in_store = out.kind == "zarr" and os.path.isdir(out.path)
    if out.kind == "hdf5":
        out = VolumeSpec(real, out.dataset)  # writes go through the link, to its file
        check_file_writable(out.path)
    _writable_dir_check(str(out), out.path if in_store else os.path.dirname(os.path.abspath(out.path)))
    return out


def existing_outputs(out: VolumeSpec, names: Sequence[str]) -> list[str]:
    """Those of the datasets ``names`` (and of the companions a result removes,
    :func:`stale_companions`) that exist in the output file or zarr group ``out``;
    :class:`VolumeError` when something that is not an HDF5 file (or not a zarr store) is at
    its path (never written into or replaced), or a group where a dataset goes."""
    names = list(names) + [c for c in stale_companions(out.dataset, names) if c not in names]
    if out.kind == "zarr":
        if os.path.lexists(out.path) and not os.path.isdir(out.path):
            raise VolumeError(f"output {out.path}: exists and is not a zarr store (directory)")
        return [n for n in names if os.path.exists(os.path.join(out.path, n))]
    if not existing_hdf5(out.path):
        return []
    return existing_hdf5_names(out.path, names)
