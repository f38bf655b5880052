"""``ffn status WORKDIR``: progress of a block-inference run, read from its workdir alone (from
a login node, while the job runs under the scheduler, or after it was killed).

Reads the workdir through its bookkeeper (:mod:`.bookkeeper`, which owns its layout):
``manifest.json`` (the grid), the finished blocks (through :mod:`.blockstore`: seconds, FOV
steps, objects, rank, host), the blocks' claims (being segmented now: run, host, pid, rank),
``run.json`` (the job holding the workdir), ``reconcile.json`` (written at the very end) and,
during ``--refine``, its stages (gap cores, gap floods and refined tiles done, and claimed).
Nothing is written. The time left is estimated from the finished blocks' mean seconds per
voxel, the voxels left, and the number of ranks working now (claims). A claim made on this host
by a process that no longer exists is reported as dead (``dead``), not running; claims of
other hosts cannot be checked from here and count as running. A run whose job (``run.json``)
was a process of this host that is gone, or that no job holds and no claim runs, is
``stopped``: no time left is estimated, and the lines say how to resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..locks import holder_is_dead
from . import blockstore, bookkeeper
from ..geometry import BlockError, make_grid
from .workdir import MANIFEST_FORMAT


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _holder_dead(holder: dict | None) -> bool:
    """True when a claim or the job (``run.json``) names a process of this host that no longer
    exists (a pid of another host cannot be checked from here: not dead)."""
    if not isinstance(holder, dict):
        return False
    pid = str(holder.get("pid", ""))
    return pid.isdigit() and int(pid) > 0 and holder_is_dead(holder.get("host"), int(pid))


def block_status(workdir: str | os.PathLike) -> dict[str, Any]:
    """A summary of the run in ``workdir`` (see the module docstring) as a JSON-able dict."""
    wd = Path(workdir)
    mpath = bookkeeper.Layout(wd).manifest
    if not mpath.is_file():
        raise BlockError(f"{wd}: no block-inference manifest.json (is it the workdir of a block-inference run?)")
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise BlockError(f"{mpath}: corrupt or unreadable manifest ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        got = man.get("format") if isinstance(man, dict) else type(man).__name__
        raise BlockError(f"{mpath}: not a block-inference manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    try:
        start, stop = man["bbox"]
        block, halo, fov = tuple(man["block"]), tuple(man["halo"]), tuple(man["fov_zyx"])
        image = man["image"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BlockError(f"{mpath}: corrupt manifest (a field is missing or malformed: "
                         f"{exc.__class__.__name__} {exc})") from None
    shape = tuple(int(b) - int(a) for a, b in zip(start, stop))
    grid = make_grid(shape, block, halo, fov)
    layout = bookkeeper.Layout(wd, tuple(start))
    b = _blocks_summary(bookkeeper.blocks_stage(layout, grid), grid)
    done, seconds, voxels_done, running = b.done, b.seconds, b.voxels_done, b.running
    total_voxels = sum(blk.core_voxels for blk in grid)
    left = total_voxels - voxels_done
    rate = voxels_done / seconds if seconds > 0 else None  # voxels per block-second (one rank)
    workers = max(len(running), 1)  # dead claims work no more
    job = _read_json(layout.run_lock)
    report = _read_json(layout.report)
    refine, refine_claimed = _refine_summary(layout, grid)
    finished = report is not None and done == len(grid)
    job_dead = _holder_dead(job)
    # stopped: the job holding the workdir is gone (same host), or none holds it and no claim runs
    stopped = not finished and (job_dead or (job is None and not running))
    first, last = b.first_mtime, b.last_mtime
    return {
        "workdir": str(wd), "image": image, "bbox": [start, stop], "block": man["block"], "halo": man["halo"],
        "blocks": len(grid), "blocks_done": done, "blocks_running": len(running), "blocks_left": len(grid) - done,
        "blocks_dead": len(b.dead), "dead": b.dead,
        "fraction_done": voxels_done / total_voxels if total_voxels else 1.0,
        "fov_steps": b.steps, "objects_in_blocks": b.objects, "block_seconds": seconds,
        "voxels_per_block_second": rate,
        "eta_s": None if stopped else (left / rate / workers) if rate and left else (0.0 if not left else None),
        "state": "finished" if finished else "stopped" if stopped else "running", "job_dead": job_dead,
        "wall_s_first_to_last_block": (last - first) if first is not None else None,
        "running": running, "per_rank": b.per_rank, "job": job, "refine": refine,
        "refine_claimed": refine_claimed,  # items of each refinement stage being worked on (or left by dead ranks)
        "finished": finished,
        "reconcile": ({**{k: report[k] for k in ("objects", "merges", "n_pairs", "ranks") if k in report},
                       # the engines waiting for blocks to be read, normalised and seeded (all ranks)
                       "host_wait_seconds": report.get("timings", {}).get("host_wait_seconds_sum")}
                      if report else None),
    }


@dataclass
class BlocksSummary:
    """What the workdir says of the blocks."""

    done: int  # finished blocks
    seconds: float  # their block-seconds
    steps: int  # their FOV steps
    objects: int  # their objects (before reconciliation)
    voxels_done: int  # their core voxels
    per_rank: dict[str, dict[str, float]]  # "host:rank" -> blocks, seconds
    first_mtime: float | None  # when the first and the last finished
    last_mtime: float | None
    running: list[dict]  # claims of blocks not done, by live (or unknown) processes
    dead: list[dict]  # ... by processes of this host that are gone


def _blocks_summary(blocks: bookkeeper.Stage, grid) -> BlocksSummary:
    """The finished blocks (seconds, steps, objects, voxels, per rank, first and last) and the
    claims of those not done (running, or of dead processes)."""
    done, seconds, steps, objects, voxels_done = 0, 0.0, 0, 0, 0
    per_rank: dict[str, dict[str, float]] = {}
    first_mtime, last_mtime = None, None
    for k, blk in enumerate(grid):
        p = blocks.result(k)
        if not p.exists():
            continue
        try:
            summary = blockstore.read_summary(p)
        except (OSError, ValueError):
            continue  # being renamed into place, or damaged: counted as not done
        secs, counters, rank = summary.seconds, summary.counters, f"{summary.host}:{summary.rank}"
        done += 1
        seconds += secs
        steps += int(counters.get("steps", 0))
        objects += int(counters.get("objects", 0))
        voxels_done += blk.core_voxels
        r = per_rank.setdefault(rank, {"blocks": 0, "seconds": 0.0})
        r["blocks"] += 1
        r["seconds"] += secs
        m = p.stat().st_mtime
        first_mtime = m if first_mtime is None else min(first_mtime, m)
        last_mtime = m if last_mtime is None else max(last_mtime, m)
    running, dead = [], []
    for c in blocks.running():
        info = {k: v for k, v in (("run_id", c.run_id), ("host", c.host), ("pid", c.pid), ("rank", c.rank)) if v}
        info["block"] = c.item
        info["since_s"] = c.since_s
        (dead if _holder_dead(info) else running).append(info)
    return BlocksSummary(done, seconds, steps, objects, voxels_done, per_rank, first_mtime, last_mtime, running, dead)


def _refine_summary(layout: bookkeeper.Layout, grid) -> tuple[dict | None, dict | None]:
    """During ``--refine``: gap cores found, gap floods and tiles done; each stage's claims."""
    refine, refine_claimed = None, None
    for rdir in layout.refine_dirs():
        stages = bookkeeper.refine_stages(layout, rdir, grid)
        try:
            cores = int(len(np.load(stages.centres))) if stages.centres.exists() else None
        except (OSError, ValueError):
            cores = None
        floods = stages.with_floods(cores or 0).floods
        refine = {"gap_cores": cores, "gap_floods_done": floods.n_done(), "tiles_done": stages.tiles.n_done(),
                  "tiles": len(grid)}
        refine_claimed = {st.name: len(st.running()) for st in (stages.cores, floods, stages.tiles)}
        learned = bookkeeper.learned_stages(layout, rdir, grid)  # --refine-model: tiles done per stage
        if any(st.results.is_dir() for st in learned.all()):
            refine["learned_tiles_done"] = {st.name: st.n_done() for st in learned.all()}
            refine_claimed.update({st.name: len(st.running()) for st in learned.all()})
    return refine, refine_claimed


def format_status(s: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    pct = 100.0 * s["fraction_done"]
    lines = [f"{s['workdir']}: {s['blocks_done']}/{s['blocks']} blocks done ({pct:.1f} % of the voxels), "
             f"{s['blocks_running']} running, {s['blocks_left']} left"
             + (f" ({s['blocks_dead']} claimed by dead ranks)" if s.get("blocks_dead") else "")]
    if s["block_seconds"]:
        rate = s["voxels_per_block_second"]
        lines.append(f"  {s['fov_steps']:,} FOV steps in {s['block_seconds']:.0f} block-seconds "
                     f"({rate:,.0f} voxels per block-second)")
    if s["eta_s"] is not None and s["blocks_left"]:
        lines.append(f"  about {s['eta_s'] / 60:.1f} min left at {max(s['blocks_running'], 1)} rank(s)")
    for r in s["running"]:
        lines.append(f"  running: {r['block']} on {r.get('host', '?')} rank {r.get('rank', '?')} "
                     f"(pid {r.get('pid', '?')}, {r['since_s']:.0f} s)")
    for r in s.get("dead", []):
        lines.append(f"  dead: {r['block']} on {r.get('host', '?')} rank {r.get('rank', '?')} "
                     f"(pid {r.get('pid', '?')} is gone; claimed {r['since_s']:.0f} s ago, the block is not done)")
    ref = s.get("refine")
    stopped = s.get("state") == "stopped"
    if ref and ref.get("learned_tiles_done"):  # --refine-model: the learned stages
        done = ", ".join(f"{n} {k}" for k, n in ref["learned_tiles_done"].items())
        lines.append(f"  {'learned refinement stopped at' if stopped else 'learned refinement:'} tiles done of "
                     f"{ref['tiles']}: {done}")
    elif ref:
        cores = "not found yet" if ref["gap_cores"] is None else f"{ref['gap_floods_done']}/{ref['gap_cores']} gap floods"
        lines.append(f"  {'refinement stopped at' if stopped else 'refining:'} {cores}, "
                     f"{ref['tiles_done']}/{ref['tiles']} tiles done")
    if stopped:
        job = s.get("job") or {}
        who = (f"the run (pid {job.get('pid')} on {job.get('host')}, started {job.get('started')}) is gone: killed or "
               "failed" if s.get("job_dead") else "no run holds this workdir")
        lines.append(f"  stopped: {who}; rerun the same `ffn segment ... --workdir {s['workdir']}` command to resume "
                     "(finished blocks" + (" and refinement files" if ref else "") + " are kept)")
    elif s["finished"]:
        rec = s["reconcile"] or {}
        wait = rec.get("host_wait_seconds")
        lines.append(f"  finished: {rec.get('objects', '?')} objects, {rec.get('merges', '?')} merges"
                     + (f"; the engine waited {wait:.1f} s for blocks to be prepared" if wait is not None else ""))
    elif s["job"]:
        lines.append(f"  job: pid {s['job'].get('pid')} on {s['job'].get('host')}, {s['job'].get('ranks')} rank(s), "
                     f"started {s['job'].get('started')}")
    return "\n".join(lines)
