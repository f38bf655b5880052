"""One writer per output: a lock file beside each output while a command writes it.

``ffn segment``, ``consensus``, ``agglomerate`` and ``prepare`` take the lock of their output
before any work and hold it to the end, so a second command writing the same output fails at
once (naming the process that holds it) instead of computing for minutes and racing the first
one's rename::

    out.h5        -> out.h5.lock             (an HDF5 file is rewritten as a whole: one lock per file)
    vol.zarr/seg  -> vol.zarr.seg.lock       (beside the store: one lock per array of the group)

Other writers lock with :func:`file_lock`: ``ffn train`` its run directory (``OUT/train.lock``),
``ffn export`` a local layer (``DEST.lock``), ``ffn demo`` its directory (``OUT/demo.lock``).

A lock is a small JSON file (host, pid, start time) created complete or not at all
(:func:`create_exclusive`: written to a temporary, fsynced, hard-linked to its name), so a full
disk leaves no lock and a reader never sees a half-written one. A lock left by a killed process
(same host, pid gone) is stale: it is taken over, and the temporaries of the killed write
(``out.h5.tmp-*``, hidden ``.seg.tmp-*`` arrays of a zarr group) are removed. An empty or damaged
lock (an older version, another tool) older than :data:`DAMAGED_LOCK_AGE_S` is taken over with a
warning; a younger one is explained (which file to delete). A lock of another host cannot be
checked and is respected; the message says which file to delete if that job is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import disk, errors, storage, volumes

log = logging.getLogger(__name__)


class LockError(errors.VolumeError):
    """The output is being written by another process (one-line message)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_dead(host: str | None, pid: int) -> bool:
    """True when a lock or claim of ``host``/``pid`` belongs to a process that is gone: only
    decidable on the same host (another host's process is taken as alive)."""
    return host == socket.gethostname() and not pid_alive(pid)


def lock_path_for(out: volumes.VolumeSpec) -> Path:
    """The lock file of an output (see the module docstring)."""
    p = Path(out.path)
    if out.kind == "zarr":
        return p.with_name(f"{p.name}.{str(out.dataset).strip('/').replace('/', '_')}.lock")
    return p.with_name(p.name + ".lock")


# A lock is created complete (:func:`create_exclusive`), so an empty or damaged one was left by an
# older version, another tool or a file system that lost the write: one older than this many
# seconds is taken over (with a warning); a younger one is waited for a moment, then explained.
DAMAGED_LOCK_AGE_S = 10.0
YOUNG_LOCK_WAIT_S = 1.0  # how long a young empty or damaged lock is waited for before the error
# link(2) errors of a file system without hard links: there, O_EXCL creation (see create_exclusive)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _fill(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to the new file ``fd``, fsyncs and closes it."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_plain(path: Path, data: bytes) -> bool:
    """``O_EXCL`` creation (no hard links): a failed write removes the file it created."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        _fill(fd, data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return True


def create_exclusive(path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike | None = None) -> bool:
    """Creates the file ``path`` holding ``data``, complete or not at all (every lock and block
    claim of the package): ``data`` is written to a temporary file beside it
    (``PATH.tmp-<pid>-<random>``) and fsynced, then hard-linked to ``path`` (atomic, and fails when
    ``path`` exists), and the temporary removed. Returns False when ``path`` exists. Any error (no
    space, permission) raises ``OSError`` and leaves nothing. Where the file system has no hard
    links: ``O_EXCL`` creation, a failed write removing the file it created. ``tmp_dir``: where the
    temporary goes instead (same file system; for a directory whose readers list every file, as
    block claims: ``.NAME.tmp-*`` there)."""
    path = Path(path)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = (path.with_name(f"{path.name}.tmp-{token}") if tmp_dir is None
           else Path(tmp_dir) / f".{path.name}.tmp-{token}")
    try:
        _fill(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            # (NFS: a link whose reply was lost is retried and reports EEXIST although it was made;
            # the temporary's link count tells: 2, it is ``path``)
            try:
                return os.stat(tmp).st_nlink == 2
            except OSError:
                return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _create_plain(path, data)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - removed by the next acquire (_remove_lock_temporaries)
            log.warning("could not remove %s: %s", tmp, exc)


def _remove_lock_temporaries(path: Path) -> None:
    """Temporaries of :func:`create_exclusive` left by a creator killed between write and link
    (they live for milliseconds: any older than :data:`DAMAGED_LOCK_AGE_S` is a leftover)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if p.name.startswith(path.name + ".tmp-") and now - p.lstat().st_mtime > DAMAGED_LOCK_AGE_S:
                p.unlink(missing_ok=True)


@dataclass
class SeenLock:
    """A lock file as read: its holder (None: empty or damaged), its text and its stat."""

    holder: dict | None
    text: str
    stat: os.stat_result


def inspect_lock(path: Path) -> SeenLock | None:
    """The lock at ``path`` as read now (None: there is none); its holder is None when it is empty
    or damaged. With :func:`remove_if_unchanged`, how every lock of the package is judged and
    taken over (output locks here, the block runner's workdir lock)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    holder = None
    try:
        h = json.loads(text)
        if isinstance(h, dict) and str(h.get("pid", "")).lstrip("-").isdigit():
            holder = h
    except ValueError:
        pass
    return SeenLock(holder, text, st)


def _read_lock(path: Path) -> dict:
    """The holder of the lock at ``path`` ({} when there is none, or it is empty or damaged)."""
    try:
        seen = inspect_lock(path)
    except OSError:
        return {}
    return (seen.holder or {}) if seen is not None else {}


def remove_if_unchanged(path: Path, seen: SeenLock) -> None:
    """Removes the lock judged stale, unless it was replaced meanwhile (another run took it over)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) == (seen.stat.st_dev, seen.stat.st_ino,
                                                              seen.stat.st_mtime_ns, seen.stat.st_size):
        path.unlink(missing_ok=True)


def _remove_temporaries(out: volumes.VolumeSpec, names: Sequence[str]) -> None:
    if out.kind != "zarr":
        disk.remove_temporaries(out.path)
        return
    store = Path(out.path)
    if not store.is_dir():
        return
    prefixes = [storage.zarr_tmp_name(n, "") for n in names]
    prefixes += [p.replace(".tmp-", ".old-") for p in prefixes]
    for p in store.iterdir():
        if any(p.name.startswith(pre) for pre in prefixes):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", p)


def acquire_file(path: str | os.PathLike, what: str, record: dict | None = None, workdir: str | None = None) -> Path:
    """Creates the lock file ``path`` of ``what`` (an output, a run directory; how messages name
    it) holding host, pid, start time and ``record`` (:func:`create_exclusive`: never empty).
    Held by a live process: :class:`LockError` at once, naming the holder and the file. Taken
    over with a warning: a lock of a dead process on this host, of this process, of an earlier
    run of ``workdir`` (a block run's working directory: its workdir lock proved that run gone),
    and an empty or damaged one older than :data:`DAMAGED_LOCK_AGE_S`; a younger empty or damaged
    one is waited for :data:`YOUNG_LOCK_WAIT_S`, then a :class:`LockError` says which file to
    delete. Operating-system errors (no space) are one-line errors that leave no file."""
    path = Path(path)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          **(record or {})}
    data = (json.dumps(me) + "\n").encode()
    young_since = None
    with disk.disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(100):
            if create_exclusive(path, data):
                break
            seen = inspect_lock(path)
            if seen is None:  # vanished meanwhile: try again
                continue
            cur = seen.holder
            if cur is not None:
                pid = int(cur["pid"])
                if not (pid == os.getpid() or holder_is_dead(cur.get("host"), pid)
                        or (workdir is not None and cur.get("workdir") == workdir)):
                    raise LockError(f"{what} is being written by another run (pid {pid} on {cur.get('host')}, "
                                    f"since {cur.get('started', '?')}); wait for it to finish, or delete {path} "
                                    "if that run is gone")
                log.warning("%s: taking over the lock of a run that is gone (pid %s on %s)", path, pid,
                            cur.get("host"))
                remove_if_unchanged(path, seen)
                continue
            kind = "empty" if not seen.text.strip() else "damaged"
            age = max(time.time() - seen.stat.st_mtime, 0.0)
            if age >= DAMAGED_LOCK_AGE_S:
                log.warning("%s: taking over an %s lock file, %.0f s old (left by a run that failed while "
                            "creating it)", path, kind, age)
                remove_if_unchanged(path, seen)
                continue
            young_since = time.monotonic() if young_since is None else young_since
            if time.monotonic() - young_since >= YOUNG_LOCK_WAIT_S:
                raise LockError(f"{what}: its lock {path} is {kind} and {age:.0f} s old (another run is starting, "
                                f"or one failed while creating it); try again in {DAMAGED_LOCK_AGE_S:.0f} s (it is "
                                f"then taken over), or delete {path} if no other run is starting")
            time.sleep(0.1)
        else:
            raise LockError(f"{what}: cannot take the lock {path} (it keeps changing); try again, or delete {path} "
                            "if no other run is using it")
        _remove_lock_temporaries(path)
    return path


def acquire(out: volumes.VolumeSpec, names: Sequence[str] | None = None, workdir: str | None = None) -> Path:
    """Takes the lock of output ``out`` (:func:`acquire_file`: :class:`LockError` at once when a
    live process holds it) and removes the temporaries of an interrupted write of ``out`` (of
    the arrays ``names`` for zarr; default the output array). ``workdir``: a block run's working
    directory; a lock left by an earlier run of the same workdir is taken over. Returns the
    lock's path, for :func:`release`."""
    path = lock_path_for(out)
    names = list(names) if names is not None else [str(out.dataset)]
    acquire_file(path, f"output {out}", {"output": str(out), "workdir": workdir}, workdir=workdir)
    try:
        _remove_temporaries(out, names)
    except BaseException:
        release(path)
        raise
    return path


def release(path: Path) -> None:
    """Removes a lock taken by :func:`acquire` in this process (another's is left alone)."""
    if _read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(out: volumes.VolumeSpec, names: Sequence[str] | None = None) -> Iterator[Path]:
    """Holds the lock of output ``out`` for the ``with`` block (:func:`acquire`); removed on
    exit, also on errors. A kill leaves it, and the next run takes it over."""
    path = acquire(out, names)
    try:
        yield path
    finally:
        release(path)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, record: dict | None = None) -> Iterator[Path]:
    """Holds the lock file ``path`` of ``what`` (a run directory, an export's layer) for the
    ``with`` block (:func:`acquire_file`); removed on exit, also on errors."""
    lock = acquire_file(path, what, record)
    try:
        yield lock
    finally:
        release(lock)
