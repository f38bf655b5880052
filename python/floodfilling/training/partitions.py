"""Partition volume and balanced training coordinates (the reference's
``compute_partitions.py`` + ``build_coordinates.py`` semantics, computed differently).

Partition value of a voxel (uint8, same shape as the labels):

* ``255`` (:data:`IGNORE`): within ``radius`` of the volume border on some axis, where the
  (2r+1)^3 box around the voxel does not fit (the reference's "valid" region convention);
* ``0``: background: label 0, or an object with fewer than ``min_size`` voxels ("dust");
* ``1 .. K+1`` for an object voxel: with ``f`` the fraction of the (2r+1)^3 box around the
  voxel that belongs to the same object, the value is ``i + 1`` for the first threshold
  ``thresholds[i]`` with ``f < thresholds[i]``, and ``K + 1`` when ``f`` reaches the last one
  (``K = len(thresholds)``).

The reference builds a summed-volume table of the *whole* volume for every label. Here each
object's table covers only its bounding box grown by the radius (clipped to the volume), and
the box sums are evaluated only on the object's own voxels in the valid region; the values are
identical (integer sums, the same float64 division and comparisons).

Coordinates: every partition value (except 255) inside ``margin`` of the border is a class;
each class's voxel list is permuted and repeated (``np.resize``) to the size of the largest
class, all classes are concatenated and the whole list is shuffled, all from one seeded
generator. Coordinates are (z, y, x), int32, at least ``margin`` from every border, so a patch
of ``2 * margin + 1`` voxels around each fits in the volume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from .. import boxes, outputs, storage, volumes

log = logging.getLogger(__name__)

IGNORE = 255
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_RADIUS_ZYX: tuple[int, int, int] = (24, 24, 24)
DEFAULT_MIN_SIZE = 10000


class PartitionError(ValueError):
    """Labels or options that cannot give a partition volume / coordinates (one-line message)."""


def _int3(v, what: str, minimum: int = 0) -> tuple[int, int, int]:
    """``v`` (3 integers, or one for every axis) checked by :func:`floodfilling.boxes.check_zyx`."""
    return boxes.check_zyx((v,) * 3 if isinstance(v, (int, np.integer)) else v, what, minimum)


def check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    th = np.asarray([float(t) for t in thresholds], dtype=np.float64)
    if th.size == 0 or th.size > 253:
        raise PartitionError(f"thresholds: expected 1 to 253 values, got {th.size}")
    if np.any(np.diff(th) <= 0) or th[0] <= 0 or th[-1] > 1:
        raise PartitionError(f"thresholds must increase strictly within (0, 1], got {list(thresholds)}")
    return th


def labels_digest(labels: np.ndarray, slab_voxels: int = 1 << 24) -> str:
    """Digest of a label volume (first 16 hex digits of a sha256 over its shape and its ids as
    little-endian uint64, slab by slab along z): what ``ffn prepare`` records as the
    ``labels_digest`` attribute of its output and ``train`` compares (``coords``) with its
    training labels. Independent of the integer dtype the ids are stored in."""
    import hashlib

    a = np.asarray(labels)
    h = hashlib.sha256(json.dumps([int(v) for v in a.shape]).encode())
    if a.ndim == 0 or a.size == 0:
        h.update(a.astype("<u8").tobytes())
        return h.hexdigest()[:16]
    step = max(1, int(slab_voxels) // max(1, a.size // a.shape[0]))
    for z in range(0, a.shape[0], step):
        h.update(np.ascontiguousarray(a[z:z + step], dtype="<u8").tobytes())
    return h.hexdigest()[:16]


def clear_dust(labels: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of ``labels`` with every object of fewer than ``min_size`` voxels set to 0."""
    ids, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = counts >= min_size
    out = np.where(keep[inv.reshape(labels.shape)], labels, 0)
    return out.astype(labels.dtype, copy=False)


def compute_partitions(labels: np.ndarray, radius_zyx=DEFAULT_RADIUS_ZYX,
                       thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                       min_size: int = DEFAULT_MIN_SIZE, source: str = "labels") -> np.ndarray:
    """The partition volume (uint8, shape of ``labels``); see the module docstring."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise PartitionError(f"{source}: expected a 3-D (z, y, x) label volume, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise PartitionError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    r = np.array(_int3(radius_zyx, "radius_zyx"))
    th = check_thresholds(thresholds)
    if min_size < 1:
        raise PartitionError(f"min_size={min_size}: must be >= 1")
    shape = np.array(labels.shape)
    diam = 2 * r + 1
    if np.any(shape < diam):
        raise PartitionError(f"{source}: volume of shape {tuple(int(x) for x in shape)} is smaller than the "
                             f"partition box "
                             f"2*radius+1 = {tuple(int(d) for d in diam)}")
    from scipy import ndimage

    t0 = time.perf_counter()
    ids, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if ids.size:
        volumes.check_labels(labels, source, minimum=ids[0], error=PartitionError)
    inv = inv.reshape(labels.shape).astype(np.int32 if ids.size < 2**31 else np.int64)
    keep = (ids != 0) & (counts >= min_size)
    if not keep.any():
        biggest = int(counts[ids != 0].max()) if np.any(ids != 0) else 0
        raise PartitionError(f"{source}: no object has >= {min_size} voxels (largest: {biggest}); "
                             "lower the minimum object size")
    # find_objects wants labels >= 1: compact index j is stored as j + 1.
    slices = ndimage.find_objects(inv + 1)
    out = np.full(labels.shape, IGNORE, dtype=np.uint8)
    lo_valid, hi_valid = r, shape - r  # valid voxels: r <= v < shape - r
    out[tuple(slice(a, b) for a, b in zip(lo_valid, hi_valid))] = 0
    box_volume = float(np.prod(diam))
    for j in np.flatnonzero(keep):
        sl = slices[j]
        start = np.array([s.start for s in sl])
        stop = np.array([s.stop for s in sl])
        # Voxels whose partition we set: the object's bbox within the valid region.
        v0 = np.maximum(start, lo_valid)
        v1 = np.minimum(stop, hi_valid)
        if np.any(v1 <= v0):
            continue
        # Context needed for their boxes: [v0 - r, v1 + r), inside the volume by construction.
        c0, c1 = v0 - r, v1 + r
        crop = inv[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]] == j
        sat = np.zeros(tuple(c1 - c0 + 1), dtype=np.int32)
        inner = sat[1:, 1:, 1:]
        np.cumsum(crop, axis=0, dtype=np.int32, out=inner)
        np.cumsum(inner, axis=1, out=inner)
        np.cumsum(inner, axis=2, out=inner)
        n = v1 - v0  # number of target voxels per axis; box of target i spans sat[i : i + diam]
        a = [slice(0, n[k]) for k in range(3)]
        b = [slice(diam[k], diam[k] + n[k]) for k in range(3)]
        s = (sat[b[0], b[1], b[2]] - sat[a[0], b[1], b[2]] - sat[b[0], a[1], b[2]] - sat[b[0], b[1], a[2]]
             + sat[a[0], a[1], b[2]] + sat[a[0], b[1], a[2]] + sat[b[0], a[1], a[2]] - sat[a[0], a[1], a[2]])
        own = crop[r[0]:r[0] + n[0], r[1]:r[1] + n[1], r[2]:r[2] + n[2]]
        frac = s[own] / box_volume
        part = (np.searchsorted(th, frac, side="right") + 1).astype(np.uint8)
        view = out[v0[0]:v1[0], v0[1]:v1[1], v0[2]:v1[2]]
        view[own] = part
    log.info("partitions of %s: %d objects >= %d voxels, %.1f s", source, int(keep.sum()), min_size,
             time.perf_counter() - t0)
    return out


def partition_counts(partitions: np.ndarray) -> dict[int, int]:
    vals, cnt = np.unique(partitions, return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, cnt)}


def build_coordinates(partitions: np.ndarray, margin_zyx, seed: int = 0,
                      source: str = "partitions") -> np.ndarray:
    """Balanced, shuffled training coordinates (N, 3) int32 (z, y, x); see the module docstring."""
    partitions = np.asarray(partitions)
    m = np.array(_int3(margin_zyx, "margin_zyx"))
    shape = np.array(partitions.shape)
    if np.any(shape - 2 * m < 1):
        raise PartitionError(f"{source}: volume of shape {tuple(int(x) for x in shape)} has no voxel at least "
                             f"{tuple(int(x) for x in m)} "
                             f"from the border (the training patch does not fit)")
    region = partitions[m[0]:shape[0] - m[0], m[1]:shape[1] - m[1], m[2]:shape[2] - m[2]]
    flat = region.ravel()
    order = np.argsort(flat, kind="stable")
    vals, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    groups = [(int(v), order[s:s + c]) for v, s, c in zip(vals, starts, counts) if v != IGNORE]
    if not groups:
        raise PartitionError(f"{source}: no usable voxel at least {tuple(int(x) for x in m)} from the border")
    rng = np.random.default_rng(seed)
    max_count = max(len(g) for _, g in groups)
    idx = np.concatenate([np.resize(rng.permutation(g), max_count) for _, g in groups])
    rng.shuffle(idx)
    coords = np.stack(np.unravel_index(idx, region.shape), axis=1) + m
    log.info("coordinates: %d classes x %d = %d", len(groups), max_count, len(coords))
    return coords.astype(np.int32)


def prepare(labels_spec: str, out_path: str, radius_zyx=DEFAULT_RADIUS_ZYX,
            thresholds: Sequence[float] = DEFAULT_THRESHOLDS, min_size: int = DEFAULT_MIN_SIZE,
            margin_zyx=None, seed: int = 0, overwrite: bool = False) -> dict:
    """``ffn prepare``: writes ``partitions`` (uint8, labels' shape) and ``coords`` ((N, 3) z, y, x)
    into the HDF5 file ``out_path`` atomically (an existing file keeps its other datasets, its
    mode, owner and hard links; a symbolic link is written through; the labels themselves are
    never replaced, :func:`outputs.check_output`). ``margin_zyx`` defaults
    to the radius. Returns a summary (counts, number of coordinates, seconds)."""
    from .. import locks

    t0 = time.perf_counter()
    radius = _int3(radius_zyx, "radius_zyx")
    margin = radius if margin_zyx is None else _int3(margin_zyx, "margin_zyx")
    out_path = str(out_path)
    if ":" in os.path.basename(out_path):
        raise PartitionError(f"output {out_path}: give a file name (datasets 'partitions' and 'coords' are fixed)")
    names = ["partitions", "coords"]
    out = outputs.check_output(volumes.VolumeSpec(out_path, "partitions"), overwrite, names=names,
                               inputs=[labels_spec])  # before any work
    with locks.output_lock(out, names):
        with volumes.open_volume(labels_spec) as v:
            labels = v.read()
            src = str(v.spec)
            res = v.resolution_zyx_nm
        parts = compute_partitions(labels, radius, thresholds, min_size, source=src)
        t_part = time.perf_counter() - t0
        coords = build_coordinates(parts, margin, seed=seed, source=src)
        counts = partition_counts(parts)
        dtype = np.uint16 if max(labels.shape) < 2**16 else np.uint32
        common = {"source_labels": src, "radius_zyx": list(radius), "thresholds": [float(t) for t in thresholds],
                  "min_size": int(min_size), "volume_shape": list(labels.shape),
                  "labels_digest": labels_digest(labels)}
        if res is not None:
            common["resolution_zyx_nm"] = list(res)
        storage.write_hdf5_atomic(out.path, {"partitions": parts, "coords": coords.astype(dtype)}, attrs={
            "partitions": {**common, "partition_counts": counts},
            "coords": {**common, "margin_zyx": list(margin), "seed": int(seed), "axes": "zyx"},
        }, overwrite=overwrite)
    secs = time.perf_counter() - t0
    log.info("wrote %s: %d coordinates, %.1f s", out_path, len(coords), secs)
    return {"out": out_path, "partition_counts": counts, "coords": int(len(coords)), "seconds": secs,
            "partition_seconds": t_part}


def read_attrs(dset) -> dict:
    """Attributes of an h5py dataset as plain Python values."""
    out = {}
    for k, v in dset.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out
