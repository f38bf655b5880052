"""The plan of a block run and what ties its workdir ``DIR`` (default ``OUT.blocks``; its layout,
claims and cleanup: :mod:`.bookkeeper`) to it: ``DIR/manifest.json`` (what the blocks are of:
image, box, model, options, geometry, normalisation) and ``DIR/run.json`` (the workdir lock: the
job using DIR: run id, host, pid, ranks, start).

Everything in DIR is tied to the image's voxels: the manifest records the image's digest
(:meth:`floodfilling.source.ImageSource.digest`: a digest of the box's voxels, read slab by
slab), so blocks, their reconciliation and the refinement
files of an image rewritten in place (even with the same statistics) are never reused: the run
is refused, naming the digest, as an in-memory resume state of a changed image is (``overwrite``
discards them). The options in the manifest are those of stage ``"flood"``
(:data:`floodfilling.config.OPTION_STAGES`); the later stages' options are in the output's digest
(``Plan.out_digest``), which names the refinement directory.

:func:`make_plan` (rank 0) parses and validates the options, opens the volume, computes ONE
normalisation for the whole volume, builds the block grid, checks the output (an existing one
that this run wrote is complete; anything else needs ``overwrite``), checks/writes the
manifest (a workdir of a different image, box, model, options or geometry is an error, or is
cleared with ``overwrite``), takes the workdir lock and the output's lock
(:func:`floodfilling.locks.acquire`) and removes what a killed run left (claims, temporary
block files, component volumes, temporary outputs). One job per workdir at a time (checked
through ``run.json`` on the same host). A run that fails (any error or an interrupt, in the plan
or later; under ``mpiexec`` before the abort) gives back both locks, its claims, component
volumes and temporary output (:func:`release`); its finished blocks and refinement files stay.
A workdir that is, or lies inside, the output, the image, the model or ``seed_origins`` is
refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import boxes, disk, locks, outputs, results, volumes
from ..source import ImageSource
from ..config import InferenceConfig
from ..geometry import DEFAULT_BLOCK, Block, BlockError, BlockGrid, fov_margin, make_grid
from ..inference import seeds as seeds_mod
from . import bookkeeper, output
from .reconcile import MergeRule

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "floodfilling-blocks/2"  # 2: block files carry their overlaps


@dataclass
class Plan:
    """The bookkeeping of a block run: its blocks (the grid over ``box``), its workdir, its
    output. What the blocks are OF, the image and its normalisation, is the run's
    :class:`~floodfilling.source.ImageSource`, handed to the phases that read the image."""

    box: boxes.BBox  # the box of the image segmented (image coordinates; names the blocks)
    grid: BlockGrid
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
    refine: dict | None = None  # --refine: the [refine] options (RefineConfig.to_dict())

    @property
    def out_names(self) -> tuple[str, ...]:
        """The datasets the run writes: ``<ds>``, ``<ds>_origins`` and, refined, ``<ds>_overlaps``
        and ``<ds>_forward`` (as an in-memory refined run)."""
        if self.refine is not None:
            return tuple(results.result_names(self.out_ds, refined=True))
        return self.out_ds, f"{self.out_ds}_origins"  # (a plain block run records no overlaps)

    @property
    def layout(self) -> bookkeeper.Layout:
        """Every path of the workdir (:mod:`.bookkeeper`)."""
        return bookkeeper.Layout(self.workdir, self.box.start)

    @property
    def refine_dir(self) -> Path:
        """Refinement files of this output, named by its digest (:meth:`.bookkeeper.Layout.refine_dir`)."""
        return self.layout.refine_dir(self.out_digest)

    @property
    def blocks_dir(self) -> Path:
        return self.layout.blocks_dir

    @property
    def claims_dir(self) -> Path:
        return self.layout.claims_dir

    def block_path(self, b: Block) -> Path:
        return self.layout.block_file(b)

    def blocks_stage(self) -> bookkeeper.Stage:
        """The blocks as work items (claims, done)."""
        return bookkeeper.blocks_stage(self.layout, self.grid)


def _canonical(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True))


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check_workdir_place(wd: Path, files: dict[str, str]) -> None:
    """Refuses a workdir that is, or lies inside, a file the run reads or writes (``files``:
    what it is -> path): blocks would be written into it, or it into them."""
    w = Path(os.path.abspath(wd))
    for what, path in files.items():
        if not path:
            continue
        p = Path(os.path.abspath(path))
        same = w == p or outputs.same_path(w, p)
        if same or p in w.parents:
            where = "is" if same else "lies inside"
            raise boxes.ParameterError("workdir", wd, f"workdir={wd}: {where} the {what} {path} (the workdir is a "
                                         "directory of block results); give another workdir=DIR")


def _read_manifest(wd: Path) -> dict | None:
    mpath = bookkeeper.Layout(wd).manifest
    if not mpath.exists():
        return None
    try:
        old = json.loads(mpath.read_text())
        if old.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {old.get('format')!r}")
    except (ValueError, OSError) as exc:
        raise boxes.ParameterError("workdir", wd, f"workdir={wd}: unreadable manifest.json ({exc}); use another "
                                     "workdir=DIR or delete it") from None
    return old


def make_plan(source: ImageSource, out_spec: str, block, halo, workdir, info, model_path: str,
              cfg: InferenceConfig, overwrite: bool, rule: MergeRule, run_id: str, size: int,
              refine: dict | None = None, image_digest: str | None = None) -> tuple[Plan, ImageSource]:
    """Phase 1 (rank 0): see the module docstring. The plan, and ``source`` with the run's one
    normalisation (that of a rerun is the one in the manifest, unless the image changed).
    ``image_digest``: the box's digest (:func:`floodfilling.source.combine_digests`) (computed here when not given)."""
    if not seeds_mod.policy_class(cfg).per_block:
        raise BlockError(f"option seed_policy={cfg.seed_policy!r} is not supported with block inference (each block "
                         "seeds itself); segment the whole volume in one piece")
    out = volumes.parse_volume_spec(out_spec)
    if out.kind == "zarr" and not out.dataset:
        raise BlockError(f"output {out}: name the array to write, as {out.path}/ARRAY")
    out_path = Path(out.path)
    wd = Path(workdir) if workdir else out_path.with_name(out_path.name + ".blocks")
    _check_workdir_place(wd, {"output": str(out_path), "image": source.spec.path,
                              "model": model_path,
                              "seed_origins": volumes.parse_volume_spec(cfg.seed_origins).path if cfg.seed_origins
                              else ""})
    if wd.exists() and not wd.is_dir():
        raise boxes.ParameterError("workdir", wd, f"workdir={wd}: exists and is not a directory")
    old = _read_manifest(wd)
    fov = tuple(info.fov_zyx)
    default_halo = tuple(m + d for m, d in zip(fov_margin(fov), info.deltas_zyx))
    recorded = old if old and not overwrite else {}  # a rerun's geometry: the one in the workdir
    block_v = block if block is not None else recorded.get("block", DEFAULT_BLOCK)
    halo_v = halo if halo is not None else recorded.get("halo", default_halo)
    box = source.box
    grid = make_grid(box.shape, block_v, halo_v, fov)  # checks block and halo
    source = source.normalised(cfg, info)  # one normalisation for the whole volume
    manifest = _canonical({
        "format": MANIFEST_FORMAT,
        "image": source.identity,
        "image_shape": list(source.shape),
        "image_dtype": source.dtype,
        "bbox": [list(box.start), list(box.stop)],
        "block": [int(v) for v in block_v],
        "halo": list(grid.halo),
        "model": results.file_digest(model_path),
        "fov_zyx": list(fov),
        "deltas_zyx": list(info.deltas_zyx),
        "config": cfg.options_of("flood"),  # the later stages' options are in the output's digest
        "normalisation": source.norm.to_dict(),
        "image_digest": image_digest or source.digest(),
    })
    digest = _digest(manifest)
    out_digest = _digest({"blocks": digest, "merge_rule": rule.to_dict(),  # (the "blocks" stage's options)
                          **cfg.options_of("postprocess"), **({"refine": refine} if refine is not None else {})})
    plan = Plan(box, grid, str(wd), str(out_path), str(out.dataset), manifest, digest,
                run_id, rule, out_kind=out.kind, out_digest=out_digest, refine=refine)

    names = list(plan.out_names)
    out = _check_existing_output(plan, out, names, source.spec, overwrite)
    if old is not None and old != manifest:
        _check_other_run(wd, old, manifest, overwrite)
    take_lock(wd, run_id, size)
    try:
        if not plan.complete:
            plan.lock = locks.acquire(out, names, workdir=str(wd.resolve()))
        if old is not None and old != manifest:
            bookkeeper.clear(plan.layout)
        for d in (plan.blocks_dir, plan.claims_dir):
            d.mkdir(parents=True, exist_ok=True)
        plan.blocks_stage().prepare()
        bookkeeper.clean_stale(plan.layout, keep_refine=plan.refine_dir)
        disk.atomic_write_bytes(plan.layout.manifest,
                                (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        plan.n_done = plan.blocks_stage().n_done()
    except BaseException:
        release(plan)
        raise
    return plan, source


def _check_existing_output(plan: Plan, out, names: list[str], image: volumes.VolumeSpec, overwrite: bool):
    """An existing output: ours and complete (its digest) -> the plan is complete, nothing to
    do; anything else needs ``overwrite``. Returns the checked output spec."""
    out = outputs.check_output(out, overwrite=True, names=names, inputs=[image])  # never an input; a link resolved
    if outputs.existing_outputs(out, names) and not overwrite:
        if output.recorded_digest(plan) == plan.out_digest:
            plan.complete = True
        else:
            raise BlockError(f"output {out} exists; pass overwrite=True to replace it")
    return out


def _check_other_run(wd: Path, old: dict, manifest: dict, overwrite: bool) -> None:
    """A workdir holding another run's blocks (its manifest differs) is refused, or with
    ``overwrite`` discarded (by the plan, once it holds the workdir)."""
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    why = ""
    if "image_digest" in diff:
        why = ("; the image's voxels changed since its blocks were made" if "image_digest" in old else
               "; made by an earlier version, which did not record the image's digest")
    if not overwrite:
        raise boxes.ParameterError("workdir", wd, f"workdir={wd} holds blocks of a different run (differs in: "
                                     f"{', '.join(diff)}{why}); use another workdir=DIR, the same options as "
                                     "before, or overwrite=True to discard them")
    log.warning("overwrite=True: discarding the blocks in %s (a different run: %s)", wd, ", ".join(diff))


def take_lock(wd: Path, run_id: str, size: int) -> None:
    """Creates ``wd/run.json`` (one job per workdir), complete or not at all and race-free
    (:func:`locks.create_exclusive`: two jobs starting at once cannot both take it); a
    BlockError when a live job on this host holds it. A lock of a dead job, of this process, a
    damaged one or one of another host (which cannot be checked; a warning) is taken over."""
    wd.mkdir(parents=True, exist_ok=True)
    lock = bookkeeper.Layout(wd).run_lock
    host = socket.gethostname()
    me = json.dumps({"run_id": run_id, "host": host, "pid": os.getpid(), "ranks": size,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    with disk.disk_errors(lock):
        for _attempt in range(5):
            if locks.create_exclusive(lock, me):
                return
            seen = locks.inspect_lock(lock)
            if seen is None:
                continue  # released meanwhile: try again
            holder = seen.holder or {}  # (empty or damaged: taken over)
            pid = int(holder.get("pid", -1))
            if holder.get("host") == host and pid > 0 and pid != os.getpid() and locks.pid_alive(pid):
                raise BlockError(f"workdir={wd} is in use by a running job (pid {pid} on {host}, started "
                                 f"{holder.get('started', '?')}); wait for it or stop it first")
            if holder.get("host") not in (None, host):
                log.warning("%s: taking over the workdir from a job on host %s (cannot check whether it still runs; "
                            "one job per workdir)", wd, holder.get("host"))
            locks.remove_if_unchanged(lock, seen)  # (unless another job took it over meanwhile)
    raise BlockError(f"workdir={wd}: cannot take its lock {lock} (it keeps changing: another job is starting "
                     "on it?); wait for it, or delete that file if no job uses the workdir")


def release(plan: Plan) -> None:
    """Rank 0, when the run fails (any error, or an interrupt): what it holds goes (the temporary
    output, the output's lock, this run's claims and component volumes, the workdir lock); what
    it finished stays for the rerun (blocks, refinement files). Each step is tried on its own."""
    steps = [lambda: output.discard(plan), lambda: bookkeeper.remove_claims(plan.layout, plan.run_id),
             lambda: bookkeeper.remove_split_dirs(plan.layout), lambda: _release_workdir_lock(plan.layout, plan.run_id)]
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the error being raised matters more
            log.debug("releasing %s: %s", plan.workdir, exc)


def _release_workdir_lock(layout: bookkeeper.Layout, run_id: str) -> None:
    """Removes ``DIR/run.json`` if this run holds it."""
    lock = layout.run_lock
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("run_id") == run_id:
        lock.unlink(missing_ok=True)


def write_report(plan: Plan, report: dict) -> None:
    """``DIR/reconcile.json`` (read by ``ffn status``)."""
    disk.atomic_write_bytes(plan.layout.report, (json.dumps(report, indent=1) + "\n").encode())


def tidy(plan: Plan) -> None:
    """Rank 0, at the end: claims, component volumes, refinement files and the workdir lock go;
    blocks stay (:func:`.bookkeeper.tidy`)."""
    bookkeeper.tidy(plan.layout)
