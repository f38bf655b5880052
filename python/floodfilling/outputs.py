"""The rules an output obeys, checked before any work (:func:`check_output`): it never replaces
an input (files compared by identity), an existing output needs ``overwrite``, a group or a
file that is not HDF5 is never replaced, and its directory can be written.
"""

from __future__ import annotations

import os
from typing import Sequence

from .disk import os_error_text
from .errors import VolumeError
from .storage import existing_hdf5, existing_hdf5_names
from .volumes import PathLike, VolumeSpec, import_zarr, parse_volume_spec


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
    """Checks an output spec before any work; returns it parsed, :class:`VolumeError` otherwise.

    - A zarr output names its array (and zarr is installed).
    - No input is ever replaced: none of the datasets to be written (``names``: default the
      output dataset alone; ``ffn segment`` adds its ``_origins`` and ``_overlaps``) may be
      (or contain, or lie inside) one of ``inputs``, the volumes the same command reads, in
      the same file or zarr group. Files are compared by identity (symlinks resolved, same
      inode), not by their names. ``overwrite`` does not lift this.
    - HDF5: something at the path that is not an HDF5 file is refused; an existing dataset of
      ``names`` needs ``overwrite`` (the file's other datasets are always kept, see
      :func:`write_hdf5_atomic`). Zarr: an existing array of ``names`` needs ``overwrite``.
    - The directory that receives the output can be written (not a regular file on the way,
      not a read-only file system).
    """
    out = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec)
    if out.kind == "zarr":
        if not out.dataset:
            raise VolumeError(f"output {out.path}: name the array to write, as {out.path}/ARRAY")
        import_zarr()
    names = [n.strip("/") for n in (names if names is not None else [str(out.dataset)])]
    sep = "/" if out.kind == "zarr" else ":"
    for inp in inputs:
        if inp is None:
            continue
        ip = inp if isinstance(inp, VolumeSpec) else parse_volume_spec(inp)
        if ip.kind != out.kind or not same_path(ip.path, out.path):
            continue
        for n in names:
            if ip.dataset is None or names_clash(n, ip.dataset):
                raise VolumeError(f"output {out.path}{sep}{n} would replace the input {ip}; write the output to "
                                  f"another dataset or file")
    there = existing_outputs(out, names)
    if there and not overwrite:
        if out.kind == "zarr":
            raise VolumeError(f"output {os.path.join(out.path, there[0])} exists; pass overwrite=True to replace it")
        raise VolumeError(f"output {out.path}{sep}{there[0]} exists; pass overwrite=True to replace it (the "
                          "file's other datasets are kept)")
    in_store = out.kind == "zarr" and os.path.isdir(out.path)
    _writable_dir_check(str(out), out.path if in_store else os.path.dirname(os.path.abspath(out.path)))
    return out


def existing_outputs(out: VolumeSpec, names: Sequence[str]) -> list[str]:
    """Those of the datasets ``names`` that exist in the output file or zarr group ``out``;
    :class:`VolumeError` when something that is not an HDF5 file (or not a zarr store) is at
    its path (never written into or replaced)."""
    if out.kind == "zarr":
        if os.path.lexists(out.path) and not os.path.isdir(out.path):
            raise VolumeError(f"output {out.path}: exists and is not a zarr store (directory)")
        return [n for n in names if os.path.exists(os.path.join(out.path, n))]
    if not existing_hdf5(out.path):
        return []
    return existing_hdf5_names(out.path, names)
