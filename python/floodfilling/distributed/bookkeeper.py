"""The workdir ``DIR`` of a block run, in one place: every path in it, and the claim / done /
cleanup of its work items (the blocks and each refinement stage). It knows files and items, not
flood filling (what an item computes is the caller's)::

    DIR/manifest.json            the run's plan (:mod:`.workdir` writes it)
    DIR/run.json                 the workdir lock: the job using DIR
    DIR/reconcile.json           the report, written at the very end
    DIR/blocks/<block>.h5        stage "blocks": finished blocks (format: :mod:`.blockstore`)
    DIR/claims/<block>           blocks being segmented now
    DIR/split-<run id>/<block>.h5  component volumes of a split_components run (this run's only)
    DIR/refine-<digest>/         ``--refine`` of the output with this digest (its options):
        cores/<block>.npy        stage "cores": the gap cores' centres found in each tile
        centres.npy              all of them, in tile order
        floods/<i>.h5            stage "floods": gap flood i
        tiles/<block>.h5         stage "tiles": each tile's refined core
        claims/<stage>/<item>    items of those stages being worked on now
        (``--refine-model``, :mod:`.learned`, in the same directory:)
        lcores/<block>.h5        stage "lcores": each tile's gap cores (labels of its core, centres)
        lbase/<block>.h5         stage "lbase": each tile's base (its core)
        lstats/<block>.npz       stage "lstats": each tile's contact statistics
        agglomeration.npz        the learned merges (rank 0, from all tiles' statistics)

An item is done when its result file exists (every result is written atomically, so a file
that exists is complete). Ranks claim items dynamically (:class:`Stage`): each walks the items
from its own starting point and takes the next one neither done nor claimed, by creating its
claim exclusively and complete (:func:`floodfilling.locks.create_exclusive`), so a slow rank
simply takes fewer. A claim names the run, host, pid and rank (``ffn status`` reads them); a
killed run's claims and temporaries go when the next run takes the workdir (:func:`clean_stale`),
a failing run's own claims when it gives the workdir back (:func:`remove_claims`).

A new resumable stage is one :class:`Stage`: a name, where its results and claims live, how
many items, and the result file of item i (see :func:`refine_stages`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .. import locks
from . import blockstore
from ..geometry import Block

log = logging.getLogger(__name__)


class Layout:
    """Every path of the workdir ``workdir`` of a run over the box starting at ``box_start``
    (block files are named by their position in the image, :meth:`.blocks.Block.name`)."""

    def __init__(self, workdir: str | os.PathLike, box_start: Sequence[int] = (0, 0, 0)):
        self.root = Path(workdir)
        self.box_start = tuple(int(v) for v in box_start)

    # -- the run
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def run_lock(self) -> Path:
        return self.root / "run.json"

    @property
    def report(self) -> Path:
        return self.root / "reconcile.json"

    # -- blocks
    @property
    def blocks_dir(self) -> Path:
        return self.root / "blocks"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def block_name(self, b: Block) -> str:
        return b.name(self.box_start)

    def block_file(self, b: Block) -> Path:
        return blockstore.block_file(self.blocks_dir, self.block_name(b))

    def per_block(self, directory: Path, b: Block, suffix: str = ".h5") -> Path:
        """Block ``b``'s file in a directory of per-block files (component volumes, refined tiles)."""
        return Path(directory) / f"{self.block_name(b)}{suffix}"

    # -- split_components
    def split_dir(self, run_id: str) -> Path:
        return self.root / f"split-{run_id}"

    def split_dirs(self) -> list[Path]:
        return [p for p in self.root.glob("split-*") if p.is_dir()]

    # -- refinement
    def refine_dir(self, out_digest: str) -> Path:
        """Refinement files of the output with this digest: a rerun with other options never
        reuses them."""
        return self.root / f"refine-{out_digest[:16]}"

    def refine_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.glob("refine-*") if p.is_dir())

    @staticmethod
    def centres_file(rdir: Path) -> Path:
        return rdir / "centres.npy"

    @staticmethod
    def flood_file(rdir: Path, i: int) -> Path:
        return rdir / "floods" / f"{i}.h5"


@dataclass
class Claim:
    """A claim as ``ffn status`` sees it."""

    stage: str
    item: str  # the item's name (a block's, a flood's index)
    run_id: str
    host: str
    pid: str
    rank: str
    since_s: float


@dataclass
class Stage:
    """Resumable work items ``0 .. items - 1`` (see the module docstring)."""

    name: str  # "blocks", "cores", "floods", "tiles"
    results: Path  # the directory of its result files
    claims: Path  # the directory of its claims
    items: int
    result_of: Callable[[int], Path]  # item -> its result file (in ``results``)
    name_of: Callable[[int], str] = str  # item -> its claim's name

    def result(self, i: int) -> Path:
        return self.result_of(i)

    def done(self, i: int) -> bool:
        return self.result_of(i).exists()

    def n_done(self) -> int:
        return sum(1 for i in range(self.items) if self.done(i))

    def prepare(self) -> None:
        """Rank 0, before the ranks start: a killed writer's temporaries are gone (the
        directories are made when an item is first claimed)."""
        if self.results.is_dir():
            for p in self.results.iterdir():
                if ".tmp" in p.name:
                    p.unlink(missing_ok=True)

    def claimer(self, run_id: str, rank: int, size: int, prefer: Sequence[int] = ()) -> "Claimer":
        return Claimer(self, run_id, rank, size, prefer)

    def claimed(self, run_id: str, rank: int, size: int, prefer: Sequence[int] = ()) -> Iterator[int]:
        """The items this rank claims, one at a time, until none is left (``prefer``: tried
        first, in this order: items whose inputs this rank already holds)."""
        c = self.claimer(run_id, rank, size, prefer)
        while (i := c.next()) is not None:
            yield i

    def running(self) -> list[Claim]:
        """The claims of items not done yet (being worked on, or left by a dead process)."""
        names = {self.name_of(i): i for i in range(self.items)}
        out = []
        if not self.claims.is_dir():
            return out
        for c in sorted(self.claims.iterdir()):
            i = names.get(c.name)
            if i is None or self.done(i):
                continue
            try:
                fields = c.read_text().split() if c.is_file() else []
                since = round(time.time() - c.stat().st_mtime, 1)
            except OSError:  # removed meanwhile (its item finished, or a rerun's cleanup)
                continue
            f = dict(zip(("run_id", "host", "pid", "rank"), fields))
            out.append(Claim(self.name, c.name, f.get("run_id", ""), f.get("host", ""), f.get("pid", ""),
                             f.get("rank", ""), since))
        return out


class Claimer:
    """Claims a rank's next unfinished item of a :class:`Stage` (the ``prefer`` items first,
    then from item rank * items / size round)."""

    def __init__(self, stage: Stage, run_id: str, rank: int, size: int, prefer: Sequence[int] = ()):
        self.stage = stage
        n = stage.items
        first = (rank * n) // max(size, 1)
        order = [int(i) for i in prefer if 0 <= int(i) < n]
        seen = set(order)
        self._order = iter(order + [i for i in ((first + j) % n for j in range(n)) if i not in seen])
        self._exhausted = False
        self._text = f"{run_id} {socket.gethostname()} {os.getpid()} {rank}\n".encode()

    def next(self) -> int | None:
        if self._exhausted:
            return None
        st = self.stage
        for i in self._order:
            if st.done(i):
                continue
            for d in (st.claims, st.results):  # (the claimant writes its result there)
                d.mkdir(parents=True, exist_ok=True)
            # created complete (never empty) with its temporary outside claims/ (readers list it)
            if not locks.create_exclusive(st.claims / st.name_of(i), self._text, tmp_dir=st.claims.parent):
                continue  # claimed by another rank
            return i
        self._exhausted = True
        return None


def blocks_stage(layout: Layout, grid) -> Stage:
    """The blocks of a run's grid: ``blocks/<block>.h5``, claims ``claims/<block>``."""
    return Stage("blocks", layout.blocks_dir, layout.claims_dir, len(grid), lambda i: layout.block_file(grid[i]),
                 lambda i: layout.block_name(grid[i]))


@dataclass
class RefineStages:
    """The resumable stages of ``--refine`` in ``rdir`` (:mod:`.refine`)."""

    rdir: Path
    cores: Stage  # per tile: its gap cores' centres
    floods: Stage  # per gap core: its flood
    tiles: Stage  # per tile: its refined core

    @property
    def centres(self) -> Path:
        return Layout.centres_file(self.rdir)

    def with_floods(self, n: int) -> "RefineStages":
        """The same stages with ``n`` gap floods (known once the cores are found)."""
        return dataclasses.replace(self, floods=dataclasses.replace(self.floods, items=n))


def _tile_stage(layout: Layout, rdir: Path, grid, directory: str, suffix: str) -> Stage:
    """A stage of one item per tile (= block) of ``grid``: ``rdir/<directory>/<block><suffix>``."""
    d = rdir / directory
    return Stage(directory, d, rdir / "claims" / directory, len(grid),
                 lambda i: layout.per_block(d, grid[i], suffix), lambda i: layout.block_name(grid[i]))


def refine_stages(layout: Layout, rdir: Path, grid, n_floods: int = 0) -> RefineStages:
    floods = Stage("floods", rdir / "floods", rdir / "claims" / "floods", n_floods,
                   lambda i: Layout.flood_file(rdir, i))
    return RefineStages(rdir, _tile_stage(layout, rdir, grid, "cores", ".npy"), floods,
                        _tile_stage(layout, rdir, grid, "tiles", ".h5"))


@dataclass
class LearnedStages:
    """The resumable stages of ``--refine --refine-model`` in ``rdir`` (:mod:`.learned`)."""

    rdir: Path
    cores: Stage  # per tile: its gap cores
    base: Stage  # per tile: its base core
    stats: Stage  # per tile: its contact statistics

    @property
    def agglomeration(self) -> Path:
        return self.rdir / "agglomeration.npz"

    def all(self) -> tuple[Stage, ...]:
        return self.cores, self.base, self.stats


def learned_stages(layout: Layout, rdir: Path, grid) -> LearnedStages:
    return LearnedStages(rdir, *(_tile_stage(layout, rdir, grid, d, s)
                                 for d, s in (("lcores", ".h5"), ("lbase", ".h5"), ("lstats", ".npz"))))


# ------------------------------------------------------------------------------ cleanup


def _stage_claim_dirs(layout: Layout) -> list[Path]:
    dirs = [layout.claims_dir]
    for rdir in layout.refine_dirs():
        c = rdir / "claims"
        if c.is_dir():
            dirs += [p for p in c.iterdir() if p.is_dir()]
    return dirs


def remove_claims(layout: Layout, run_id: str) -> None:
    """A failing run gives back its own claims (those naming ``run_id``), every stage's."""
    for d in _stage_claim_dirs(layout):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            try:
                if p.is_file() and p.read_text().split()[:1] == [run_id]:
                    p.unlink(missing_ok=True)
            except (OSError, IndexError):
                continue


def clean_stale(layout: Layout, keep_refine: Path | None) -> None:
    """Rank 0 of a run that holds the workdir lock: a killed run's claims (every stage's),
    temporary block files and component volumes go, and the refinement files of other outputs
    (their options changed); the refinement of ``keep_refine`` stays for the resume."""
    n_claims = 0
    for d in _stage_claim_dirs(layout):
        for p in (d.iterdir() if d.is_dir() else []):
            if p.is_file():
                p.unlink(missing_ok=True)
                n_claims += 1
    if layout.blocks_dir.is_dir():
        for p in layout.blocks_dir.iterdir():
            if blockstore.is_temporary(p.name):
                p.unlink(missing_ok=True)
    remove_split_dirs(layout)
    remove_refine_dirs(layout, keep=keep_refine)
    if n_claims:
        log.info("removed %d stale claims of an interrupted run", n_claims)


def clear(layout: Layout) -> None:
    """A workdir of another run, discarded (``overwrite``): our files only (blocks, claims,
    manifest, report, component volumes, refinement files)."""
    for d in (layout.blocks_dir, layout.claims_dir):
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.name.startswith("seg_"):
                    p.unlink()
    for p in (layout.manifest, layout.report):
        p.unlink(missing_ok=True)
    remove_split_dirs(layout)
    remove_refine_dirs(layout)


def tidy(layout: Layout) -> None:
    """At the end of a run: claims, component volumes, refinement files and the workdir lock
    go; blocks stay."""
    shutil.rmtree(layout.claims_dir, ignore_errors=True)
    remove_split_dirs(layout)
    remove_refine_dirs(layout)
    layout.run_lock.unlink(missing_ok=True)


def remove_split_dirs(layout: Layout) -> None:
    for p in layout.split_dirs():
        shutil.rmtree(p, ignore_errors=True)


def remove_refine_dirs(layout: Layout, keep: Path | None = None) -> None:
    for p in layout.refine_dirs():
        if keep is None or p.resolve() != Path(keep).resolve():
            shutil.rmtree(p, ignore_errors=True)
