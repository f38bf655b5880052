"""Post-processing of a segmentation (off by default: the reference's output is unprocessed).

- :func:`split_disconnected`: every object becomes its connected components (6-connected),
  numbered in (old id, raster order of the component) order;
- :func:`remove_dust`: objects with fewer than ``min_size`` voxels become 0;
- :func:`make_contiguous`: ids become 1..N in ascending order of the old ids.
Each returns the new volume and ``old_to_new`` for the seed-carrying component of each object
(used to keep the origins table consistent).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def split_disconnected(seg: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Returns (new segmentation, {old id: its new component ids})."""
    out = np.zeros(seg.shape, dtype=np.uint32)
    parts: dict[int, np.ndarray] = {}
    nxt = 1
    s = seg.astype(np.int64, copy=False)
    for i, sl in enumerate(ndimage.find_objects(s), start=1):
        if sl is None:
            continue
        mask = s[sl] == i
        lab, n = ndimage.label(mask)
        view = out[sl]
        view[mask] = lab[mask].astype(np.uint32) + np.uint32(nxt - 1)
        parts[i] = np.arange(nxt, nxt + n, dtype=np.uint32)
        nxt += n
    return out, parts


def remove_dust(seg: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 0:
        return seg
    counts = np.bincount(seg.ravel())
    small = np.flatnonzero(counts < min_size)
    small = small[small > 0]
    out = seg.copy()
    if small.size:
        out[np.isin(seg, small)] = 0
    return out


def make_contiguous(seg: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    ids = np.unique(seg)
    ids = ids[ids > 0]
    lut = np.zeros(int(seg.max()) + 1 if seg.size else 1, dtype=np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    return lut[seg], {int(a): int(b) for a, b in zip(ids, lut[ids])}


def postprocess(seg: np.ndarray, origins: dict, *, split: bool, dust_size: int):
    """Applies the chosen steps; returns (segmentation, origins re-keyed by new id)."""
    if not split and dust_size <= 0:
        return seg, origins
    out = seg
    if split:
        out, _ = split_disconnected(out)
    out = remove_dust(out, dust_size)
    out, mapping = make_contiguous(out)
    new_origins = {}
    for old, o in origins.items():
        new = int(out[tuple(o.seed_zyx)])
        if new > 0:
            new_origins[new] = o
    return out, new_origins
