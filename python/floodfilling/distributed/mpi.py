"""Rank/size helpers for block inference: mpi4py when launched under ``mpiexec``, else one process.

:func:`world` returns a :class:`Comm` with the few collectives block inference needs
(broadcast, gather, a barrier that sleeps instead of spinning, abort). Launched without an
MPI launcher (no ``PMI_RANK``/``OMPI_COMM_WORLD_RANK``/... in the environment) it is a
single-process stand-in and mpi4py is never imported (importing it would initialise MPI).
Launched by ``mpiexec -n N`` (N > 1) without mpi4py installed is an error rather than N
processes that each think they are alone.

Errors: user errors found while planning are *collective* (every rank raises the same
exception, so ``ffn`` prints one line and exits 2 on every rank). Anything that goes wrong
on one rank while ranks work independently must not leave the others waiting forever:
:meth:`Comm.abort_on_error` logs the error and calls ``MPI_Abort`` (mpiexec then ends all
ranks with a non-zero status).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# (rank, size) variables set by common launchers: MPICH/Hydra/Intel MPI, Open MPI, MVAPICH,
# Cray PALS, PMIx.
_LAUNCHER_VARS = [("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"), ("PALS_RANKID", "PALS_SIZE"),
                  ("PMIX_RANK", None)]


class MPIError(ValueError):
    """An MPI launch that cannot work (one-line message)."""


def launcher_rank_size() -> tuple[int, int] | None:
    """(rank, size) from an MPI launcher's environment, or None when not launched by one."""
    env = os.environ
    for rv, sv in _LAUNCHER_VARS:
        if rv in env:
            try:
                return int(env[rv]), int(env[sv]) if sv and sv in env else -1
            except ValueError:
                continue
    return None


class Comm:
    """Single-process communicator (rank 0 of 1); :class:`MPIComm` has the same interface."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list | None:
        return [obj]

    def allgather(self, obj: Any) -> list:
        return [obj]

    def scatter(self, objs: list | None, root: int = 0) -> Any:
        return objs[0]  # type: ignore[index]

    def wait_all(self, poll_s: float = 0.05) -> None:
        """Barrier (no-op for one process)."""

    def abort(self, code: int = 1) -> None:  # pragma: no cover - single process: just exit
        sys.exit(code)

    # -- error handling shared by both implementations -----------------------------------
    def on_root(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on rank 0 only and returns its result on every rank; an exception on
        rank 0 is re-raised on every rank (same type when it can be rebuilt from its message)."""
        res: tuple[str, Any]
        if self.is_root:
            try:
                res = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                if self.size == 1:
                    raise
                res = ("error", _portable(exc))
        else:
            res = ("", None)
        res = self.bcast(res, root=0)
        if res[0] == "error":
            raise res[1]
        return res[1]

    def collective(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on every rank; if it fails on any rank, every rank raises that error
        (the lowest failing rank's), so no rank goes on alone."""
        try:
            out, err = fn(), None
        except Exception as exc:  # noqa: BLE001
            if self.size == 1:
                raise
            out, err = None, _portable(exc)
        errs = self.allgather(None if err is None else (self.rank, err))
        failed = [e for e in errs if e is not None]
        if failed:
            rank, exc = failed[0]
            if rank != self.rank:
                log.debug("rank %d failed: %s", rank, exc)
            raise exc
        return out  # type: ignore[return-value]

    @contextlib.contextmanager
    def releasing(self, fn: Callable[[], None]):
        """Inside: ``fn`` runs once if this rank fails, on an exception (re-raised after it) or,
        under several ranks, in :meth:`abort_on_error` before it aborts."""
        hooks = self.__dict__.setdefault("_on_failure", [])
        hooks.append(fn)
        try:
            yield
        except BaseException:
            if fn in hooks:
                hooks.remove(fn)
                fn()
            raise
        finally:
            if fn in hooks:
                hooks.remove(fn)

    @contextlib.contextmanager
    def abort_on_error(self, what: str = "block inference"):
        """Inside: an exception on one rank logs it and aborts every rank (MPI_Abort);
        with one process it propagates unchanged."""
        if self.size == 1:
            yield
            return
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - includes KeyboardInterrupt
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            log.critical("rank %d of %d: %s failed: %s: %s; aborting all ranks", self.rank, self.size, what,
                         exc.__class__.__name__, msg, exc_info=not isinstance(exc, (ValueError, KeyboardInterrupt)))
            for h in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    h.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            for fn in list(self.__dict__.get("_on_failure", ())):  # what this rank holds (locks, temporaries)
                with contextlib.suppress(Exception):
                    fn()
            time.sleep(0.5)  # MPI_Abort kills at once: give mpiexec time to forward this rank's message
            self.abort(2)
            raise  # pragma: no cover - abort does not return


def _portable(exc: Exception) -> Exception:
    """An exception that survives pickling (same type and message where possible)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        base = ValueError if isinstance(exc, ValueError) else RuntimeError
        return base(str(exc))


class MPIComm(Comm):
    """mpi4py's COMM_WORLD behind the :class:`Comm` interface."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def scatter(self, objs, root=0):
        return self.comm.scatter(objs, root=root)

    def wait_all(self, poll_s: float = 0.05) -> None:
        """Barrier that sleeps between polls (MPI_Barrier spins and would steal the core of a
        rank that is still computing when ranks outnumber cores)."""
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)
        os._exit(code)  # some MPI builds return from MPI_Abort and leave the killing to mpiexec


_WORLD: Comm | None = None


def world() -> Comm:
    """The communicator of this process (cached): MPI under an MPI launcher, else single."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    env = launcher_rank_size()
    if env is None:
        _WORLD = Comm()
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError:
        if env[1] > 1:
            raise MPIError(f"launched by an MPI launcher as rank {env[0]} of {env[1]} but mpi4py is not installed: "
                           "pip install 'floodfilling[mpi]' (or mpi4py built against your MPI)") from None
        _WORLD = Comm()
        return _WORLD
    size = MPI.COMM_WORLD.Get_size()
    if size == 1 and env[1] > 1:
        raise MPIError(f"the launcher started {env[1]} ranks but MPI sees 1: mpiexec and mpi4py come from different "
                       "MPI libraries (use the mpiexec of the MPI that mpi4py was built against)")
    _WORLD = MPIComm(MPI.COMM_WORLD) if size > 1 else Comm()
    return _WORLD
