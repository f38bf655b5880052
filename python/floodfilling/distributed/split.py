"""``split_components`` for block inference: every object's 6-connected components, found
block by block and joined across the faces between block cores.

After reconciliation each object has one global id, but it may fall apart into pieces that
touch nowhere (two blocks' objects merged through an overlap, say). On a whole volume
:func:`floodfilling.postprocess.postprocess` splits them; across blocks no rank sees the
whole object, so:

1. **Label** (each rank, its blocks): the block's core in global ids -> components
   (:func:`label_core`), numbered 1..n in (global id, first voxel in raster order) order;
   per component its global id, first voxel (box coordinates) and voxel count. The component
   volume is stored in the workdir (``split-<run id>/<block>.h5``, removed at the end).
   Seeds of the origins table that lie in the core are looked up on the way.
2. **Join** (each rank, the faces on the + side of its blocks): the two planes that touch;
   where a voxel and its neighbour across the face have the same global id, their components
   are one (:func:`face_edges`)::

           core i                  core j  (next along z, y or x)
       ... |  last plane of i  |  first plane of j  | ...
                            ^ face ^
3. **Number** (rank 0, :func:`number_components`): union-find over all components; a final
   object = joined components: their global id, first voxel (the smallest), voxel count (sum).
   Objects under ``dust_size`` voxels become 0; the rest are numbered 1..N in (global id,
   first voxel) order. That is the order a whole-volume split gives (components of lower ids
   first, each object's components in raster order of their first voxel), so the block output
   equals :func:`~floodfilling.postprocess.postprocess` (split, dust) of the unsplit output.
4. **Write**: each core's component volume through its block's component -> final id table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import kernels, storage
from ..postprocess import split_disconnected
from ..geometry import BlockError, BlockGrid


@dataclass
class CoreComponents:
    """Components of one block's core."""

    gid: np.ndarray  # (n,) uint64: global id of component c + 1
    first: np.ndarray  # (n, 3) int64: its first voxel in raster order (box coordinates)
    count: np.ndarray  # (n,) int64: its voxels


def label_core(core: np.ndarray, core_start: Sequence[int]) -> tuple[np.ndarray, CoreComponents]:
    """``core`` (global ids, 0 = background) -> (component volume uint32, components).
    Components are numbered 1..n in (global id, first voxel in raster order) order."""
    ids, inverse = np.unique(core, return_inverse=True)
    compact = inverse.reshape(core.shape).astype(np.uint32)  # ids -> 0..m, monotone (0 stays 0 when present)
    if ids.size and ids[0] != 0:
        compact += 1
        ids = np.concatenate([[0], ids])
    comp, parts = split_disconnected(compact)
    n = sum(len(v) for v in parts.values())
    gid = np.zeros(n, np.uint64)
    for local, cids in parts.items():
        gid[cids.astype(np.int64) - 1] = ids[local]
    flat = comp.ravel()
    uniq, first_idx = np.unique(flat, return_index=True)
    keep = uniq > 0
    first = np.zeros((n, 3), np.int64)
    first[uniq[keep].astype(np.int64) - 1] = np.stack(np.unravel_index(first_idx[keep], comp.shape), axis=1)
    first += np.asarray(core_start, np.int64)
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    return comp, CoreComponents(gid, first, count)


def face_neighbours(grid: BlockGrid, k: int) -> list[tuple[int, int]]:
    """(axis, j) for each block j whose core follows block k's along an axis."""
    g = grid[k].grid
    nz, ny, nx = grid.grid_shape
    out = []
    for a in range(3):
        if g[a] + 1 < grid.grid_shape[a]:
            h = list(g)
            h[a] += 1
            out.append((a, (h[0] * ny + h[1]) * nx + h[2]))
    return out


def face_edges(plane_i: np.ndarray, plane_j: np.ndarray, gid_i: np.ndarray, gid_j: np.ndarray) -> np.ndarray:
    """(M, 2) uint64 distinct (component in i, component in j) pairs of face-adjacent voxels
    with the same global id (component ids 1..n; ``gid_*[c - 1]`` their global ids)."""
    if plane_i.shape != plane_j.shape:
        raise ValueError(f"plane_j: shape {plane_j.shape} does not match plane_i's {plane_i.shape}")
    gi = np.concatenate([[0], np.asarray(gid_i, np.uint64)])[plane_i]
    gj = np.concatenate([[0], np.asarray(gid_j, np.uint64)])[plane_j]
    same = (gi == gj) & (gi > 0)
    if not same.any():
        return np.zeros((0, 2), np.uint64)
    pairs, _ = kernels.count_pairs(np.ascontiguousarray(plane_i[same]), np.ascontiguousarray(plane_j[same]))
    return pairs


@dataclass
class SplitNumbering:
    """Result of :func:`number_components`."""

    n_objects: int
    values: list[np.ndarray]  # per block: final id of component c + 1 (uint64; 0 = dust)
    n_joins: int = 0


def number_components(comps: Sequence[CoreComponents], edges: Sequence[tuple[int, int, np.ndarray]],
                      dust_size: int = 0) -> SplitNumbering:
    """Joins components over ``edges`` ((block i, block j, (M, 2) components (in i, in j)))
    and numbers the joined objects (see the module docstring)."""
    sizes = np.array([c.gid.size for c in comps], np.int64)
    offsets = np.zeros(len(comps), np.int64)
    if len(comps) > 1:
        offsets[1:] = np.cumsum(sizes[:-1])
    total = int(sizes.sum())
    node = np.arange(total, dtype=np.int64)  # union-find root of each component (0-based global index)
    e = [np.stack([p[:, 0].astype(np.int64) - 1 + offsets[i], p[:, 1].astype(np.int64) - 1 + offsets[j]], axis=1)
         for i, j, p in edges if len(p)]
    n_joins = 0
    if e:
        all_e = np.concatenate(e)
        n_joins = int(all_e.shape[0])
        ids, roots = kernels.union_find(all_e.astype(np.uint64))
        node[ids.astype(np.int64)] = roots.astype(np.int64)
    if total == 0:
        return SplitNumbering(0, [np.zeros(0, np.uint64) for _ in comps], n_joins)
    gid = np.concatenate([c.gid for c in comps]).astype(np.uint64)
    first = np.concatenate([c.first for c in comps]).astype(np.int64)
    count = np.concatenate([c.count for c in comps]).astype(np.int64)
    roots, root_of = np.unique(node, return_inverse=True)
    n_roots = roots.size
    size = np.bincount(root_of, weights=count, minlength=n_roots)
    # the smallest first voxel of each joined object: sort by (root, z, y, x), take the head
    order = np.lexsort((first[:, 2], first[:, 1], first[:, 0], root_of))
    head = order[np.r_[True, root_of[order][1:] != root_of[order][:-1]]]
    r_gid, r_first = gid[head], first[head]
    keep = size >= max(int(dust_size), 1)
    rank = np.lexsort((r_first[:, 2], r_first[:, 1], r_first[:, 0], r_gid))  # (global id, first voxel)
    final = np.zeros(n_roots, np.uint64)
    kept = rank[keep[rank]]
    final[kept] = np.arange(1, kept.size + 1, dtype=np.uint64)
    per = final[root_of]
    values = [per[offsets[k]:offsets[k] + sizes[k]] for k in range(len(comps))]
    return SplitNumbering(int(kept.size), values, n_joins)


# -- files in the workdir ---------------------------------------------------------------------

def write_components(path: Path, comp: np.ndarray, cc: CoreComponents) -> None:
    storage.write_hdf5_atomic(path, {"comp": comp, "gid": cc.gid, "first": cc.first, "count": cc.count},
                              overwrite=True, compression="gzip")


def read_plane(path: Path, axis: int, last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(the first or last plane of a stored component volume along ``axis``, its gid table)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            d = f["comp"]
            sl = [slice(None)] * 3
            sl[axis] = d.shape[axis] - 1 if last else 0
            return d[tuple(sl)], f["gid"][:]
    except (OSError, KeyError) as exc:
        raise BlockError(f"{path}: unreadable component volume ({exc}); rerun") from None


def read_components(path: Path, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """A stored component volume (or its ``region``)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f["comp"][region if region is not None else ()]
    except (OSError, KeyError) as exc:
        raise BlockError(f"{path}: unreadable component volume ({exc}); rerun") from None
