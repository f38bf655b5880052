"""Neuroglancer "precomputed" export (``ffn export``; ``pip install 'floodfilling[export]'``).

Writes a label volume (a segmentation, ground truth) or an image as a precomputed layer with
CloudVolume, to a local directory or a bucket (``gs://``, ``s3://``: whatever CloudVolume
reaches), with a pyramid of downsampled scales (mode pooling for labels, averaging for
images, :func:`downsample`) so that a browser can show the whole volume zoomed out::

    ffn export out.h5:seg  precomputed/seg     # label volume -> "segmentation" layer
    ffn export image.h5:raw precomputed/image  # anything else -> "image" layer

Geometry: precomputed volumes are (x, y, z); our arrays are (z, y, x) and are transposed on the
way. Voxel size from ``resolution_zyx_nm`` (1 nm when absent, or ``resolution_zyx``). Chunks of
64^3 voxels; labels use the compressed_segmentation encoding (lossless), images raw. Each
level is ``factor`` times coarser than the one before: (2, 2, 2) for near-isotropic data,
(2, 2, 1) in x, y, z when z is at least twice as coarse as x and y. Levels stop when the largest
axis is at most 64 voxels (or at ``levels``).

Level 0 is written from the input in tiles of ``TILE`` voxels per axis (bounded memory);
level k is read back from level k-1 in tiles, downsampled, and written. ``bbox`` (or a
segmentation of a box of its image, whose ``bbox_zyx`` attribute says where it
lies) places the layer at its offset, so it overlays a layer of the whole image. A local directory is written uncompressed (a static HTTP server with CORS can then
serve it to neuroglancer as ``precomputed://http://host/path``); buckets get gzip with the
Content-Encoding set by CloudVolume. An existing layer is replaced only with ``overwrite``.

A local layer is written under the lock ``DEST.lock`` (:mod:`floodfilling.locks`: a second export
to the same place fails at once) into ``DEST.tmp-<pid>`` and renamed onto ``DEST`` when complete,
so an error or a kill leaves the previous layer (or none) and no partial one; a bucket is written
in place, unlocked (object stores have no exclusive create that CloudVolume exposes).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Sequence

import numpy as np

from . import boxes, disk, locks, volumes

log = logging.getLogger(__name__)

CHUNK = 64  # voxels per chunk axis
TILE = 128  # voxels per axis written at a time (a multiple of 2 * CHUNK); a level reads TILE * factor


class ExportError(ValueError):
    """Bad input to the export (one-line message naming the culprit)."""


def _imports():
    try:
        from cloudvolume import CloudVolume
    except ImportError:
        raise ExportError("export needs the optional package cloud-volume: install floodfilling[export] "
                          "(pip install 'floodfilling[export]')") from None
    return CloudVolume


def _url(dest: str) -> tuple[str, bool]:
    """(CloudVolume URL, is a local directory)."""
    if "://" in dest:
        return dest, dest.startswith("file://")
    return "file://" + os.path.abspath(dest), True


def pyramid_factor(res_xyz: Sequence[float]) -> tuple[int, int, int]:
    """Per-level downsampling factor in x, y, z (see the module docstring)."""
    x, y, z = (float(r) for r in res_xyz)
    return (2, 2, 1) if z >= 2 * max(x, y) else (2, 2, 2)


def pyramid_sizes(size_xyz: Sequence[int], factor: Sequence[int], levels: int | None = None) -> list[tuple]:
    """Approximate size of every level (ceil division; with an offset a level may hold one voxel
    more), until the largest axis is <= CHUNK (or ``levels``): decides how many levels."""
    sizes = [tuple(int(s) for s in size_xyz)]
    while (levels is None and max(sizes[-1]) > CHUNK) or (levels is not None and len(sizes) < levels + 1):
        nxt = tuple(-(-s // f) for s, f in zip(sizes[-1], factor))
        if nxt == sizes[-1]:
            break
        sizes.append(nxt)
    return sizes


def _tiles(size, tile):
    for z in range(0, size[2], tile[2]):
        for y in range(0, size[1], tile[1]):
            for x in range(0, size[0], tile[0]):
                yield (slice(x, min(x + tile[0], size[0])), slice(y, min(y + tile[1], size[1])),
                       slice(z, min(z + tile[2], size[2])))


def downsample(block: np.ndarray, factor, labels: bool) -> np.ndarray:
    """One level down by ``factor`` per axis. Labels: the most frequent label of each group of
    voxels (0 counts; ties: the smallest label). Images: the mean, rounded to nearest for
    integer types. A group cut by the block's end is completed by repeating its last voxels
    (so it takes the mode / mean of the voxels it has, for factors of 2)."""
    f = tuple(int(v) for v in factor)
    pad = [(0, (-n) % k) for n, k in zip(block.shape, f)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    n = tuple(s // k for s, k in zip(block.shape, f))
    g = block.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).transpose(0, 2, 4, 1, 3, 5).reshape(*n, -1)
    if labels:
        srt = np.sort(g, axis=-1)
        counts = np.stack([(srt == srt[..., j:j + 1]).sum(-1, dtype=np.int8) for j in range(srt.shape[-1])], -1)
        pick = counts.argmax(-1)  # first maximum: sorted, so the smallest label among ties
        return np.take_along_axis(srt, pick[..., None], -1)[..., 0]
    mean = g.mean(-1, dtype=np.float64)
    if block.dtype.kind in "iu":
        return np.floor(mean + 0.5).astype(block.dtype)
    return mean.astype(block.dtype)


def export(spec: str, dest: str, *, layer_type: str = "auto", levels: int | None = None,
           resolution_zyx: Sequence[float] | None = None, bbox: boxes.BBox | None = None, overwrite: bool = False,
           tile: int = TILE) -> dict[str, Any]:
    """Writes the volume ``spec`` as a precomputed layer at ``dest``; returns its info JSON.
    ``layer_type``: "segmentation", "image" or "auto" (integer types other than uint8 ->
    segmentation)."""
    CloudVolume = _imports()
    if levels is not None and levels < 0:
        raise ExportError(f"levels={levels}: must be >= 0")
    if tile % (CHUNK * 2) != 0:
        raise ExportError(f"tile {tile}: must be a multiple of {2 * CHUNK}")
    url, local = _url(dest)
    args = (spec, dest, layer_type, levels, resolution_zyx, bbox, tile, CloudVolume)
    if not local:
        return _write(url, False, *args)
    path = url[len("file://"):]
    with locks.file_lock(path + ".lock", f"layer {dest}", {"output": dest}):
        disk.remove_temporaries(path)  # of an export that was killed
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise ExportError(f"{dest}: exists and is not a directory; not replacing it")
            if not overwrite:
                raise ExportError(f"{dest} exists; pass overwrite=True to replace it")
            if not os.path.exists(os.path.join(path, "info")) and os.listdir(path):
                raise ExportError(f"{dest}: exists, is not empty and holds no precomputed layer; not replacing it")
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            info = _write("file://" + tmp, True, *args)
            with disk.disk_errors(dest):
                _replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return info


def _replace_directory(tmp: str, path: str) -> None:
    """Puts the finished layer ``tmp`` at ``path`` (an existing layer there is replaced)."""
    if not os.path.exists(path):
        os.rename(tmp, path)
    else:
        old = f"{path}.tmp-old-{os.getpid()}"  # a kill now: removed by the next export's remove_temporaries
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    disk.fsync_dir(os.path.dirname(path))


def _write(url: str, local: bool, spec, dest, layer_type, levels, resolution_zyx, bbox, tile, CloudVolume) -> dict:
    """The layer of :func:`export` written at ``url``; returns its info JSON."""
    with volumes.open_volume(spec) as vol:
        box = boxes.box_in(bbox, vol.shape)
        dt = np.dtype(vol.dtype)
        if layer_type == "auto":
            layer_type = "segmentation" if dt.kind in "iu" and dt != np.uint8 else "image"
        if layer_type not in ("segmentation", "image"):
            raise ExportError(f"layer_type={layer_type!r}: expected segmentation, image or auto")
        if layer_type == "segmentation":
            if dt.kind not in "iu":
                raise ExportError(f"{spec}: dtype {dt} cannot be a segmentation (integer labels needed)")
            out_dt = np.dtype(np.uint64) if dt.itemsize > 4 or dt.kind == "i" and dt.itemsize == 4 else np.dtype(np.uint32)
        else:
            out_dt = dt if dt in (np.uint8, np.uint16, np.float32) else np.dtype(np.float32)
        res_zyx = tuple(resolution_zyx) if resolution_zyx is not None else (vol.resolution_zyx_nm or (1.0, 1.0, 1.0))
        if len(res_zyx) != 3 or not all(float(r) > 0 for r in res_zyx):
            raise ExportError(f"resolution_zyx={res_zyx}: need 3 positive numbers (z, y, x nm)")
        res_xyz = [int(r) if float(r).is_integer() else float(r) for r in res_zyx[::-1]]
        base = _placed_at(vol)
        offset_xyz = [int(b + s) for b, s in zip(base, box.start)][::-1]
        size_xyz = box.shape[::-1]
        labels = layer_type == "segmentation"
        info = CloudVolume.create_new_info(
            num_channels=1, layer_type=layer_type, data_type=out_dt.name,
            encoding="compressed_segmentation" if labels else "raw", resolution=res_xyz,
            voxel_offset=offset_xyz, chunk_size=[CHUNK] * 3, volume_size=list(size_xyz))
        factor = pyramid_factor(res_xyz)
        sizes = pyramid_sizes(size_xyz, factor, levels)
        cv = CloudVolume(url, info=info, progress=False, compress=False if local else "gzip", non_aligned_writes=True)
        for k in range(1, len(sizes)):  # CloudVolume's factors are relative to level 0
            cv.add_scale(tuple(f ** k for f in factor), chunk_size=[CHUNK] * 3)
        cv.commit_info()
        # level 0 from the input, in tiles
        for sl in _tiles(size_xyz, (tile,) * 3):
            zyx = tuple(slice(s.start + o, s.stop + o) for s, o in zip(sl[::-1], box.start))
            data = np.asarray(vol[zyx])
            if labels and dt.kind == "i" and data.size and data.min() < 0:
                raise ExportError(f"{spec}: negative labels cannot be exported as a segmentation")
            cv[tuple(slice(q.start + o, q.stop + o) for q, o in zip(sl, offset_xyz))] = np.ascontiguousarray(
                data.transpose(2, 1, 0)).astype(out_dt, copy=False)
    # level k from level k-1, in absolute coordinates: source tiles start at multiples of
    # tile * factor (only the first may start later, at the offset; it is padded in front by
    # replicating its first voxels so that pooling groups stay aligned to multiples of factor)
    for k in range(1, len(sizes)):
        src = CloudVolume(url, mip=k - 1, progress=False, fill_missing=False)
        dst = CloudVolume(url, mip=k, progress=False, compress=False if local else "gzip",
                          non_aligned_writes=True)
        lo, hi = (np.asarray(v, np.int64) for v in (src.meta.bounds(k - 1).minpt, src.meta.bounds(k - 1).maxpt))
        dhi = np.asarray(dst.meta.bounds(k).maxpt, np.int64)
        step = np.asarray([tile * f for f in factor], np.int64)
        first = (lo // step) * step
        ranges = [range(int(first[a]), int(hi[a]), int(step[a])) for a in range(3)]
        for tz in ranges[2]:
            for ty in ranges[1]:
                for tx in ranges[0]:
                    t = np.array([tx, ty, tz])
                    a, b = np.maximum(t, lo), np.minimum(t + step, hi)
                    block = np.asarray(src[a[0]:b[0], a[1]:b[1], a[2]:b[2]])[..., 0]
                    front = a % np.asarray(factor)
                    if front.any():
                        block = np.pad(block, [(int(p), 0) for p in front], mode="edge")
                    small = downsample(block, factor, labels).astype(out_dt, copy=False)
                    d0 = a // np.asarray(factor)
                    d1 = np.minimum(d0 + small.shape, dhi)  # CloudVolume rounds a level's end down
                    if np.any(d1 <= d0):
                        continue
                    dst[d0[0]:d1[0], d0[1]:d1[1], d0[2]:d1[2]] = small[:d1[0] - d0[0], :d1[1] - d0[1],
                                                                        :d1[2] - d0[2]]
    log.info("wrote %s: %s layer, %d level(s), factor %s", dest, layer_type, len(sizes), factor)
    return dict(CloudVolume(url, progress=False).info)


def _placed_at(vol) -> tuple[int, int, int]:
    """Where the volume lies in its image (z, y, x): the start of its ``bbox_zyx`` attribute
    (written by ``segment`` with a ``bbox``), else the origin."""
    b = vol.attrs.get("bbox_zyx")
    try:
        start = [int(v) for v in np.asarray(b[0]).reshape(-1)] if b is not None else [0, 0, 0]
    except (TypeError, ValueError, IndexError):
        start = [0, 0, 0]
    return tuple(start) if len(start) == 3 and min(start) >= 0 else (0, 0, 0)  # type: ignore[return-value]
