"""Split consensus of two segmentations of one volume (``ffn consensus A B OUT``).

The flood-filling pipeline of Januszewski et al. (2018) segments a volume twice, the second
time seeding the objects in the reverse order of the first run's origins (``seed_policy =
"invert_origins"``), and keeps only what both runs agree on: a merge made by one run but not
by the other is cut. Same semantics as the reference's ``CONSENSUS_SPLIT``:

- every distinct pair ``(a, b)`` of labels on the same voxel is a piece (``b`` may be 0);
- a piece with ``a == 0`` or fewer than ``min_size`` voxels becomes 0;
- for each ``a``, the piece with the largest overlap (ties: the smallest ``b``) keeps the id
  ``a``; every other piece gets a new id ``max(A) + 1, + 2, ...`` in order of ``(b, a)``.

The result is a subdivision of A: object ids of A survive where the two runs agree, so A's
origins table still describes them. Pieces are not split into connected components (as in the
reference); ``ffn segment``'s ``split_components`` does that if wanted.

Memory: the volumes are read in z-slabs (pair counting with the native kernel, then a second
pass relabelling each slab) and :func:`consensus` writes each slab of the output as it goes
(into the temporary file or hidden zarr array that is renamed at the end), so volumes larger
than memory are fine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from . import disk, kernels, locks, outputs, results, volumes

log = logging.getLogger(__name__)


class ConsensusError(ValueError):
    """Bad input to the consensus (one-line message naming the culprit)."""


@dataclass
class ConsensusTable:
    """The pieces of A x B: sorted ``(a, b)`` pairs, their voxel counts and output ids."""

    pairs: np.ndarray  # (M, 2) uint64, lexicographic
    counts: np.ndarray  # (M,) int64
    out_ids: np.ndarray  # (M,) uint64 (0: removed)

    @property
    def max_id(self) -> int:
        return int(self.out_ids.max()) if self.out_ids.size else 0


def largest_overlaps(pairs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row of the largest count of each first id in ``(pairs, counts)`` (ties: the smallest
    second id), in order of the first ids."""
    a, b = pairs[:, 0], pairs[:, 1]
    order = np.lexsort((b, -np.asarray(counts), a))
    return order[np.r_[True, a[order][1:] != a[order][:-1]]] if len(order) else order


def consensus_table(pairs: np.ndarray, counts: np.ndarray, min_size: int, max_a: int) -> ConsensusTable:
    """Output id of every piece (see the module docstring). ``pairs`` sorted, distinct."""
    pairs = np.asarray(pairs, np.uint64).reshape(-1, 2)
    counts = np.asarray(counts, np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    out = np.zeros(len(pairs), np.uint64)
    if not len(pairs):
        return ConsensusTable(pairs, counts, out)
    main = np.zeros(len(pairs), bool)
    main[largest_overlaps(pairs, counts)] = True  # the largest piece of each a (ties: smallest b)
    keep = (a != 0) & (counts >= max(int(min_size), 0))
    out[main & keep] = a[main & keep]
    new = np.flatnonzero(~main & keep)
    new = new[np.lexsort((a[new], b[new]))]  # (b, a) order
    out[new] = np.uint64(max_a) + np.arange(1, new.size + 1, dtype=np.uint64)
    return ConsensusTable(pairs, counts, out)


def _slabs(shape, max_voxels: int):
    step = max(1, int(max_voxels) // max(1, shape[1] * shape[2]))
    for z in range(0, shape[0], step):
        yield slice(z, min(z + step, shape[0]))


def _labels(arr: np.ndarray, name: str, where: slice | None = None) -> np.ndarray:
    """``arr`` (one z-slab ``where`` of volume ``name``) as uint64 ids; negative ids are refused
    (naming the volume and the slab's minimum), as ``ffn prepare`` and ``ffn evaluate`` do."""
    volumes.check_labels(arr, name, where=f" in z {where.start}:{where.stop}" if where is not None else "",
                         error=ConsensusError)
    return arr.astype(np.uint64, copy=False)


def split_consensus(a, b, min_size: int = 0, *, slab_voxels: int = 1 << 24, names=("a", "b"), sink=None):
    """Consensus of two same-shape label volumes (NumPy arrays or
    :class:`~floodfilling.volumes.Volume` handles, read slab by slab). Returns
    ``(volume, table)``: uint32 (uint64 when ids pass 2^32) and the :class:`ConsensusTable`.
    ``sink(shape, dtype)``, when given, returns a ``write(slices, slab)`` function that receives
    the output slab by slab instead (the volume returned is then None)."""
    if tuple(a.shape) != tuple(b.shape) or len(a.shape) != 3:
        raise ConsensusError(f"{names[1]}: shape {tuple(b.shape)} does not match {names[0]}'s {tuple(a.shape)} "
                             "(both must be 3-D)")
    if int(min_size) < 0:
        raise ConsensusError(f"min_size={min_size}: must be >= 0")
    shape = tuple(int(s) for s in a.shape)
    slabs = list(_slabs(shape, slab_voxels))
    # pass 1: pieces and their sizes
    parts_p, parts_c, max_a = [], [], 0
    for sl in slabs:
        sa, sb = _labels(np.asarray(a[sl]), names[0], sl), _labels(np.asarray(b[sl]), names[1], sl)
        p, c = kernels.count_pairs(sa, sb)
        parts_p.append(p)
        parts_c.append(c)
        if sa.size:
            max_a = max(max_a, int(sa.max()))
    pairs = np.concatenate(parts_p) if parts_p else np.zeros((0, 2), np.uint64)
    counts = np.concatenate(parts_c) if parts_c else np.zeros(0, np.int64)
    if len(slabs) > 1 and len(pairs):
        pairs, inv = np.unique(pairs, axis=0, return_inverse=True)
        counts = np.bincount(inv.ravel(), weights=counts, minlength=len(pairs)).astype(np.int64)
    table = consensus_table(pairs, counts, min_size, max_a)
    dtype = np.dtype(np.uint32) if table.max_id < 2**32 else np.dtype(np.uint64)
    # pass 2: each voxel's piece -> its output id, via one 64-bit key per voxel
    wide = len(pairs) and (int(pairs[:, 0].max()) >= 2**32 or int(pairs[:, 1].max()) >= 2**32)
    if wide:  # compress ids to their ranks so that a key still fits 64 bits
        a_ids, b_ids = np.unique(pairs[:, 0]), np.unique(pairs[:, 1])
        ka = np.searchsorted(a_ids, pairs[:, 0]).astype(np.uint64)
        kb = np.searchsorted(b_ids, pairs[:, 1]).astype(np.uint64)
    else:
        ka, kb = pairs[:, 0], pairs[:, 1]
    keys = (ka << np.uint64(32)) | kb  # sorted like the pairs
    if sink is None:
        out = np.zeros(shape, dtype)

        def write(s, v):
            out[s] = v
    else:
        out, write = None, sink(shape, dtype)
    for sl in slabs:
        sa, sb = _labels(np.asarray(a[sl]), names[0]), _labels(np.asarray(b[sl]), names[1])
        if wide:
            sa = np.searchsorted(a_ids, sa).astype(np.uint64)
            sb = np.searchsorted(b_ids, sb).astype(np.uint64)
        key = np.ascontiguousarray((sa << np.uint64(32)) | sb)
        kernels.relabel(key, keys, table.out_ids)
        write((sl,), key.astype(dtype))
    log.info("consensus: %d pieces, %d kept as their A id, %d new, %d removed", len(pairs),
             int(np.count_nonzero((table.out_ids > 0) & (table.out_ids == table.pairs[:, 0]))),
             int(np.count_nonzero(table.out_ids > max_a)), int(np.count_nonzero(table.out_ids == 0)))
    return out, table


def consensus(a_spec: str, b_spec: str, out_spec: str, *, min_size: int = 0, overwrite: bool = False,
              slab_voxels: int = 1 << 24) -> ConsensusTable:
    """Reads A and B, writes their split consensus to ``out_spec`` (atomically) with A's origins
    for the ids that survive (``<ds>_origins``); returns the table of pieces."""
    out = volumes.parse_volume_spec(out_spec)
    names = [str(out.dataset), f"{out.dataset}_origins"]
    out = outputs.check_output(out, overwrite, names=names, inputs=[a_spec, b_spec])  # before any work
    with locks.output_lock(out, names):
        return _consensus_locked(a_spec, b_spec, out, out_spec, min_size, overwrite, slab_voxels)


def _consensus_locked(a_spec, b_spec, out, out_spec, min_size, overwrite, slab_voxels) -> ConsensusTable:
    from .results import read_origins

    origins = read_origins(a_spec)
    ds = out.dataset
    with volumes.open_volume(a_spec) as va, volumes.open_volume(b_spec) as vb:
        attrs = results.derived_attrs(va.attrs, consensus="split", consensus_a=a_spec, consensus_b=b_spec,
                                      min_size=int(min_size))
        names = [ds] + ([f"{ds}_origins"] if origins is not None else [])
        writer = results.ResultWriter(out.path, ds, names, str(os.getpid()))
        space = disk.SpaceCheck(out.path)
        try:
            def sink(shape, dtype):  # the result, created once the dtype is known, filled slab by slab
                target = writer.create({ds: (shape, dtype)}, {ds: attrs}, {})

                def write(sl, v):
                    results.write_region(target, ds, sl, v, space)
                return write

            _, table = split_consensus(va, vb, min_size, slab_voxels=slab_voxels, names=(a_spec, b_spec), sink=sink)
            kept = _kept_origins(origins, table)
            if kept is not None:
                writer.add_tables({f"{ds}_origins": kept})
            writer.commit()
        except BaseException:
            writer.discard()
            raise
    log.info("wrote %s: %d objects", out_spec, int(np.unique(table.out_ids[table.out_ids > 0]).size))
    return table


def _kept_origins(origins, table: ConsensusTable):
    """A's origins of the ids that survive (None when A has no table)."""
    if origins is None:
        return None
    return origins[np.isin(origins["id"], np.unique(table.out_ids[table.out_ids > 0]))]
