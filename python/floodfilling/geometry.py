"""Geometry below both runners (one volume, blocks): the FOV margin and the FOV-size check of a
volume, and the overlapping block decomposition of a volume (or of a bounding box of it).

FOV: a FOV of odd size ``f`` (per axis) centred at ``c`` covers ``c - f//2 .. c + f//2``; its
margin :func:`fov_margin` is ``f // 2``, how far FOV centres and seeds stay from a volume's
faces. A volume smaller than the FOV on some axis (:func:`smaller_than_fov`) cannot be flooded.

Blocks:

Geometry along one axis (the same on z, y and x; coordinates relative to the processed box,
extent ``E``, core size ``B`` = ``block``, halo ``H`` = ``halo``)::

    0          B          2B         3B       E
    |--core 0--|--core 1--|--core 2--|-core 3-|     cores tile [0, E) without gaps or overlap
    |--outer 0-----|                                outer = core grown by H on both sides,
           |-----outer 1------|                     clipped to [0, E): what is segmented
                      |-----outer 2------|
                                 |---outer 3--|
           [B-H, B+H)                               overlap of blocks 0 and 1 = outer0 & outer1

- Core boundaries are multiples of ``B`` from the start of the box; a last remainder shorter
  than the FOV is joined to the previous core (so every outer box holds at least one FOV).
- Each block is segmented on its *outer* box; the output takes each voxel from the block whose
  *core* holds it. Two blocks are *neighbours* when their outer boxes intersect (26-connected
  blocks when ``H <= B/2``; with a larger halo, blocks two apart also overlap); their shared
  region ``outer_a & outer_b`` (a slab ``2H`` thick across a face, a bar along an edge, a cube at
  a corner) is where their objects are matched (:mod:`floodfilling.distributed.reconcile`).
- Requirements: ``B >= FOV`` (unless the box is smaller, then one block spans it),
  ``FOV//2 <= H <= B``. The default halo is ``FOV//2 + deltas`` (16 + 8 = 24 for the bundled
  model): a seed next to the core border still sees a full FOV and one move of context.

Blocks are numbered in C order of their grid index (z, y, x); results are named by their core
box in volume coordinates: ``seg_z0-y0-x0_z1-y1-x1.h5``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import boxes

DEFAULT_BLOCK = (128, 256, 256)


def fov_margin(fov_zyx) -> tuple[int, int, int]:
    """The margin of a FOV, ``f // 2`` per axis: how far FOV centres and seeds stay from the
    volume's faces (the FOV radius)."""
    return tuple(int(f) // 2 for f in fov_zyx)  # type: ignore[return-value]


def smaller_than_fov(shape: Sequence[int], fov_zyx: Sequence[int]) -> bool:
    """Whether a volume of ``shape`` is smaller than the FOV on some axis (no FOV fits in it):
    the one FOV-size check (callers word the error for their input)."""
    return any(int(s) < int(f) for s, f in zip(shape, fov_zyx))


class BlockError(ValueError):
    """Bad block/halo options or an unusable work directory (one-line message naming it)."""


def fmt_zyx(v: Sequence[int]) -> str:
    return ",".join(str(int(x)) for x in v)


@dataclass(frozen=True)
class Block:
    """One block: grid position, core box and outer (core + halo, clipped) box, all half-open
    and relative to the processed box."""

    index: int
    grid: tuple[int, int, int]
    core_start: tuple[int, int, int]
    core_stop: tuple[int, int, int]
    outer_start: tuple[int, int, int]
    outer_stop: tuple[int, int, int]

    @property
    def outer_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.outer_start, self.outer_stop))  # type: ignore[return-value]

    @property
    def core_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.core_start, self.core_stop))  # type: ignore[return-value]

    @property
    def core_in_outer(self) -> tuple[slice, slice, slice]:
        """Slices of the core inside the block's outer array."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.core_start, self.core_stop, self.outer_start))  # type: ignore[return-value]

    @property
    def outer_voxels(self) -> int:
        z, y, x = self.outer_shape
        return z * y * x

    @property
    def core_voxels(self) -> int:
        z, y, x = self.core_shape
        return z * y * x

    def name(self, origin: Sequence[int] = (0, 0, 0)) -> str:
        """File stem from the core box in volume coordinates (``origin`` = processed box start)."""
        a = [s + o for s, o in zip(self.core_start, origin)]
        b = [s + o for s, o in zip(self.core_stop, origin)]
        return "seg_{}-{}-{}_{}-{}-{}".format(*a, *b)


def axis_bounds(extent: int, block: int, min_last: int = 1) -> list[int]:
    """Core boundaries ``[0, B, 2B, ..., extent]`` along one axis; a last core shorter than
    ``min_last`` is merged into the previous one."""
    if extent <= 0:
        raise BlockError(f"empty extent {extent}")
    bounds = list(range(0, extent, block)) + [extent]
    while len(bounds) > 2 and bounds[-1] - bounds[-2] < min_last:
        del bounds[-2]
    return bounds


class BlockGrid:
    """The blocks covering a box of ``shape`` (z, y, x) with core ``block`` and ``halo``.

    ``min_core``: a last core shorter than this (per axis) joins the previous one (use the FOV).
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int], halo: Sequence[int],
                 min_core: Sequence[int] = (1, 1, 1)):
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        self.halo = tuple(int(h) for h in halo)
        if any(b < 1 for b in self.block) or any(h < 0 for h in self.halo):
            raise BlockError(f"block {self.block} must be >= 1 and halo {self.halo} >= 0")
        self.bounds = [axis_bounds(e, b, m) for e, b, m in zip(self.shape, self.block, min_core)]
        self.grid_shape = tuple(len(b) - 1 for b in self.bounds)
        self.blocks: list[Block] = []
        for i, g in enumerate(itertools.product(*(range(n) for n in self.grid_shape))):
            cs = tuple(self.bounds[a][g[a]] for a in range(3))
            ce = tuple(self.bounds[a][g[a] + 1] for a in range(3))
            os_ = tuple(max(c - h, 0) for c, h in zip(cs, self.halo))
            oe = tuple(min(c + h, e) for c, h, e in zip(ce, self.halo, self.shape))
            self.blocks.append(Block(i, g, cs, ce, os_, oe))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __getitem__(self, i: int) -> Block:
        return self.blocks[i]

    def pairs(self) -> list[tuple[int, int]]:
        """(i, j), i < j, of every two blocks whose outer boxes intersect, in lexicographic order."""
        per_axis = []
        for a in range(3):
            n = self.grid_shape[a]
            lo = [max(self.bounds[a][k] - self.halo[a], 0) for k in range(n)]
            hi = [min(self.bounds[a][k + 1] + self.halo[a], self.shape[a]) for k in range(n)]
            per_axis.append([(k, m) for k in range(n) for m in range(n) if lo[m] < hi[k] and lo[k] < hi[m]])
        nz, ny, nx = self.grid_shape
        out = []
        for (za, zb), (ya, yb), (xa, xb) in itertools.product(*per_axis):
            i = (za * ny + ya) * nx + xa
            j = (zb * ny + yb) * nx + xb
            if i < j:
                out.append((i, j))
        return sorted(out)

    def overlap(self, i: int, j: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """(start, stop) of ``outer_i & outer_j`` (None when empty)."""
        a, b = self.blocks[i], self.blocks[j]
        s = tuple(max(p, q) for p, q in zip(a.outer_start, b.outer_start))
        e = tuple(min(p, q) for p, q in zip(a.outer_stop, b.outer_stop))
        if any(y <= x for x, y in zip(s, e)):
            return None
        return s, e  # type: ignore[return-value]

    def halo_overhead(self) -> float:
        """Segmented voxels / output voxels - 1 (the extra work the halos cost)."""
        outer = sum(b.outer_voxels for b in self.blocks)
        core = sum(b.core_voxels for b in self.blocks)
        return outer / core - 1.0


def make_grid(shape: Sequence[int], block: Sequence[int], halo: Sequence[int], fov_zyx: Sequence[int]) -> BlockGrid:
    """Validates ``block`` (3 integers >= 1) and ``halo`` (>= 0) against the FOV and the box
    ``shape`` and builds the grid.

    Raises :class:`~floodfilling.boxes.ParameterError` naming ``block`` or ``halo``: not 3
    integers, a block smaller than the FOV (on an axis where the box is larger than the block),
    a halo smaller than the FOV radius or larger than the block; :class:`BlockError` for a box
    smaller than the FOV.
    """
    block, halo = boxes.check_zyx(block, "block", 1), boxes.check_zyx(halo, "halo", 0)
    fov = tuple(int(f) for f in fov_zyx)
    radius = fov_margin(fov)
    shape = tuple(int(s) for s in shape)
    if smaller_than_fov(shape, fov):
        raise BlockError(f"the volume (box) of shape {fmt_zyx(shape)} is smaller than the model's FOV {fmt_zyx(fov)}")
    for ax, name in enumerate("zyx"):
        if block[ax] < fov[ax] and shape[ax] > block[ax]:
            raise boxes.ParameterError("block", block, f"block={fmt_zyx(block)}: {name} size {block[ax]} is smaller "
                                         f"than the model's FOV {fmt_zyx(fov)} (z,y,x)")
        if halo[ax] < radius[ax]:
            raise boxes.ParameterError("halo", halo, f"halo={fmt_zyx(halo)}: {name} halo {halo[ax]} is smaller than "
                                         f"the FOV radius {fmt_zyx(radius)} (z,y,x); objects at block borders would "
                                         "be segmented without context")
        if halo[ax] > block[ax] and shape[ax] > block[ax]:
            raise boxes.ParameterError("halo", halo, f"halo={fmt_zyx(halo)}: {name} halo {halo[ax]} is larger than "
                                         f"the block {fmt_zyx(block)}; use a halo of at most the block size")
    return BlockGrid(shape, tuple(min(b, s) for b, s in zip(block, shape)), halo, min_core=fov)
