"""Per-object table of a segmentation (``ffn stats SEG [--labels GT] [--skeletons DEST] --out objects.csv``).

One row per object (label 0 is background and has no row), columns in this order:

- ``id``; ``voxels``; ``volume_um3``: voxels times the voxel size (``resolution_zyx_nm``
  attribute, 1 nm when absent) in cubic micrometres;
- ``z0, y0, x0, z1, y1, x1``: the bounding box in voxels, half-open, in the volume's own frame;
- ``centroid_z, centroid_y, centroid_x``: the mean voxel index (voxel centres at integers);
- ``touches_border``: 1 when the object has a voxel on a face of the volume (it may continue
  outside it), else 0;
- with ``skeletons`` (a layer written by ``ffn export --skeletons``): ``cable_length_nm``, the
  summed edge length of the object's skeleton in nm (empty when the object has none: objects
  below the skeleton dust threshold);
- with ``labels`` (ground truth of the same shape): ``gt_id``, the ground-truth body (a non-zero
  gt label) that the object overlaps most (ties: the smallest id; 0 when the object lies on gt
  0 only) and ``gt_fraction``, the share of the object's voxels that lie on it.

The volume is read slab by slab along z (``slab`` planes at a time), so a segmentation larger
than memory is fine; memory grows with the number of objects (and of object/gt pairs), not the
volume. The table is written atomically (:func:`floodfilling.disk.atomic_write_bytes`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from . import disk, volumes
from .errors import VolumeError

log = logging.getLogger(__name__)

SLAB = 32  # z planes read at a time


@dataclass
class ObjectTable:
    """The per-object columns (one entry per object, ids ascending); see the module docstring."""

    ids: np.ndarray  # uint64
    voxels: np.ndarray  # int64
    volume_um3: np.ndarray  # float64
    bbox_start: np.ndarray  # (n, 3) int64, z y x
    bbox_stop: np.ndarray  # (n, 3) int64, half-open
    centroid: np.ndarray  # (n, 3) float64, z y x voxels
    touches_border: np.ndarray  # bool
    cable_length_nm: np.ndarray | None = None  # float64, NaN: no skeleton
    gt_id: np.ndarray | None = None  # uint64
    gt_fraction: np.ndarray | None = None  # float64

    def to_csv(self) -> str:
        head = ["id", "voxels", "volume_um3", "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z", "centroid_y",
                "centroid_x", "touches_border"]
        if self.cable_length_nm is not None:
            head.append("cable_length_nm")
        if self.gt_id is not None:
            head += ["gt_id", "gt_fraction"]
        out = io.StringIO()
        out.write(",".join(head) + "\n")
        for i in range(len(self.ids)):
            row = [str(int(self.ids[i])), str(int(self.voxels[i])), f"{self.volume_um3[i]:.6g}",
                   *(str(int(v)) for v in self.bbox_start[i]), *(str(int(v)) for v in self.bbox_stop[i]),
                   *(f"{v:.3f}" for v in self.centroid[i]), str(int(self.touches_border[i]))]
            if self.cable_length_nm is not None:
                c = self.cable_length_nm[i]
                row.append("" if np.isnan(c) else f"{c:.1f}")
            if self.gt_id is not None:
                row += [str(int(self.gt_id[i])), f"{self.gt_fraction[i]:.4f}"]
            out.write(",".join(row) + "\n")
        return out.getvalue()


class _Acc:
    """Running per-id sums over slabs (ids kept sorted)."""

    def __init__(self):
        self.ids = np.zeros(0, np.uint64)
        self.n = np.zeros(0, np.int64)
        self.sums = np.zeros((0, 3), np.float64)
        self.lo = np.zeros((0, 3), np.int64)
        self.hi = np.zeros((0, 3), np.int64)
        self.border = np.zeros(0, bool)

    def add(self, ids, n, sums, lo, hi, border):
        allids = np.concatenate([self.ids, ids])
        u, inv = np.unique(allids, return_inverse=True)
        k = len(u)
        nn = np.zeros(k, np.int64)
        np.add.at(nn, inv, np.concatenate([self.n, n]))
        ss = np.zeros((k, 3), np.float64)
        np.add.at(ss, inv, np.concatenate([self.sums, sums]))
        ll = np.full((k, 3), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(ll, inv, np.concatenate([self.lo, lo]))
        hh = np.full((k, 3), -1, np.int64)
        np.maximum.at(hh, inv, np.concatenate([self.hi, hi]))
        bb = np.zeros(k, bool)
        np.logical_or.at(bb, inv, np.concatenate([self.border, border]))
        self.ids, self.n, self.sums, self.lo, self.hi, self.border = u, nn, ss, ll, hh, bb


def _slab_stats(seg: np.ndarray, z0: int, shape: tuple):
    """Per-id count, coordinate sums, min/max index and border flag of one slab starting at plane z0."""
    flat = seg.reshape(-1)
    keep = flat != 0
    ids, inv = np.unique(flat[keep], return_inverse=True)
    k = len(ids)
    zz, yy, xx = np.indices(seg.shape, dtype=np.int64)
    coords = np.stack([zz.reshape(-1)[keep] + z0, yy.reshape(-1)[keep], xx.reshape(-1)[keep]], 1)
    n = np.bincount(inv, minlength=k).astype(np.int64)
    sums = np.stack([np.bincount(inv, weights=coords[:, a], minlength=k) for a in range(3)], 1)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]) if k else np.zeros(0, np.int64)
    sc = coords[order]
    lo = np.minimum.reduceat(sc, starts, axis=0) if k else np.zeros((0, 3), np.int64)
    hi = np.maximum.reduceat(sc, starts, axis=0) if k else np.zeros((0, 3), np.int64)
    at_face = ((coords == 0) | (coords == np.asarray(shape, np.int64) - 1)).any(1)
    border = np.bincount(inv, weights=at_face, minlength=k) > 0
    return ids.astype(np.uint64), n, sums, lo, hi, border


def _check_labels_volume(spec: str, vol) -> None:
    if vol.ndim != 3:
        raise VolumeError(f"{spec}: expected a 3-D label volume, got shape {tuple(vol.shape)}")
    if np.dtype(vol.dtype).kind not in "iu":
        raise VolumeError(f"{spec}: dtype {vol.dtype} is not a label (integer) type")


def object_table(seg_spec: str, labels: str | None = None, skeletons: str | None = None,
                 slab: int = SLAB) -> ObjectTable:
    """The :class:`ObjectTable` of the segmentation ``seg_spec`` (see the module docstring)."""
    with volumes.open_volume(seg_spec) as seg:
        _check_labels_volume(seg_spec, seg)
        shape = tuple(int(s) for s in seg.shape)
        skel = _skeleton_layer(skeletons, shape) if skeletons is not None else None  # checked before the pass
        res = tuple(float(r) for r in (seg.resolution_zyx_nm or (1.0, 1.0, 1.0)))
        gt = volumes.open_volume(labels) if labels is not None else None
        try:
            if gt is not None:
                _check_labels_volume(labels, gt)
                if tuple(gt.shape) != shape:
                    raise VolumeError(f"{labels}: shape {tuple(gt.shape)} does not match the segmentation "
                                      f"{seg_spec}'s {shape}")
            acc = _Acc()
            pairs: dict[tuple[int, int], int] = {}
            for z0 in range(0, shape[0], slab):
                s = np.asarray(seg[z0:min(z0 + slab, shape[0])])
                if s.dtype.kind == "i" and s.size and s.min() < 0:
                    raise VolumeError(f"{seg_spec}: negative labels (at z {z0}..{z0 + s.shape[0]})")
                acc.add(*_slab_stats(s, z0, shape))
                if gt is not None:
                    g = np.asarray(gt[z0:min(z0 + slab, shape[0])]).astype(np.int64).reshape(-1)
                    fs = s.astype(np.uint64).reshape(-1)
                    m = (fs != 0) & (g != 0)
                    if m.any():
                        pr, c = np.unique(np.stack([fs[m], g[m].astype(np.uint64)], 1), axis=0, return_counts=True)
                        for (a, b), cnt in zip(pr.tolist(), c.tolist()):
                            pairs[(a, b)] = pairs.get((a, b), 0) + cnt
        finally:
            if gt is not None:
                gt.close()
    n = acc.n
    table = ObjectTable(ids=acc.ids, voxels=n, volume_um3=n * float(np.prod(res)) / 1e9,
                        bbox_start=acc.lo, bbox_stop=acc.hi + 1,
                        centroid=acc.sums / np.maximum(n, 1)[:, None], touches_border=acc.border)
    if labels is not None:
        best: dict[int, tuple[int, int]] = {}
        for (a, b), cnt in sorted(pairs.items()):
            if a not in best or cnt > best[a][1]:
                best[a] = (b, cnt)
        table.gt_id = np.array([best.get(int(i), (0, 0))[0] for i in acc.ids], np.uint64)
        table.gt_fraction = np.array([best.get(int(i), (0, 0))[1] for i in acc.ids], np.float64) / np.maximum(n, 1)
    if skeletons is not None:
        table.cable_length_nm = cable_lengths(skel, acc.ids)
    log.info("%s: %d objects", seg_spec, len(acc.ids))
    return table


def _skeleton_layer(layer: str, shape_zyx: tuple):
    """The CloudVolume of the precomputed layer ``layer`` (a directory or URL written by ``ffn
    export --skeletons``), checked: readable, with skeletons, of the segmentation's shape."""
    from .export import ExportError, _imports, _url

    CloudVolume = _imports()
    url, _ = _url(layer)
    try:
        cv = CloudVolume(url, progress=False)
        info = cv.info
    except Exception as exc:  # noqa: BLE001 - CloudVolume's errors are many; one line names the layer
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{layer}: not a readable precomputed layer ({type(exc).__name__}: {first})") from None
    if "skeletons" not in info:
        raise ExportError(f"{layer}: the layer has no skeletons (export it with --skeletons)")
    size = tuple(int(v) for v in info["scales"][0]["size"])[::-1]
    if size != tuple(shape_zyx):
        raise ExportError(f"{layer}: layer size (z, y, x) {size} does not match the segmentation's {tuple(shape_zyx)}")
    return cv


def cable_lengths(cv, ids: np.ndarray) -> np.ndarray:
    """Cable length (nm) of the skeleton of each id in the layer ``cv`` (:func:`_skeleton_layer`);
    NaN where an id has none."""
    info = cv.info
    from cloudfiles import CloudFiles

    cf = CloudFiles(cv.cloudpath)
    present = set()
    for name in cf.list(prefix=info["skeletons"] + "/"):
        base = name.rsplit("/", 1)[-1].removesuffix(".gz")
        if base.isdigit():
            present.add(int(base))
    out = np.full(len(ids), np.nan)
    want = [int(i) for i in ids if int(i) in present]
    if want:
        skels = cv.skeleton.get(want)
        skels = skels if isinstance(skels, list) else [skels]
        by_id = {int(s.id): s for s in skels}
        for k, i in enumerate(ids):
            s = by_id.get(int(i))
            if s is not None:
                out[k] = float(s.cable_length())
    return out


def write_table(table: ObjectTable, path: str) -> None:
    """Writes ``table`` as CSV at ``path`` (atomically; an existing file is replaced)."""
    with disk.disk_errors(path):
        disk.atomic_write_bytes(path, table.to_csv().encode())
