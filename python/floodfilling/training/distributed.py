"""torch.distributed set-up for training under ``mpiexec`` (or torchrun).

Rank and size come from the launcher's environment: MPICH/Intel MPI/Cray PALS (``PMI_RANK``,
``PMI_SIZE``), Open MPI (``OMPI_COMM_WORLD_RANK``/``SIZE``), MVAPICH (``MV2_COMM_WORLD_*``),
Slurm (``SLURM_PROCID``/``SLURM_NTASKS``) or torchrun (``RANK``/``WORLD_SIZE``); when none
is set but mpi4py can tell (an MPI launch with an unknown launcher), from mpi4py.

Rendezvous: ``MASTER_ADDR``/``MASTER_PORT`` from the environment when both are set;
otherwise, with mpi4py, rank 0 picks a free TCP port and broadcasts it (address 127.0.0.1
when every rank runs on rank 0's host, else rank 0's host name); without mpi4py, a file
store in the training directory keyed by the launcher's process id (single node only).

Backends: gloo (cpu), nccl (cuda), xccl or oneCCL's ``ccl`` (xpu).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import select_device

log = logging.getLogger(__name__)

_RANK_VARS = [("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
              ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"), ("PALS_RANKID", "PALS_SIZE"),
              ("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")]
_LOCAL_VARS = ["MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
               "PALS_LOCAL_RANKID", "LOCAL_RANK", "SLURM_LOCALID"]
_LOCAL_SIZE_VARS = ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PALS_LOCAL_SIZE",
                    "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"]
_MPI_HINTS = ["PMI_FD", "PMI_PORT", "PMIX_RANK", "HYDRA_CONTROL_FD"]


class DistributedError(ValueError):
    """A launch that cannot form a process group (one-line message)."""


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialized: bool = False  # whether this module created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi4py_comm():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def detect_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment (0, 1, 0 when not launched in parallel)."""
    env = os.environ
    for rv, sv in _RANK_VARS:
        if rv in env and sv in env:
            try:
                rank, world = int(env[rv]), int(env[sv])
            except ValueError:
                continue
            local = next((int(env[v]) for v in _LOCAL_VARS if env.get(v, "").isdigit()), None)
            return rank, world, rank if local is None else local
    if any(v in env for v in _MPI_HINTS):
        comm = _mpi4py_comm()
        if comm is not None:
            return comm.Get_rank(), comm.Get_size(), comm.Get_rank()
    return 0, 1, 0


def local_size(world: int) -> int:
    """Ranks on this node, from the launcher's environment (``world`` when unknown)."""
    for v in _LOCAL_SIZE_VARS:
        if os.environ.get(v, "").isdigit():
            return max(1, int(os.environ[v]))
    return max(1, world)


def _backend_for(device: torch.device) -> str:
    if device.type == "cuda":
        return "nccl"
    if device.type == "xpu":
        dist = torch.distributed
        if getattr(dist, "is_xccl_available", lambda: False)():
            return "xccl"
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401
        except ImportError:
            raise DistributedError("device=xpu with several ranks needs torch with xccl or "
                                   "oneccl_bindings_for_pytorch (backend 'ccl')") from None
        return "ccl"
    return "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _init_method(rank: int, world: int, workdir: Path) -> str:
    env = os.environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return "env://"
    comm = _mpi4py_comm()
    if comm is not None and comm.Get_size() == world:
        host = socket.gethostname()
        hosts = comm.allgather(host)
        addr = "127.0.0.1" if all(h == hosts[0] for h in hosts) else hosts[0]
        port = comm.bcast(_free_port() if rank == 0 else None, root=0)
        return f"tcp://{addr}:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    key = f"{socket.gethostname()}-{os.getppid()}"
    (log.warning if rank == 0 else log.debug)(
        "no mpi4py and no MASTER_ADDR/MASTER_PORT: using a file rendezvous in %s (single node only; "
        "install floodfilling[mpi] for multi-node runs)", workdir)
    return f"file://{(workdir / f'.rendezvous-{key}').resolve()}"


def setup(device: str = "auto", workdir: str | os.PathLike = ".", timeout_s: float = 600.0) -> DistInfo:
    """Detects the launch, picks this rank's device and joins the process group (world > 1)."""
    rank, world, local = detect_rank_world()
    dev = select_device(device)
    if dev.type in ("cuda", "xpu") and dev.index is None:
        count = torch.cuda.device_count() if dev.type == "cuda" else torch.xpu.device_count()
        dev = torch.device(dev.type, local % max(count, 1))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif dev.type == "xpu":
        torch.xpu.set_device(dev)
    info = DistInfo(rank=rank, world=world, local_rank=local, device=dev)
    if world <= 1:
        return info
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run with one rank")
    if dist.is_initialized():
        info.backend = dist.get_backend()
        return info
    backend = _backend_for(dev)
    method = _init_method(rank, world, Path(workdir))
    log.info("rank %d/%d: %s process group via %s on %s", rank, world, backend, method.split(":")[0], dev)
    dist.init_process_group(backend, init_method=method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    info.backend = backend
    info.initialized = True
    return info


def teardown(info: DistInfo, ok: bool = True) -> None:
    """Leaves the process group; in step with the other ranks when ``ok``.

    Order matters: objects that hold the group (a DDP wrapper's reducer sits in reference
    cycles) are collected first, every rank reaches a barrier, the group is destroyed, and
    with mpi4py the ranks meet once more so that none exits, closing its sockets, while
    another is still inside gloo's teardown. A group left to the interpreter's finalisation,
    or a peer that vanished mid-teardown, aborts a process with "terminate called without an
    active exception" now and then. After a failure (``ok`` False) the other ranks may be
    stuck in a collective, so this rank only destroys its side and leaves: the launcher
    then stops the rest.
    """
    if not (info.initialized and torch.distributed.is_initialized()):
        return
    dist = torch.distributed
    gc.collect()
    if not ok:
        dist.destroy_process_group()
        return
    try:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index or 0])
        else:
            dist.barrier()
    except Exception as exc:  # a peer already failed: still destroy our side  # noqa: BLE001
        log.warning("rank %d: barrier before leaving the process group failed: %s", info.rank, exc)
    dist.destroy_process_group()
    gc.collect()
    comm = _mpi4py_comm()
    if comm is not None and comm.Get_size() == info.world:
        comm.Barrier()


def lr_scale(world: int, mode: str) -> float:
    """Learning-rate multiplier for ``world`` ranks: linear, sqrt or none."""
    if mode == "linear":
        return float(world)
    if mode == "sqrt":
        return float(world) ** 0.5
    if mode == "none":
        return 1.0
    raise DistributedError(f"lr_scaling={mode!r}: expected linear, sqrt or none")
