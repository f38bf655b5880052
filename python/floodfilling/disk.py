"""The file system under every write: atomic files (:func:`atomic_path`, a temporary file
beside the target, fsynced and renamed onto it; :func:`atomic_write_bytes`), leftovers of
killed writers (:func:`remove_temporaries`), free-space checks before every HDF5 write
(:class:`SpaceCheck`) and operating-system errors as one line naming the file
(:func:`os_error_text`, :func:`disk_errors`: no space, read-only, permission, not a directory).
Every failure is a :class:`~floodfilling.errors.VolumeError`. Arrays and tables in HDF5 files
and zarr groups are written by :mod:`floodfilling.storage` on top of these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Iterator

from .errors import VolumeError
from .volumes import PathLike

logger = logging.getLogger(__name__)


def fsync_dir(directory: str) -> None:
    """Persist a rename (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    if not os.path.lexists(path):
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover
        logger.warning("could not remove temporary file %s: %s", path, exc)


def os_error_text(exc: OSError, target: PathLike, doing: str = "writing") -> str:
    """One line for an operating-system error while ``doing`` ``target``: the cause in words
    (no space, read-only, permission, not a directory) and the path."""
    import errno

    target = os.fspath(target)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while {doing} {target}"
    if code == errno.EROFS:
        return f"cannot write {target}: read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {target}: permission denied ({exc.filename or target})"
    if code in (errno.ENOTDIR, errno.EEXIST) and exc.filename:
        culprit = up = os.fspath(exc.filename)
        while up and not (os.path.lexists(up) and not os.path.isdir(up)) and os.path.dirname(up) != up:
            up = os.path.dirname(up)
        if up and os.path.lexists(up) and not os.path.isdir(up):  # the regular file on the way
            culprit = up
        return f"cannot write {target}: {culprit} exists and is not a directory"
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"error while {doing} {target}: {first}"


@contextlib.contextmanager
def disk_errors(target: PathLike, doing: str = "writing") -> Iterator[None]:
    """Turns an ``OSError`` raised inside into a :class:`VolumeError` of one line naming
    ``target`` (:func:`os_error_text`); other exceptions pass unchanged."""
    try:
        yield
    except VolumeError:
        raise
    except OSError as exc:
        raise VolumeError(os_error_text(exc, target, doing)) from None


# Free space kept in hand beyond what a write needs: HDF5 writes its metadata on close, and
# HDF5 (h5py 3) crashes the process (SIGSEGV) when a write fails for lack of space, so every
# HDF5 write of this package first checks that its bytes fit (see :class:`SpaceCheck`).
SPACE_MARGIN_BYTES = 1 << 20


class SpaceCheck:
    """Checks before each write into ``directory`` that ``nbytes`` (an upper bound of what the
    write adds) plus :data:`SPACE_MARGIN_BYTES` are free; :class:`VolumeError` ("no space left
    on device while writing TARGET") otherwise, before anything is written. A write that fills
    the disk anyway (another process writing at the same time, quotas) still fails, but HDF5
    is never asked to write into a full disk when this package alone fills it."""

    def __init__(self, target: PathLike, directory: PathLike | None = None) -> None:
        self.target = os.fspath(target)
        self.directory = os.fspath(directory) if directory is not None else \
            os.path.dirname(os.path.abspath(self.target))

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return int(st.f_bavail) * int(st.f_frsize)

    def need(self, nbytes: int) -> None:
        free = self.free_bytes()
        if free < int(nbytes) + SPACE_MARGIN_BYTES:
            raise VolumeError(f"no space left on device while writing {self.target} "
                              f"({free / 2**20:.1f} MiB free, {(int(nbytes) + SPACE_MARGIN_BYTES) / 2**20:.1f} "
                              f"MiB needed)")


def remove_temporaries(path: PathLike) -> int:
    """Removes ``PATH.tmp-*`` left beside ``path`` by a killed writer (call while holding the
    output's lock, :mod:`floodfilling.locks`); returns how many were removed."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    n = 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(base + ".tmp-"):
                p = os.path.join(directory, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else _remove_quietly(p)
                n += 1
    if n:
        logger.info("removed %d temporary file(s) of an interrupted write of %s", n, target)
    return n


@contextlib.contextmanager
def atomic_path(path: PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary file path next to ``path``; on success, fsync it and ``os.replace``
    it onto ``path``; on any exception, remove it and re-raise (``path`` is left untouched).

    The temporary name is ``path + ".tmp-<pid>"`` (same directory, so the rename is atomic).
    With ``overwrite=False`` an existing ``path`` raises :class:`VolumeError` before anything
    is written. Files only (not directories). Operating-system errors (no space, read-only
    file system, permissions) become one-line :class:`VolumeError` naming ``path``.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise VolumeError(f"cannot write {target}: {directory} exists and is not a directory")
        raise VolumeError(f"{target}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise VolumeError(f"{target}: is a directory")
    if not overwrite and os.path.exists(target):
        raise VolumeError(f"{target} exists; pass overwrite=True")
    tmp = f"{target}.tmp-{os.getpid()}"
    _remove_quietly(tmp)  # stale leftover of a crashed process with the same pid
    try:
        with disk_errors(target):
            yield tmp
            if not os.path.isfile(tmp):
                raise VolumeError(f"{target}: nothing was written to the temporary file {tmp}")
            _fsync_file(tmp)
            os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
