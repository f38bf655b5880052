"""Block inference: ``[mpiexec -n N] ffn segment IMAGE OUT --block z,y,x [--halo z,y,x] [--workdir DIR]``.

Phases (every rank runs this function; rank 0 is also a worker):

1. **Plan** (rank 0, result broadcast): parse and validate the options, open the volume,
   compute ONE normalisation for the whole volume, build the block grid (:mod:`.blocks`),
   check/write ``DIR/manifest.json`` (a workdir of a different image, box, model, options or
   geometry is an error, or is cleared with ``--overwrite``), take the workdir lock
   (``DIR/run.json``) and remove what a killed run left (claims, temporary files).
2. **Blocks** (all ranks, dynamic): a rank takes the next block by creating its claim file
   ``DIR/claims/<name>`` with ``O_CREAT | O_EXCL`` (atomic on POSIX file systems, Lustre and
   GPFS included), so a slow block never idles other ranks and no scheduler is needed. Ranks
   start their scan at different blocks (rank r at block r*n/N) to avoid contention. Each rank
   keeps ``inflight`` blocks active in the multi-canvas engine; a finished block is written
   atomically to ``DIR/blocks/<name>.h5`` (temp + fsync + rename): segmentation of the outer
   box, local origins and the ids present in the core. A block whose file exists is done and
   skipped on a rerun; claims of a previous (killed) run are removed in phase 1.
3. **Reconcile** (pairs spread over ranks, union-find on rank 0, :mod:`.reconcile`): match
   objects in every overlap, merge, number the objects 1..N.
4. **Write**: each block's core, relabelled, into ``OUT`` with ``<ds>_origins``.
   HDF5 (``out.h5:ds``): always into a temporary file ``OUT.tmp-<run id>`` that rank 0 renames
   onto ``OUT`` at the very end, so nothing half-written is ever at ``OUT``. One rank: rank 0
   writes a chunked, gzip-compressed dataset. Several ranks: rank 0 creates the file with the
   dataset allocated contiguous and uncompressed, and every rank writes the cores of its
   blocks straight into it (``pwrite`` at the dataset's byte offset; no parallel HDF5 needed),
   so writing scales with the ranks (``h5repack -f GZIP=4`` compresses it afterwards if wanted).
   Zarr (``out.zarr/ds``): the array is built under a hidden name in the group
   (``.ds.tmp-<run id>``) and renamed onto ``ds`` at the end (other arrays of the group, the raw
   image say, stay). Its chunks divide the block shape, so every chunk lies in exactly one
   block's core (diagram below) and the ranks write their cores concurrently, compressed,
   without ever sharing a chunk::

       z=0        block 128          256              box stop
       |  chunk 64 | chunk 64 | chunk 64 | chunk 64 | chunk (partial)
       |<----- core of block 0 ------>|<---- core of block 1 ---->|...

Killing any rank at any moment (mpiexec then ends the others) and rerunning the same command
finishes the job with the same output. A rerun after ``OUT`` was written does nothing.
One job per workdir at a time (checked through ``DIR/run.json`` on the same host).

Block results depend only on the block (its image, the global normalisation, the model and
options), never on the rank that ran it or on ``inflight`` (on CPU every FOV runs at batch 1;
with several threads per rank, bitwise equality across thread counts is up to the BLAS/oneDNN
build, so compare runs at the same ``--threads``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import kernels, locks, volumes
from ..config import InferenceConfig
from ..model import load_model, select_device
from ..normalise import Normalisation
from . import mpi, split
from .blocks import DEFAULT_BLOCK, Block, BlockError, BlockGrid, fmt_zyx, make_grid, parse_zyx
from .reconcile import GlobalLabels, MergeRule, global_labels, match_overlap, relabel_core

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "floodfilling-blocks/1"
# options that do not change block results (left out of the manifest)
_NOT_IN_MANIFEST = ("device", "threads", "checkpoint_interval_s", "split_components", "dust_size",
                    "merge_min_fraction", "merge_min_voxels", "merge_min_iou")


@dataclass
class Plan:
    image_spec: str
    box: volumes.BBox
    resolution: tuple | None
    grid: BlockGrid
    norm: Normalisation
    workdir: str
    out_path: str
    out_ds: str
    manifest: dict
    digest: str
    run_id: str
    rule: MergeRule
    out_kind: str = "hdf5"  # "hdf5" (out_path is the file) or "zarr" (out_path is the group's directory)
    n_done: int = 0
    complete: bool = False
    out_digest: str = ""
    lock: Path | None = None  # the output's lock (rank 0 holds it from the plan to the rename)

    @property
    def blocks_dir(self) -> Path:
        return Path(self.workdir) / "blocks"

    @property
    def claims_dir(self) -> Path:
        return Path(self.workdir) / "claims"

    def block_path(self, b: Block) -> Path:
        return self.blocks_dir / f"{b.name(self.box.start)}.h5"


@dataclass
class BlocksResult:
    """Summary of a block run (the same on every rank)."""

    out: str
    workdir: str
    n_objects: int = 0
    n_blocks: int = 0
    blocks_run: int = 0  # blocks segmented by this invocation (all ranks)
    blocks_skipped: int = 0  # blocks found finished at the start
    n_pairs: int = 0
    n_merges: int = 0
    ranks: int = 1
    counters: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    already_complete: bool = False


# -- small helpers ------------------------------------------------------------------------

def _file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _canonical(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True))


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _h5_attr(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


# -- phase 1: plan ------------------------------------------------------------------------

def _plan(image_spec: str, out_spec: str, block, halo, workdir, info, model_path: str, cfg: InferenceConfig,
          bbox, overwrite: bool, rule: MergeRule, run_id: str, size: int) -> Plan:
    from ..inference.segment import resolve_normalisation

    if cfg.seed_policy == "invert_origins":
        raise BlockError("option seed_policy='invert_origins' is not supported with block inference (--block): "
                         "each block seeds itself; run the whole volume without --block")
    out = volumes.parse_volume_spec(out_spec)
    if out.kind == "zarr" and not out.dataset:
        raise BlockError(f"output {out}: name the array to write, as {out.path}/ARRAY")
    out_path = Path(out.path)
    wd = Path(workdir) if workdir else out_path.with_name(out_path.name + ".blocks")
    if wd.exists() and not wd.is_dir():
        raise BlockError(f"--workdir {wd}: exists and is not a directory")
    mpath = wd / "manifest.json"
    old = None
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
            if old.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {old.get('format')!r}")
        except (ValueError, OSError) as exc:
            raise BlockError(f"--workdir {wd}: unreadable manifest.json ({exc}); use another --workdir or delete it") from None
    fov = tuple(info.fov_zyx)
    default_halo = tuple(f // 2 + d for f, d in zip(fov, info.deltas_zyx))
    if block is not None:
        block_v = parse_zyx(block, "--block", 1)
    else:
        block_v = tuple(old["block"]) if old and not overwrite else DEFAULT_BLOCK
    if halo is not None:
        halo_v = parse_zyx(halo, "--halo", 0)
    else:
        halo_v = tuple(old["halo"]) if old and not overwrite else default_halo
    with volumes.open_volume(image_spec) as vol:
        try:
            box = volumes.BBox.parse(bbox) if bbox else volumes.BBox.from_shape(vol.shape)
            box.validate(vol.shape)
        except volumes.VolumeError:
            raise
        except ValueError as exc:
            raise BlockError(f"--bbox {bbox}: {exc}") from None
        grid = make_grid(box.shape, block_v, halo_v, fov)
        norm = resolve_normalisation(cfg, info, vol, image_spec)  # one normalisation for the whole volume
        res = vol.resolution_zyx_nm
        vshape, vdtype = list(vol.shape), str(vol.dtype)
        ipath, ids = volumes.parse_volume_spec(image_spec)
    manifest = _canonical({
        "format": MANIFEST_FORMAT,
        "image": f"{os.path.abspath(ipath)}:{ids}",
        "image_shape": vshape,
        "image_dtype": vdtype,
        "bbox": [list(box.start), list(box.stop)],
        "block": list(block_v),
        "halo": list(halo_v),
        "model": _file_digest(model_path),
        "fov_zyx": list(fov),
        "deltas_zyx": list(info.deltas_zyx),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_MANIFEST},
        "normalisation": norm.to_dict(),
    })
    digest = _digest(manifest)
    out_digest = _digest({"blocks": digest, "merge_rule": rule.to_dict(), "dust_size": int(cfg.dust_size),
                          "split_components": bool(cfg.split_components)})
    plan = Plan(image_spec, box, res, grid, norm, str(wd), str(out_path), str(out.dataset), manifest, digest,
                run_id, rule, out_kind=out.kind, out_digest=out_digest)

    # an existing output: ours and complete -> nothing to do; anything else needs --overwrite
    names = [plan.out_ds, f"{plan.out_ds}_origins"]
    volumes.check_output(out, overwrite=True, names=names, inputs=[image_spec])  # never an input, writable
    if volumes.existing_outputs(out, names) and not overwrite:
        if _output_digest(plan) == out_digest:
            plan.complete = True
        else:
            raise BlockError(f"output {out} exists; pass --overwrite to replace it")

    if old is not None and old != manifest:
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if not overwrite:
            raise BlockError(f"--workdir {wd} holds blocks of a different run (differs in: {', '.join(diff)}); "
                             "use another --workdir, the same options as before, or --overwrite to discard them")
        log.warning("--overwrite: discarding the blocks in %s (a different run: %s)", wd, ", ".join(diff))
    _take_lock(wd, run_id, size)
    if not plan.complete:
        plan.lock = locks.acquire(out, names, workdir=str(wd.resolve()))
    if old is not None and old != manifest:
        _clear_workdir(wd)
    for d in (plan.blocks_dir, plan.claims_dir):
        d.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(plan)
    volumes.atomic_write_bytes(mpath, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    plan.n_done = sum(1 for b in grid if plan.block_path(b).exists())
    return plan


def _output_digest(plan: Plan) -> str | None:
    try:
        if plan.out_kind == "zarr":
            zarr = volumes._import_zarr()
            v = zarr.open_array(os.path.join(plan.out_path, plan.out_ds), mode="r").attrs.get("block_manifest")
        else:
            import h5py

            with h5py.File(plan.out_path, "r") as f:
                v = f[plan.out_ds].attrs.get("block_manifest")
        return v.decode() if isinstance(v, bytes) else (str(v) if v is not None else None)
    except Exception:  # noqa: BLE001 - not ours / unreadable: treated as foreign
        return None


def _take_lock(wd: Path, run_id: str, size: int) -> None:
    wd.mkdir(parents=True, exist_ok=True)
    lock = wd / "run.json"
    host = socket.gethostname()
    if lock.exists():
        try:
            cur = json.loads(lock.read_text())
        except (ValueError, OSError):
            cur = {}
        pid = int(cur.get("pid", -1))
        if cur.get("host") == host and pid > 0 and pid != os.getpid() and locks.pid_alive(pid):
            raise BlockError(f"--workdir {wd} is in use by a running job (pid {pid} on {host}, started "
                             f"{cur.get('started', '?')}); wait for it or stop it first")
        if cur.get("host") not in (None, host):
            log.warning("%s: taking over the workdir from a job on host %s (cannot check whether it still runs; "
                        "one job per workdir)", wd, cur.get("host"))
    volumes.atomic_write_bytes(lock, json.dumps({"run_id": run_id, "host": host, "pid": os.getpid(), "ranks": size,
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())


def _clear_workdir(wd: Path) -> None:
    """Removes our files only (blocks, claims, manifest)."""
    for sub in ("blocks", "claims"):
        d = wd / sub
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.name.startswith("seg_"):
                    p.unlink()
    for name in ("manifest.json", "reconcile.json"):
        (wd / name).unlink(missing_ok=True)
    _remove_split_dirs(wd)


def _cleanup_stale(plan: Plan) -> None:
    """Claims and temporary files of a killed run (we hold the workdir lock)."""
    n = 0
    for p in plan.claims_dir.iterdir():
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    for p in plan.blocks_dir.iterdir():
        if ".tmp-" in p.name:
            p.unlink(missing_ok=True)
    _remove_split_dirs(plan.workdir)  # component volumes of a killed split_components run
    out = Path(plan.out_path)
    if plan.out_kind == "zarr":
        where = out
        names = [volumes.zarr_tmp_name(n, "") for n in (plan.out_ds, f"{plan.out_ds}_origins")]
    else:
        where, names = out.parent, [out.name + ".tmp-"]
    if where.is_dir():
        for p in where.iterdir():
            pre = next((n for n in names if p.name.startswith(n)), None)
            suffix = p.name[len(pre):] if pre else ""
            if len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix) and suffix != plan.run_id:
                # the output of a killed block run (we hold the workdir lock)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if n:
        log.info("removed %d stale block claims of an interrupted run", n)


# -- phase 2: blocks ------------------------------------------------------------------------

class _Ticket:
    __slots__ = ("block", "t0")

    def __init__(self):
        self.block: Block | None = None
        self.t0 = 0.0


def _rank_device_threads(cfg: InferenceConfig, comm: mpi.Comm) -> tuple[str, int]:
    dev = select_device(cfg.device)
    device = str(cfg.device)
    if comm.local_size > 1 and dev.type in ("cuda", "xpu") and dev.index is None:
        import torch

        count = torch.cuda.device_count() if dev.type == "cuda" else torch.xpu.device_count()
        device = f"{dev.type}:{comm.local_rank % max(count, 1)}"
    threads = int(cfg.threads)
    if threads == 0 and comm.local_size > 1 and dev.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // comm.local_size)
    return device, threads


def _run_blocks(plan: Plan, net, info, cfg: InferenceConfig, comm: mpi.Comm, inflight: int | None,
                progress: bool) -> dict:
    from ..inference import seeds as seeds_mod
    from ..inference.engine import Job, make_predictor, run_jobs
    from ..inference.segment import origins_table

    grid = plan.grid
    n = len(grid)
    device, threads = _rank_device_threads(cfg, comm)
    if threads > 0:
        kernels.set_num_threads(threads)
    dev = select_device(device)
    # GPU default: two alternating groups of 8 (batch 8 keeps a GPU busy on 33^3 FOVs; unmeasured)
    k = int(inflight) if inflight else (1 if dev.type == "cpu" else 16)
    if k < 1:
        raise BlockError(f"--inflight {inflight}: must be >= 1")
    predictor = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=dev, threads=threads, inflight=k)
    log.info("rank %d/%d: device %s, %d thread(s), %d block(s) in flight", comm.rank, comm.size, device,
             threads, k)
    fov = tuple(info.fov_zyx)
    margin = tuple(f // 2 for f in fov)
    host, pid = socket.gethostname(), os.getpid()
    start = (comm.rank * n) // comm.size
    order = iter([(start + i) % n for i in range(n)])
    exhausted = [False]
    stats = {"blocks": 0, "steps": 0, "seconds": 0.0, "voxels": 0}

    def claim_next() -> Block | None:
        if exhausted[0]:
            return None
        for i in order:
            b = grid[i]
            if plan.block_path(b).exists():
                continue
            try:
                fd = os.open(plan.claims_dir / b.name(plan.box.start), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, f"{plan.run_id} {host} {pid} {comm.rank}\n".encode())
            finally:
                os.close(fd)
            return b
        exhausted[0] = True
        return None

    vol = volumes.open_volume(plan.image_spec)
    bar = None
    if progress and comm.is_root:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=plan.n_done, unit="block", desc=f"segment ({comm.size} rank"
                   f"{'s' if comm.size > 1 else ''})", dynamic_ncols=True)
    last_sync = [time.monotonic()]

    def make(t: _Ticket):
        b = claim_next()
        if b is None:  # nothing left: an empty canvas finishes at once
            return predictor.new_canvas(np.zeros(fov, np.float32), np.zeros((0, 3), np.int64), cfg, info.deltas_zyx)
        t.block, t.t0 = b, time.perf_counter()
        box = volumes.BBox(tuple(s + o for s, o in zip(plan.box.start, b.outer_start)),
                           tuple(s + o for s, o in zip(plan.box.start, b.outer_stop)))
        image = plan.norm.apply(vol.read(box), f"{plan.image_spec} block {box}")
        seeds = seeds_mod.make_seeds(cfg.seed_policy, image, margin, plan.resolution or (1, 1, 1),
                                     min_distance=cfg.seed_min_distance, grid_step=cfg.seed_grid_step)
        log.debug("rank %d: block %d %s: %d seeds", comm.rank, b.index, box, len(seeds))
        return predictor.new_canvas(image, seeds, cfg, info.deltas_zyx)

    def on_done(t: _Ticket, cv) -> None:
        b = t.block
        if b is None:
            return
        seg = cv.final_segmentation()
        core_ids, core_counts = np.unique(seg[b.core_in_outer], return_counts=True)
        core_ids, core_counts = core_ids[core_ids > 0], core_counts[core_ids > 0]
        secs = time.perf_counter() - t.t0
        counters = {k2: float(v) for k2, v in cv.state.counters.items()}
        volumes.write_hdf5_atomic(
            plan.block_path(b),
            {"seg": seg, "origins": origins_table(cv.state.origins), "core_ids": core_ids.astype(np.uint32),
             "core_counts": core_counts.astype(np.int64)},
            file_attrs={"core_start": list(b.core_start), "core_stop": list(b.core_stop),
                        "outer_start": list(b.outer_start), "outer_stop": list(b.outer_stop),
                        "box_start": list(plan.box.start), "max_id": int(cv.state.max_id),
                        "counters": json.dumps(counters), "seconds": secs, "manifest": plan.digest,
                        "rank": comm.rank, "host": host},
            overwrite=True, compression="gzip")
        stats["blocks"] += 1
        stats["steps"] += int(counters.get("steps", 0))
        stats["seconds"] += secs
        stats["voxels"] += b.outer_voxels
        log.info("rank %d: block %d/%d %s: %d objects, %d steps, %.1f s", comm.rank, b.index + 1, n,
                 b.name(plan.box.start), int(counters.get("objects", 0)), int(counters.get("steps", 0)), secs)
        if bar is not None:
            if time.monotonic() - last_sync[0] > 10:  # other ranks' blocks too
                bar.n = sum(1 for p in plan.blocks_dir.iterdir() if p.name.endswith(".h5"))
                last_sync[0] = time.monotonic()
                bar.refresh()
            else:
                bar.update(1)

    tickets = [_Ticket() for _ in range(n - plan.n_done)]
    try:
        run_jobs([Job(t, (lambda t=t: make(t))) for t in tickets], predictor, inflight=k, on_done=on_done)
    finally:
        vol.close()
        if bar is not None:
            bar.close()
    return stats


# -- phase 3 + 4: reconcile, write -------------------------------------------------------------

def _read_region(path: Path, start, stop) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            o = f.attrs["outer_start"]
            sl = tuple(slice(int(a) - int(p), int(b) - int(p)) for a, b, p in zip(start, stop, o))
            return np.ascontiguousarray(f["seg"][sl])
    except (OSError, KeyError) as exc:
        raise BlockError(f"{path}: unreadable block result ({exc}); delete it and rerun") from None


def _read_meta(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {"max_id": int(f.attrs["max_id"]), "core_ids": f["core_ids"][:], "core_counts": f["core_counts"][:],
                    "origins": f["origins"][:], "counters": json.loads(f.attrs["counters"]),
                    "seconds": float(f.attrs["seconds"]), "outer_start": tuple(int(v) for v in f.attrs["outer_start"])}
    except (OSError, KeyError, ValueError) as exc:
        raise BlockError(f"{path}: unreadable block result ({exc}); delete it and rerun") from None


def _match_pairs(plan: Plan, mine: list[tuple[int, int]]) -> tuple[list, dict]:
    out = []
    t = {"pairs": 0, "read_s": 0.0, "match_s": 0.0, "voxels": 0, "candidates": 0}
    for i, j in mine:
        ov = plan.grid.overlap(i, j)
        if ov is None:
            continue
        t0 = time.perf_counter()
        a = _read_region(plan.block_path(plan.grid[i]), *ov)
        b = _read_region(plan.block_path(plan.grid[j]), *ov)
        t1 = time.perf_counter()
        m = match_overlap(a, b, plan.rule)
        t["read_s"] += t1 - t0
        t["match_s"] += time.perf_counter() - t1
        t["pairs"] += 1
        t["voxels"] += a.size
        t["candidates"] += len(m.pairs)
        if m.merge.any():
            out.append((i, j, m.edges))
    return out, t


def _origin_rows(plan: Plan, lab: GlobalLabels, metas: dict[int, dict]) -> dict[str, np.ndarray]:
    """Every block's origins in box coordinates: provisional id, seed, steps, seconds, whether the
    seed lies in its own block's core, and the object's final id (0: dropped)."""
    prov, seeds, steps, secs, incore = [], [], [], [], []
    for k, b in enumerate(plan.grid):
        o = metas[k]["origins"]
        if not len(o):
            continue
        s = np.stack([o["z"], o["y"], o["x"]], axis=1) + np.asarray(b.outer_start)
        prov.append(o["id"].astype(np.uint64) + lab.offsets[k])
        seeds.append(s.astype(np.int64))
        steps.append(o["steps"])
        secs.append(o["seconds"])
        incore.append(np.all((s >= np.asarray(b.core_start)) & (s < np.asarray(b.core_stop)), axis=1))
    if not prov:
        return {"prov": np.zeros(0, np.uint64), "seeds": np.zeros((0, 3), np.int64), "steps": np.zeros(0, np.int64),
                "seconds": np.zeros(0), "incore": np.zeros(0, bool), "final": np.zeros(0, np.uint64)}
    prov_a = np.concatenate(prov)
    return {"prov": prov_a, "seeds": np.concatenate(seeds), "steps": np.concatenate(steps),
            "seconds": np.concatenate(secs), "incore": np.concatenate(incore), "final": lab.final_of(prov_a)}


def _origins_table(rows: dict[str, np.ndarray], n_objects: int, dense: bool = True) -> np.ndarray:
    """One row per final object (``dense``: all of 1..N; else those holding an origin): the seed
    of a member whose seed lies in its block's core, smallest provisional id first; steps and
    seconds summed over the members."""
    from ..inference.segment import ORIGIN_DTYPE

    fin = rows["final"]
    keep = fin > 0
    prov, seeds, steps, secs, incore, fin = (rows[c][keep] for c in ("prov", "seeds", "steps", "seconds", "incore",
                                                                     "final"))
    if dense:
        ids = np.arange(1, n_objects + 1, dtype=np.uint64)
    else:
        ids = np.unique(fin)
    if not ids.size:
        return np.zeros(0, ORIGIN_DTYPE)
    order = np.lexsort((prov, ~incore, fin))
    first = order[np.r_[True, fin[order][1:] != fin[order][:-1]]] if fin.size else order
    row = np.searchsorted(ids, fin)  # fin is in ids
    tab = np.zeros(ids.size, ORIGIN_DTYPE)
    tab["id"] = ids
    r = row[first]
    tab["z"][r], tab["y"][r], tab["x"][r] = seeds[first, 0], seeds[first, 1], seeds[first, 2]
    tab["steps"] = np.bincount(row, weights=steps, minlength=ids.size).astype(np.int64)
    tab["seconds"] = np.bincount(row, weights=secs, minlength=ids.size)
    return tab


@dataclass
class _Final:
    """What the output is written from: per block, core ids -> output ids."""

    n_objects: int
    keys: list  # per block: sorted ids found in the core source
    values: list  # per block: their output ids (0: removed)
    origins: np.ndarray
    n_merges: int = 0
    comp_dir: Path | None = None  # split_components: cores come from the component volumes here

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.n_objects < 2**32 else np.dtype(np.uint64)

    def items(self, blocks) -> list:
        return [(k, self.keys[k], self.values[k]) for k in blocks]


@contextlib.contextmanager
def _discard_output_on_error(plan: Plan) -> Iterator[None]:
    """On an error while writing the output (no space left, say): the temporary output is
    removed and the output's lock released, on the rank that raised (rank 0 holds the lock);
    the blocks stay in the workdir for the rerun."""
    try:
        yield
    except BaseException:
        tmp = _tmp_output(plan)
        if plan.out_kind == "zarr":
            for p in (tmp, Path(plan.out_path) / volumes.zarr_tmp_name(f"{plan.out_ds}_origins", plan.run_id)):
                shutil.rmtree(p, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if plan.lock is not None:
            locks.release(plan.lock)
        raise


def _tmp_output(plan: Plan) -> Path:
    """HDF5: the temporary output file. Zarr: the hidden array in the output group."""
    if plan.out_kind == "zarr":
        return Path(plan.out_path) / volumes.zarr_tmp_name(plan.out_ds, plan.run_id)
    return Path(plan.out_path).with_name(Path(plan.out_path).name + f".tmp-{plan.run_id}")


def zarr_chunks_for(block) -> tuple[int, ...]:
    """Zarr chunk shape for block output: per axis the largest divisor of the block size that
    is <= 64, or the block size itself when that divisor would be < 16 (a prime block size,
    say). Dividing the block size makes every chunk lie inside one block's core."""
    out = []
    for b in block:
        b = int(b)
        c = max(d for d in range(1, min(b, 64) + 1) if b % d == 0)
        out.append(c if c >= 16 or c == b else b)
    return tuple(out)


def _cores(plan: Plan, items, dtype, comp_dir: Path | None = None):
    """(slices into the output, relabelled core) of each ``(block, keys, values)``; the core is
    the block result's, or with ``comp_dir`` its component volume (split_components)."""
    for k, keys, values in items:
        b = plan.grid[k]
        if comp_dir is not None:
            src = split.read_components(comp_dir / f"{b.name(plan.box.start)}.h5")
        else:
            src = _read_region(plan.block_path(b), b.core_start, b.core_stop)
        yield tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop)), relabel_core(src, keys, values,
                                                                                           np.dtype(dtype))


def _create_output_zarr(plan: Plan, fin: _Final, attrs: dict, parallel: bool) -> None:
    tmp = _tmp_output(plan)
    tmp_org = Path(plan.out_path) / volumes.zarr_tmp_name(f"{plan.out_ds}_origins", plan.run_id)
    for p in (tmp, tmp_org):
        shutil.rmtree(p, ignore_errors=True)
    group = volumes.open_zarr_group(plan.out_path)
    z = volumes.zarr_create_volume(group, tmp.name, plan.box.shape, fin.dtype, zarr_chunks_for(plan.grid.block))
    for key, v in volumes.zarr_attrs(plan.out_ds, {k: v for k, v in attrs.items() if v is not None}).items():
        z.attrs[key] = v
    volumes.zarr_put_table(group, tmp_org.name, fin.origins)
    if not parallel:
        _write_cores_zarr(plan, fin.dtype, fin.items(range(len(plan.grid))), fin.comp_dir, z)


def _write_cores_zarr(plan: Plan, dtype, items, comp_dir: Path | None = None, z=None) -> int:
    """Writes relabelled cores into the hidden zarr array (chunks never straddle two cores)."""
    if z is None:
        z = volumes._import_zarr().open_array(str(_tmp_output(plan)), mode="r+")
    written = 0
    for sl, core in _cores(plan, items, dtype, comp_dir):
        z[sl] = core
        written += core.nbytes
    return written


def _create_output(plan: Plan, fin: _Final, attrs: dict, parallel: bool) -> int | None:
    """Rank 0: writes the output file at its temporary path: the segmentation dataset with its
    attributes and ``<ds>_origins``. Single writer: fills the segmentation (chunked, gzip).
    Parallel: allocates it contiguous and uncompressed (no fill) and returns its byte offset
    in the file, where every rank then writes its blocks' cores (:func:`_pwrite_cores`)."""
    import h5py

    if plan.out_kind == "zarr":
        _create_output_zarr(plan, fin, attrs, parallel)
        return None
    tmp = _tmp_output(plan)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shape = plan.box.shape
    offset = None
    names = [plan.out_ds, f"{plan.out_ds}_origins"]
    space = volumes.SpaceCheck(plan.out_path)
    with h5py.File(tmp, "w") as f:
        if os.path.exists(plan.out_path):  # an existing file (check_output saw to it): its other datasets stay
            volumes.hdf5_copy_others(plan.out_path, f, names, space)
        if parallel:
            space.need(int(np.prod(shape)) * fin.dtype.itemsize + fin.origins.nbytes)  # the ranks' pwrites fill it
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            d = f.create_dataset(plan.out_ds, shape=shape, dtype=fin.dtype.newbyteorder("<"), dcpl=dcpl)
            offset = int(d.id.get_offset())
        else:
            d = f.create_dataset(plan.out_ds, shape=shape, dtype=fin.dtype, chunks=tuple(min(64, s) for s in shape),
                                 compression="gzip", fillvalue=0)
            for sl, core in _cores(plan, fin.items(range(len(plan.grid))), fin.dtype, fin.comp_dir):
                space.need(core.nbytes)
                d[sl] = core
        for key, v in attrs.items():
            if v is not None:
                d.attrs[key] = _h5_attr(v)
        f.create_dataset(f"{plan.out_ds}_origins", data=fin.origins)
        f.flush()
    return offset


def _pwrite_cores(plan: Plan, offset: int, dtype: np.dtype, items, comp_dir: Path | None = None) -> int:
    """Writes relabelled cores straight into the contiguous dataset at ``offset`` of the
    temporary output (C order, little-endian); returns the bytes written."""
    shape = plan.box.shape
    isz = np.dtype(dtype).itemsize
    fd = os.open(_tmp_output(plan), os.O_WRONLY)
    written = 0
    try:
        for sl, core in _cores(plan, items, dtype, comp_dir):
            core = core.astype(np.dtype(dtype).newbyteorder("<"), copy=False)
            (z0, y0, x0), (cz, cy, cx) = (s.start for s in sl), core.shape
            if cx == shape[2]:  # whole rows: one write per z plane
                for z in range(cz):
                    buf = core[z].tobytes()
                    os.pwrite(fd, buf, offset + ((z0 + z) * shape[1] + y0) * shape[2] * isz)
                    written += len(buf)
            else:
                for z in range(cz):
                    for y in range(cy):
                        buf = core[z, y].tobytes()
                        os.pwrite(fd, buf, offset + (((z0 + z) * shape[1] + y0 + y) * shape[2] + x0) * isz)
                        written += len(buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


# -- the driver ------------------------------------------------------------------------------

def segment_blocks(image_spec: str, out_spec: str, *, block=None, halo=None, workdir=None, model=None,
                   config: InferenceConfig | None = None, bbox=None, overwrite: bool = False,
                   inflight: int | None = None, progress: bool = False, merge_rule: MergeRule | None = None,
                   comm: mpi.Comm | None = None) -> BlocksResult:
    """Segments ``image_spec`` block by block (on every rank of an MPI launch) into ``out_spec``.

    ``block``/``halo``: "z,y,x" strings or 3-sequences (default block 128,256,256, halo the
    FOV radius + deltas; on a rerun, those recorded in the workdir); ``workdir``: block results
    and manifest (default ``OUT.blocks`` next to the output file); ``merge_rule``: overlap rule
    (default from ``config``'s ``merge_*`` options, see :mod:`.reconcile`). User errors raise
    :class:`~.blocks.BlockError` (a ValueError) with a one-line message on every rank.
    """
    t_start = time.perf_counter()
    comm = comm or mpi.world()
    cfg = (config or InferenceConfig()).validate()
    rule = (merge_rule or MergeRule.from_config(cfg)).validate()
    if inflight is not None and int(inflight) < 1:
        raise BlockError(f"--inflight {inflight}: must be >= 1")
    net, info = comm.collective(lambda: load_model(model, "cpu"))
    run_id = uuid.uuid4().hex[:12]
    plan: Plan = comm.on_root(lambda: _plan(image_spec, out_spec, block, halo, workdir, info, info.source, cfg,
                                            bbox, overwrite, rule, run_id, comm.size))
    n = len(plan.grid)
    if plan.complete:
        if comm.is_root:
            log.info("%s is already complete (blocks in %s); nothing to do", plan.out_path, plan.workdir)
            _finish_workdir(plan)
        comm.wait_all()
        return BlocksResult(plan.out_path, plan.workdir, n_blocks=n, blocks_skipped=n, ranks=comm.size,
                            already_complete=True)
    if comm.is_root:
        log.info("%d blocks (grid %s, block %s, halo %s; halo overhead %.0f%%), %d already done, %d rank(s)",
                 n, fmt_zyx(plan.grid.grid_shape), fmt_zyx(plan.grid.block), fmt_zyx(plan.grid.halo),
                 100 * plan.grid.halo_overhead(), plan.n_done, comm.size)
    t_plan = time.perf_counter() - t_start

    # phase 2: blocks
    with comm.abort_on_error("block inference"):
        stats = _run_blocks(plan, net, info, cfg, comm, inflight, progress)
    t_idle0 = time.perf_counter()
    comm.wait_all()
    t_blocks_end = time.perf_counter()

    # phase 3: matching, spread over ranks
    pairs = plan.grid.pairs()
    with comm.abort_on_error("reconciliation"):
        missing = [b.index for b in plan.grid if not plan.block_path(b).exists()] if comm.is_root else []
        if missing:
            raise BlockError(f"{len(missing)} block result(s) missing after all ranks finished "
                             f"(first: {plan.block_path(plan.grid[missing[0]])})")
        edges, mt = _match_pairs(plan, pairs[comm.rank::comm.size])
        metas = {k: _read_meta(plan.block_path(plan.grid[k])) for k in range(comm.rank, n, comm.size)}
    gathered = comm.gather((edges, mt, metas, stats, t_blocks_end - t_idle0), root=0)
    t_match_end = time.perf_counter()

    # phase 4: union-find (rank 0); split_components (all ranks, :mod:`.split`); output written
    # by rank 0 alone (1 rank) or by all ranks
    parallel = comm.size > 1
    rec, per_rank, fin = None, None, None
    if comm.is_root:
        with comm.abort_on_error("reconciliation"):
            rec = _reconcile(plan, gathered, cfg, info, comm.size,
                             {"plan_s": t_plan, "blocks_s": t_blocks_end - t_plan - t_start,
                              "match_s": t_match_end - t_blocks_end})
    if cfg.split_components:
        t0 = time.perf_counter()
        with comm.abort_on_error("splitting components"):
            fin = _split_components(plan, rec, comm, int(cfg.dust_size))
        if comm.is_root:
            rec["timings"]["split_s"] = time.perf_counter() - t0
    elif comm.is_root:
        lab = rec["lab"]
        fin = _Final(lab.n_objects, lab.keys, lab.values,
                     _origins_table(_origin_rows(plan, lab, rec["metas"]), lab.n_objects), lab.n_merges)
    if comm.is_root:
        with comm.abort_on_error("writing the output"):
            rec["final"] = fin
            t0 = time.perf_counter()
            with _discard_output_on_error(plan), volumes.disk_errors(plan.out_path):
                offset = _create_output(plan, fin, rec["attrs"], parallel)
            rec["timings"]["create_output_s"] = time.perf_counter() - t0
            if parallel:
                per_rank = [(offset, fin.dtype, fin.items(range(r, n, comm.size)), fin.comp_dir)
                            for r in range(comm.size)]
    if parallel:
        comm.wait_all()  # sleep while rank 0 reconciles
        offset, dtype, items, comp_dir = comm.scatter(per_rank, root=0)
        t0 = time.perf_counter()
        with comm.abort_on_error("writing the output"):
            with _discard_output_on_error(plan), volumes.disk_errors(plan.out_path):
                if plan.out_kind == "zarr":
                    nbytes = _write_cores_zarr(plan, dtype, items, comp_dir)
                else:
                    nbytes = _pwrite_cores(plan, offset, dtype, items, comp_dir)
        wt = comm.gather((time.perf_counter() - t0, nbytes), root=0)
        if comm.is_root:
            rec["timings"]["parallel_write_s_max"] = max(w[0] for w in wt)
            rec["timings"]["parallel_write_bytes"] = sum(w[1] for w in wt)
    summary = None
    if comm.is_root:
        with comm.abort_on_error("writing the output"), _discard_output_on_error(plan):
            summary = _finish(plan, rec, t_match_end)
    comm.wait_all()
    summary = comm.bcast(summary, root=0)
    summary.timings["total_s"] = time.perf_counter() - t_start
    return summary


def _core_block_of(grid, zyx: np.ndarray) -> np.ndarray:
    """Index of the block whose core holds each (z, y, x) (box coordinates)."""
    g = [np.clip(np.searchsorted(grid.bounds[a], zyx[:, a], side="right") - 1, 0, grid.grid_shape[a] - 1)
         for a in range(3)]
    return ((g[0] * grid.grid_shape[1] + g[1]) * grid.grid_shape[2] + g[2]).astype(np.int64)


def _split_components(plan: Plan, rec: dict | None, comm: mpi.Comm, dust_size: int) -> _Final | None:
    """Collective: every object's connected components across blocks (:mod:`.split`). Returns
    the output tables on rank 0 (None elsewhere); the origins table keeps the components that
    hold a seed of their object (as on a whole volume)."""
    n = len(plan.grid)
    sdir = split.split_dir(plan.workdir, plan.run_id)
    per_rank, rows = None, None
    if comm.is_root:
        lab = rec["lab"]
        rows = _origin_rows(plan, lab, rec["metas"])
        owner = _core_block_of(plan.grid, rows["seeds"])
        sdir.mkdir(parents=True, exist_ok=True)
        per_rank = [[(k, lab.keys[k], lab.values[k], np.flatnonzero(owner == k), rows["seeds"][owner == k])
                     for k in range(r, n, comm.size)] for r in range(comm.size)]
    comm.wait_all()  # sleep while rank 0 reconciles
    mine = comm.scatter(per_rank, root=0)

    def path(k: int) -> Path:
        return sdir / f"{plan.grid[k].name(plan.box.start)}.h5"

    comps, hits = {}, []
    for k, keys, values, oidx, seeds in mine:
        b = plan.grid[k]
        core = relabel_core(_read_region(plan.block_path(b), b.core_start, b.core_stop), keys, values, np.uint64)
        comp, cc = split.label_core(core, b.core_start)
        split.write_components(path(k), comp, cc)
        loc = seeds - np.asarray(b.core_start)
        hits.append((k, oidx, comp[loc[:, 0], loc[:, 1], loc[:, 2]]))
        comps[k] = cc
    comm.wait_all()  # every component volume is on disk
    edges = []
    for k, *_ in mine:
        for axis, j in split.face_neighbours(plan.grid, k):
            pi, gi = split.read_plane(path(k), axis, last=True)
            pj, gj = split.read_plane(path(j), axis, last=False)
            e = split.face_edges(pi, pj, gi, gj)
            if len(e):
                edges.append((k, j, e))
    gathered = comm.gather((comps, hits, edges), root=0)
    if not comm.is_root:
        return None
    all_comps, all_hits, all_edges = {}, [], []
    for c, h, e in gathered:
        all_comps.update(c)
        all_hits += h
        all_edges += e
    num = split.number_components([all_comps[k] for k in range(n)], all_edges, dust_size)
    final = np.zeros(rows["final"].size, np.uint64)  # each origin: the component at its seed, if of its object
    for k, oidx, c in all_hits:
        c = c.astype(np.int64)
        ok = c > 0
        ok[ok] = all_comps[k].gid[c[ok] - 1] == rows["final"][oidx[ok]]
        final[oidx[ok]] = num.values[k][c[ok] - 1]
    keys = [np.arange(1, all_comps[k].gid.size + 1, dtype=np.uint64) for k in range(n)]
    log.info("split_components: %d objects -> %d components (%d joins across block faces%s)", rec["lab"].n_objects,
             num.n_objects, num.n_joins, f", dust < {dust_size} removed" if dust_size > 0 else "")
    return _Final(num.n_objects, keys, num.values, _origins_table(dict(rows, final=final), num.n_objects, dense=False),
                  rec["lab"].n_merges, comp_dir=sdir)


def _reconcile(plan: Plan, gathered, cfg, info, size, timings) -> dict:
    t0 = time.perf_counter()
    n = len(plan.grid)
    all_edges, metas, block_stats, idle = [], {}, [], []
    match_t = {"pairs": 0, "read_s": 0.0, "match_s": 0.0, "voxels": 0, "candidates": 0}
    for edges, mt, m, st, wait in gathered:
        all_edges += edges
        metas.update(m)
        block_stats.append(st)
        idle.append(wait)
        for key in match_t:
            match_t[key] += mt[key]
    t1 = time.perf_counter()
    # with split_components, dust is removed after splitting (as on a whole volume)
    lab = global_labels([metas[k]["max_id"] for k in range(n)], [metas[k]["core_ids"] for k in range(n)],
                        all_edges, [metas[k]["core_counts"] for k in range(n)],
                        0 if cfg.split_components else int(cfg.dust_size))
    t2 = time.perf_counter()
    counters: dict[str, float] = {}
    for k in range(n):
        for key, v in metas[k]["counters"].items():
            counters[key] = counters.get(key, 0) + v
    attrs = {
        "resolution_zyx_nm": list(plan.resolution) if plan.resolution is not None else None,
        "bbox_zyx": [list(plan.box.start), list(plan.box.stop)],
        "source_image": plan.image_spec,
        "model": info.source,
        "config": json.dumps(cfg.to_dict()),
        "normalisation": json.dumps(plan.norm.to_dict()),
        "counters": json.dumps(counters),
        "block_zyx": list(plan.grid.block),
        "halo_zyx": list(plan.grid.halo),
        "merge_rule": json.dumps(plan.rule.to_dict()),
        "block_manifest": plan.out_digest,  # blocks + reconciliation options: a rerun's "already complete" test
        "workdir": os.path.abspath(plan.workdir),
    }
    timings = dict(timings, gather_s=t1 - t0, union_find_s=t2 - t1,
                   block_seconds_sum=sum(s["seconds"] for s in block_stats),
                   block_seconds_max_rank=max(s["seconds"] for s in block_stats),
                   wait_for_others_s_max=max(idle), pair_read_s=match_t["read_s"], pair_match_s=match_t["match_s"],
                   pairs_matched=match_t["pairs"], pair_voxels=match_t["voxels"])
    return {"lab": lab, "metas": metas, "attrs": attrs, "counters": counters, "timings": timings,
            "block_stats": block_stats, "candidates": match_t["candidates"], "ranks": size}


def _finish(plan: Plan, rec: dict, t_write0: float) -> BlocksResult:
    """Rank 0: the output goes live (rename), the report is written, the workdir tidied."""
    out = Path(plan.out_path)
    tmp = _tmp_output(plan)
    if plan.out_kind == "zarr":  # the table first: the array (with block_manifest) is the commit
        group = volumes.open_zarr_group(out)
        org = f"{plan.out_ds}_origins"
        volumes.zarr_commit(group, str(out), volumes.zarr_tmp_name(org, plan.run_id), org, plan.run_id)
        volumes.zarr_commit(group, str(out), tmp.name, plan.out_ds, plan.run_id)
        volumes.fsync_dir(str(out.resolve()))
    else:
        os.replace(tmp, out)
        volumes.fsync_dir(str(out.parent.resolve()))
    if plan.lock is not None:
        locks.release(plan.lock)
    lab, timings, block_stats = rec["final"], rec["timings"], rec["block_stats"]
    timings["write_s"] = time.perf_counter() - t_write0 - timings["gather_s"] - timings["union_find_s"]
    n = len(plan.grid)
    run = sum(s["blocks"] for s in block_stats)
    res = BlocksResult(plan.out_path, plan.workdir, n_objects=lab.n_objects, n_blocks=n, blocks_run=run,
                       blocks_skipped=plan.n_done, n_pairs=len(plan.grid.pairs()), n_merges=lab.n_merges,
                       ranks=rec["ranks"], counters=rec["counters"], timings=timings)
    rep = {"n_blocks": n, "grid": list(plan.grid.grid_shape), "block": list(plan.grid.block),
           "halo": list(plan.grid.halo), "halo_overhead": plan.grid.halo_overhead(), "n_pairs": res.n_pairs,
           "candidate_pairs": rec["candidates"], "merges": lab.n_merges, "objects": lab.n_objects,
           "merge_rule": plan.rule.to_dict(), "ranks": rec["ranks"], "blocks_run": run,
           "blocks_skipped": plan.n_done, "writer": "all ranks" if rec["ranks"] > 1 else "rank 0",
           "timings": timings, "per_rank": block_stats}
    volumes.atomic_write_bytes(Path(plan.workdir) / "reconcile.json", (json.dumps(rep, indent=1) + "\n").encode())
    _finish_workdir(plan)
    log.info("wrote %s: %d objects from %d blocks (%d run now, %d reused), %d merges over %d block pairs",
             plan.out_path, lab.n_objects, n, run, plan.n_done, lab.n_merges, res.n_pairs)
    return res


def _remove_split_dirs(workdir: str | Path) -> None:
    for p in Path(workdir).glob("split-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _finish_workdir(plan: Plan) -> None:
    shutil.rmtree(plan.claims_dir, ignore_errors=True)
    _remove_split_dirs(plan.workdir)
    (Path(plan.workdir) / "run.json").unlink(missing_ok=True)
