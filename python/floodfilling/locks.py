"""One writer per output: a lock file beside each output while a command writes it.

``ffn segment``, ``consensus``, ``agglomerate`` and ``prepare`` take the lock of their output
before any work and hold it to the end, so a second command writing the same output fails at
once (naming the process that holds it) instead of computing for minutes and racing the first
one's rename. The lock is a small JSON file created with ``O_EXCL``::

    out.h5        -> out.h5.lock             (an HDF5 file is rewritten as a whole: one lock per file)
    vol.zarr/seg  -> vol.zarr.seg.lock       (beside the store: one lock per array of the group)

It holds host, pid and start time. A lock left by a killed process (same host, pid gone) is
stale: it is taken over, and the temporaries of the killed write (``out.h5.tmp-*``, hidden
``.seg.tmp-*`` arrays of a zarr group) are removed. A lock of another host cannot be checked
and is respected; the message says which file to delete if that job is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
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


def _read_lock(path: Path) -> dict:
    for _ in range(20):  # a lock being written by its creator: its line appears within moments
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError:
            text = ""
        if text.strip():
            try:
                return json.loads(text)
            except ValueError:
                return {"damaged": text[:80]}
        time.sleep(0.05)
    return {}


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


def acquire(out: volumes.VolumeSpec, names: Sequence[str] | None = None, workdir: str | None = None) -> Path:
    """Takes the lock of output ``out`` (:class:`LockError` at once when a live process holds
    it) and removes the temporaries of an interrupted write of ``out`` (of the arrays ``names``
    for zarr; default the output array). ``workdir``: a block run's working directory; a lock
    left by an earlier run of the same workdir is taken over (its workdir lock proved that run
    gone). Returns the lock's path, for :func:`release`."""
    path = lock_path_for(out)
    names = list(names) if names is not None else [str(out.dataset)]
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "output": str(out), "workdir": workdir}
    with disk.disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cur = _read_lock(path)
                pid = int(cur.get("pid", -1)) if str(cur.get("pid", "")).lstrip("-").isdigit() else -1
                stale = (pid == os.getpid() or holder_is_dead(cur.get("host"), pid) or "damaged" in cur
                         or (workdir is not None and cur.get("workdir") == workdir))
                if cur and stale:
                    log.warning("%s: taking over the lock of a run that is gone (pid %s on %s)", path,
                                cur.get("pid"), cur.get("host"))
                    path.unlink(missing_ok=True)
                    continue
                if not cur:  # vanished or still empty: try again
                    continue
                raise LockError(f"output {out} is being written by another run (pid {cur.get('pid')} on "
                                f"{cur.get('host')}, since {cur.get('started', '?')}); wait for it to finish, or "
                                f"delete {path} if that run is gone")
            try:
                os.write(fd, (json.dumps(me) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            break
        else:
            raise LockError(f"output {out}: cannot take the lock {path} (it keeps changing); is another run "
                            "starting?")
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
