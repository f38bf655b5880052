"""The file system under every write: atomic files (:func:`atomic_path`, a temporary file
beside the target, fsynced and renamed onto it; :func:`atomic_write_bytes`), leftovers of
killed writers (:func:`remove_temporaries`), free-space checks before every HDF5 write
(:class:`SpaceCheck`) and operating-system errors as one line naming the file
(:func:`os_error_text`, :func:`disk_errors`: no space, read-only, permission, not a directory).
Every failure is a :class:`~floodfilling.errors.VolumeError`. Arrays and tables in HDF5 files
and zarr groups are written by :mod:`floodfilling.storage` on top of these.

File identity: a write into an existing file keeps the file (:func:`commit_file`). A symbolic
link is written through, to the file it points to (:func:`real_path`, resolved once at the
start; the temporary lies beside that file, the link stays a link; a dangling link or a loop
is refused). The new content gets the old file's mode and, where the process may set them,
its owner and group. A file with several hard links cannot be renamed onto without breaking
them, so its new content is copied into the file itself, journalled: the complete temporary is
renamed to ``FILE.journal-<pid>``, copied in place, fsynced, and only then removed. A copy cut
short (a kill, a full disk) leaves the file incomplete and the journal complete; the next
writer of the file completes it first (:func:`complete_journals`: under the output's lock, from
:func:`remove_temporaries`, and before any write through :func:`atomic_path`), or ``cp
FILE.journal-<pid> FILE`` does by hand. A new file gets the process's default mode (umask).
"""

from __future__ import annotations

import contextlib
import errno
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


def fsync_file(path) -> None:
    """The file's data on disk (every writer's, through any descriptor)."""
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


def real_path(path: PathLike) -> str:
    """The file a write of ``path`` goes to: ``path`` itself, or the file a symbolic link
    ``path`` points to (fully resolved; the link itself stays). :class:`VolumeError` for a
    dangling link or a loop of links (nothing is created through them)."""
    p = os.fspath(path)
    if not os.path.islink(p):
        return p
    try:
        return os.path.realpath(p, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VolumeError(f"cannot write {p}: a loop of symbolic links; point the link at a file or remove "
                              "it") from None
        raise VolumeError(f"cannot write {p}: a symbolic link to {os.readlink(p)}, which does not exist; create "
                          "that file or remove the link") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def journal_path(target: str) -> str:
    """The journal of an in-place write of ``target`` by this process (:func:`commit_file`)."""
    return f"{target}.journal-{os.getpid()}"


def complete_journals(path: PathLike, all_writers: bool = False) -> int:
    """Completes the in-place writes of ``path`` (a file with several hard links) that a killed
    writer cut short: each ``PATH.journal-<pid>`` (a complete new content, oldest first) is
    copied into the file, which is fsynced, then the journal is removed; a warning says so.
    Journals of a live process are left alone unless ``all_writers`` (the caller holds the
    output's lock, so no other writer is running). Returns how many were completed."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    if not os.path.isdir(directory):
        return 0
    found = []
    for name in os.listdir(directory):
        if not name.startswith(base + ".journal-"):
            continue
        tag = name[len(base) + len(".journal-"):]
        if not all_writers and tag.isdigit() and int(tag) != os.getpid() and _pid_alive(int(tag)):
            continue
        p = os.path.join(directory, name)
        found.append((os.stat(p).st_mtime, p))
    for _, journal in sorted(found):
        with disk_errors(target, "completing the interrupted write of"):
            if os.path.lexists(target):
                _copy_into(journal, target)
            else:  # the file itself is gone: its content comes back (its other links keep the old one)
                os.replace(journal, target)
                fsync_dir(directory)
        logger.warning("%s: completed an interrupted in-place write (a file with several hard links) from %s",
                       target, journal)
    return len(found)


def _copy_into(journal: str, target: str, dst=None) -> None:
    """The bytes of ``journal`` into the file ``target`` itself (same inode: its hard links see
    them), fsynced; then the journal is removed."""
    own = dst is None
    if own:
        dst = open(target, "r+b")
    try:
        with open(journal, "rb") as src:
            dst.seek(0)
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.truncate()
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        if own:
            dst.close()
    os.remove(journal)
    fsync_dir(os.path.dirname(os.path.abspath(target)))


def keep_identity(path: str, st: os.stat_result) -> None:
    """``path`` (a new file or directory about to replace one with ``st``) gets its owner and
    group (where this process may set them) and its mode."""
    if (st.st_uid, st.st_gid) != (os.stat(path).st_uid, os.stat(path).st_gid):
        try:
            os.chown(path, st.st_uid, st.st_gid)
        except OSError:  # not permitted (not root, not in the group): the new file stays ours
            try:
                os.chown(path, -1, st.st_gid)
            except OSError:
                logger.debug("%s: could not keep the owner/group of the file it replaces", path)
    os.chmod(path, st.st_mode & 0o7777)


def commit_file(tmp: PathLike, target: PathLike) -> None:
    """The complete (fsynced) file ``tmp`` becomes ``target`` (a real path, :func:`real_path`),
    keeping an existing ``target``'s identity: its mode and owner/group (the rename's new file
    gets them), and, when it has several hard links, its inode (journalled copy in place, see
    the module docstring). A new ``target`` keeps ``tmp``'s default mode. ``OSError`` passes
    (callers wrap it, :func:`disk_errors`); a copy cut short says where its journal is."""
    tmp, target = os.fspath(tmp), os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is None or st.st_nlink <= 1:
        if st is not None:
            keep_identity(tmp, st)
        os.replace(tmp, target)
        fsync_dir(directory)
        return
    extra = os.stat(tmp).st_size - st.st_size  # the copy overwrites the old bytes in place
    SpaceCheck(target).need(max(0, extra))
    dst = open(target, "r+b")  # can it be written at all? (before anything changes)
    try:
        journal = journal_path(target)
        os.replace(tmp, journal)
        fsync_dir(directory)
        try:
            _copy_into(journal, target, dst)
        except OSError as exc:
            raise VolumeError(f"{os_error_text(exc, target)}; {target} (a file with {st.st_nlink} hard links, "
                              f"written in place) is incomplete: its new content is complete in {journal}, which "
                              f"the next run writing it copies in (or: cp {journal} {target})") from None
    finally:
        dst.close()


def remove_temporaries(path: PathLike) -> int:
    """Removes ``PATH.tmp-*`` left beside ``path`` by a killed writer and completes its
    interrupted in-place writes (:func:`complete_journals`; call while holding the output's
    lock, :mod:`floodfilling.locks`); a symbolic link ``path``: those beside the file it points
    to. Returns how many temporaries were removed."""
    p = os.fspath(path)
    target = os.path.abspath(p)
    if os.path.islink(p):
        try:
            target = real_path(p)
        except VolumeError:
            pass  # dangling: nothing was written through it
    complete_journals(target, all_writers=True)
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
    """Yield a temporary file path next to ``path``; on success, fsync it and make it ``path``
    (:func:`commit_file`: renamed onto it, keeping an existing file's mode, owner and hard
    links); on any exception, remove it and re-raise (``path`` is left untouched).

    A symbolic link ``path`` is written through (:func:`real_path`); the temporary is
    ``FILE + ".tmp-<pid>"`` beside the file written (same directory, so the rename is atomic).
    An interrupted in-place write of the file is completed first (:func:`complete_journals`).
    With ``overwrite=False`` an existing ``path`` raises :class:`VolumeError` before anything
    is written; so does an existing file this process may not write. Files only (not
    directories). Operating-system errors (no space, read-only file system, permissions)
    become one-line :class:`VolumeError` naming ``path``.
    """
    target = real_path(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise VolumeError(f"cannot write {target}: {directory} exists and is not a directory")
        raise VolumeError(f"{target}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise VolumeError(f"{target}: is a directory")
    if not overwrite and os.path.exists(target):
        raise VolumeError(f"{target} exists; pass overwrite=True")
    check_file_writable(target)
    complete_journals(target)
    tmp = f"{target}.tmp-{os.getpid()}"
    _remove_quietly(tmp)  # stale leftover of a crashed process with the same pid
    try:
        with disk_errors(target):
            yield tmp
            if not os.path.isfile(tmp):
                raise VolumeError(f"{target}: nothing was written to the temporary file {tmp}")
            fsync_file(tmp)
            commit_file(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def check_file_writable(target: PathLike) -> None:
    """An existing file ``target`` this process may not write (its mode, a read-only file
    system) is never replaced: :class:`VolumeError` naming it (a new file passes)."""
    target = os.fspath(target)
    if not os.path.isfile(target) or os.access(target, os.W_OK):
        return
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            raise VolumeError(f"cannot write {target}: read-only file system")
    except OSError:  # pragma: no cover
        pass
    mode = os.stat(target).st_mode & 0o777
    raise VolumeError(f"cannot write {target}: permission denied (the file's mode is {mode:03o}; make it "
                      "writable, chmod u+w, or choose another output)")


def atomic_write_npz(path: PathLike, **arrays) -> None:
    """``np.savez`` of ``arrays`` to ``path`` atomically (made in memory first, so a full disk is
    a one-line error that leaves no temporary file and the previous file intact)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
