"""Reconciling block segmentations: overlap matching, union-find, global relabelling.

Each block is segmented on its own (ids 1..max_id of that block). For every two neighbouring
blocks ``a`` and ``b`` (outer boxes intersect, see :mod:`.blocks`), both segmentations of the
shared region ``R = outer_a & outer_b`` are compared with the native pair-counting kernel:

- ``n_ab``: voxels of ``R`` labelled ``i`` in block a and ``j`` in block b;
- ``n_a``: voxels of ``R`` labelled ``i`` in block a (whatever b says there), ``n_b`` likewise.

**Merge rule** (:class:`MergeRule`): ``i`` and ``j`` are the same object when

    n_ab >= min_voxels   and   n_ab >= min_fraction * min(n_a, n_b)   and   IoU >= min_iou

with IoU = n_ab / (n_a + n_b - n_ab). Defaults: ``min_voxels=10``, ``min_fraction=0.5``,
``min_iou=0`` (off): an object is matched when at least half of the smaller of the two
versions (within the overlap) lies inside the other. Fraction-of-the-smaller rather than IoU
because the two blocks see an object differently near their outer borders (less context): a
piece split off in one block still joins its other half. Raise ``min_iou`` (e.g. 0.5, which
also makes matches one-to-one) to avoid propagating a merge error of one block to its
neighbours. Options ``merge_min_voxels``, ``merge_min_fraction``, ``merge_min_iou``
(``--set`` / TOML) when the inference config has them.

Global ids: block ``k``'s local id ``i`` becomes the provisional id ``offset_k + i`` with
``offset_k`` = the sum of ``max_id`` over the blocks before ``k`` (unique across blocks). The
merge edges go through union-find (root = the smallest provisional id of the component);
the roots of the ids present in some block's *core* are sorted and numbered 1..N. So the
final ids are contiguous, deterministic (independent of ranks and scheduling), an object
that crosses block borders keeps one id, and two objects get the same id only through a
chain of matches. With ``dust_size`` (option ``dust_size``), objects with fewer voxels in total
(summed over the cores) become 0 and the rest are renumbered 1..N in the same order. Each core
is then relabelled (:func:`floodfilling.kernels.relabel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import kernels


@dataclass(frozen=True)
class MergeRule:
    """When two block-local objects are the same object (see the module doc)."""

    min_fraction: float = 0.5
    min_voxels: int = 10
    min_iou: float = 0.0

    def validate(self) -> "MergeRule":
        from ..geometry import BlockError

        if not 0.0 < float(self.min_fraction) <= 1.0:
            raise BlockError(f"option merge_min_fraction={self.min_fraction!r}: must be in (0, 1]")
        if int(self.min_voxels) < 1:
            raise BlockError(f"option merge_min_voxels={self.min_voxels!r}: must be >= 1")
        if not 0.0 <= float(self.min_iou) <= 1.0:
            raise BlockError(f"option merge_min_iou={self.min_iou!r}: must be in [0, 1]")
        return self

    @classmethod
    def from_config(cls, cfg) -> "MergeRule":
        """From an InferenceConfig's ``merge_*`` fields where it has them, else the defaults."""
        d = cls()
        return cls(float(getattr(cfg, "merge_min_fraction", d.min_fraction)),
                   int(getattr(cfg, "merge_min_voxels", d.min_voxels)),
                   float(getattr(cfg, "merge_min_iou", d.min_iou))).validate()

    def to_dict(self) -> dict:
        return {"min_fraction": self.min_fraction, "min_voxels": self.min_voxels, "min_iou": self.min_iou}


@dataclass
class OverlapMatch:
    """Candidate pairs of one overlap region and which of them merge."""

    pairs: np.ndarray  # (M, 2) uint64 local ids (id in a, id in b), both > 0
    n_ab: np.ndarray  # (M,) int64
    n_a: np.ndarray  # (M,) int64: voxels of pairs[:, 0] in the region (in a)
    n_b: np.ndarray  # (M,) int64
    merge: np.ndarray  # (M,) bool

    @property
    def edges(self) -> np.ndarray:
        return self.pairs[self.merge]


def match_overlap(a: np.ndarray, b: np.ndarray, rule: MergeRule = MergeRule()) -> OverlapMatch:
    """Matches the objects of two segmentations ``a``, ``b`` of the same region."""
    pairs, counts = kernels.count_pairs(a, b)
    if pairs.shape[0] == 0:
        z = np.zeros(0, np.int64)
        return OverlapMatch(np.zeros((0, 2), np.uint64), z, z, z, np.zeros(0, bool))
    la, lb = pairs[:, 0], pairs[:, 1]
    # per-label voxel counts in the region (zero partner included)
    ua, ia = np.unique(la, return_inverse=True)
    ub, ib = np.unique(lb, return_inverse=True)
    size_a = np.bincount(ia, weights=counts).astype(np.int64)
    size_b = np.bincount(ib, weights=counts).astype(np.int64)
    keep = (la != 0) & (lb != 0)
    n_ab = counts[keep]
    n_a = size_a[ia[keep]]
    n_b = size_b[ib[keep]]
    union = n_a + n_b - n_ab
    merge = ((n_ab >= rule.min_voxels) & (n_ab >= rule.min_fraction * np.minimum(n_a, n_b))
             & (n_ab >= rule.min_iou * union))
    return OverlapMatch(pairs[keep], n_ab, n_a, n_b, merge)


def offsets_from_max_ids(max_ids: Sequence[int]) -> np.ndarray:
    """offset_k = sum of max_id over blocks before k (uint64)."""
    m = np.asarray(max_ids, dtype=np.uint64)
    out = np.zeros(m.size, dtype=np.uint64)
    if m.size > 1:
        out[1:] = np.cumsum(m[:-1], dtype=np.uint64)
    return out


@dataclass
class GlobalLabels:
    """The result of reconciliation: per block, local core ids -> final ids."""

    offsets: np.ndarray  # (n_blocks,) uint64
    n_objects: int
    keys: list[np.ndarray]  # per block: sorted local ids present in its core (uint64)
    values: list[np.ndarray]  # per block: their final ids 1..n_objects (uint64)
    uf_ids: np.ndarray  # union-find: provisional ids that take part in merges (sorted)
    uf_roots: np.ndarray  # their roots
    final_roots: np.ndarray  # sorted roots; final id = position + 1
    n_merges: int = 0

    def root_of(self, provisional: np.ndarray) -> np.ndarray:
        p = np.asarray(provisional, dtype=np.uint64)
        out = p.copy()
        if self.uf_ids.size and p.size:
            pos = np.searchsorted(self.uf_ids, p)
            pos_c = np.minimum(pos, self.uf_ids.size - 1)
            hit = self.uf_ids[pos_c] == p
            out[hit] = self.uf_roots[pos_c[hit]]
        return out

    def final_of(self, provisional: np.ndarray) -> np.ndarray:
        """Final id (1..N) of provisional ids; 0 for objects that appear in no core."""
        r = self.root_of(provisional)
        if not self.final_roots.size:
            return np.zeros(r.shape, np.uint64)
        pos = np.searchsorted(self.final_roots, r)
        pos_c = np.minimum(pos, self.final_roots.size - 1)
        hit = self.final_roots[pos_c] == r
        return np.where(hit, pos_c.astype(np.uint64) + 1, 0).astype(np.uint64)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.n_objects < 2**32 else np.dtype(np.uint64)


def global_labels(max_ids: Sequence[int], core_ids: Sequence[np.ndarray],
                  local_edges: Sequence[tuple[int, int, np.ndarray]],
                  core_counts: Sequence[np.ndarray] | None = None, dust_size: int = 0) -> GlobalLabels:
    """Union-find over all blocks.

    ``max_ids[k]``: largest local id of block k; ``core_ids[k]``: the local ids present in its
    core; ``local_edges``: (block i, block j, (M, 2) local ids (in i, in j)) merge edges.
    ``dust_size`` > 0 (needs ``core_counts[k]``, the core voxels of each of ``core_ids[k]``):
    final objects with fewer voxels become 0 and the others are renumbered 1..N in order.
    """
    offsets = offsets_from_max_ids(max_ids)
    edges = [np.stack([e[:, 0].astype(np.uint64) + offsets[i], e[:, 1].astype(np.uint64) + offsets[j]], axis=1)
             for i, j, e in local_edges if len(e)]
    all_edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
    if all_edges.shape[0]:
        uf_ids, uf_roots = kernels.union_find(all_edges)
    else:
        uf_ids = uf_roots = np.zeros(0, np.uint64)
    lab = GlobalLabels(offsets, 0, [], [], np.asarray(uf_ids, np.uint64), np.asarray(uf_roots, np.uint64),
                       np.zeros(0, np.uint64), int(all_edges.shape[0]))
    if dust_size > 0:
        if core_counts is None:
            raise ValueError("dust_size needs core_counts")
        keys, counts = [], []
        for c, n in zip(core_ids, core_counts):
            c, n = np.asarray(c, dtype=np.uint64), np.asarray(n, dtype=np.int64)
            keys.append(c[c > 0])
            counts.append(n[c > 0])
        if any(np.any(k[1:] <= k[:-1]) for k in keys):
            raise ValueError("core_ids must be sorted and unique when core_counts are given")
    else:
        keys = [np.unique(np.asarray(c, dtype=np.uint64)) for c in core_ids]
        keys = [k[k > 0] for k in keys]
    roots = [lab.root_of(k + offsets[i]) for i, k in enumerate(keys)]
    lab.final_roots = np.unique(np.concatenate(roots)) if roots else np.zeros(0, np.uint64)
    lab.keys = keys
    if dust_size > 0 and lab.final_roots.size:
        fin = np.concatenate([lab.final_of(k + offsets[i]) for i, k in enumerate(keys)]).astype(np.int64)
        sizes = np.bincount(fin, weights=np.concatenate(counts), minlength=lab.final_roots.size + 1)
        lab.final_roots = lab.final_roots[sizes[1:] >= dust_size]  # final_of now renumbers, dust -> 0
    lab.n_objects = int(lab.final_roots.size)
    lab.values = [lab.final_of(k + offsets[i]) for i, k in enumerate(keys)]
    return lab


def relabel_core(core: np.ndarray, keys: np.ndarray, values: np.ndarray, dtype=np.uint32) -> np.ndarray:
    """``core`` (local ids) -> final ids, as a new C-contiguous array of ``dtype``.
    Every non-zero voxel must have its id in ``keys``."""
    out = np.ascontiguousarray(core, dtype=dtype)
    if out is core:
        out = out.copy()
    if keys.size:
        kernels.relabel(out, keys.astype(np.uint64), values.astype(np.uint64))
    return out
