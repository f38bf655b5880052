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

import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import boxes, disk, locks, volumes

if TYPE_CHECKING:
    from .meshes import MeshOptions

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


def _check_existing_dest(path: str, dest: str, overwrite: bool) -> None:
    """What may be at the destination directory ``path`` of a local export (under its lock):
    nothing, or with ``overwrite`` a precomputed layer (or an empty directory)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ExportError(f"{dest}: exists and is not a directory; not replacing it")
        if not overwrite:
            raise ExportError(f"{dest} exists; pass overwrite=True to replace it")
        if not os.path.exists(os.path.join(path, "info")) and os.listdir(path):
            raise ExportError(f"{dest}: exists, is not empty and holds no precomputed layer; not replacing it")


def export(spec: str, dest: str, *, layer_type: str = "auto", levels: int | None = None,
           resolution_zyx: Sequence[float] | None = None, bbox: boxes.BBox | None = None, overwrite: bool = False,
           tile: int = TILE, meshes: "MeshOptions | None" = None, parallel: int = 1, join: bool = False,
           progress: bool = False) -> dict[str, Any]:
    """Writes the volume ``spec`` as a precomputed layer at ``dest``; returns its info JSON.
    ``layer_type``: "segmentation", "image" or "auto" (integer types other than uint8 ->
    segmentation). ``meshes``: meshes and/or skeletons beside a segmentation layer
    (:mod:`floodfilling.meshes`), built by ``parallel`` workers here; ``join``: work on that
    export started elsewhere (another node) with the same arguments."""
    CloudVolume = _imports()
    if levels is not None and levels < 0:
        raise ExportError(f"levels={levels}: must be >= 0")
    if tile % (CHUNK * 2) != 0:
        raise ExportError(f"tile {tile}: must be a multiple of {2 * CHUNK}")
    url, local = _url(dest)
    args = (spec, dest, layer_type, levels, resolution_zyx, bbox, tile, CloudVolume)
    if meshes is not None and (meshes.meshes or meshes.skeletons):
        return _export_with_meshes(url, local, args, meshes, overwrite, parallel, join, progress)
    if join:
        raise ExportError("join=True: only an export with meshes or skeletons can be joined")
    if not local:
        _probe_remote(url, dest)
    if not local:
        return _write(url, False, *args)
    path = url[len("file://"):]
    with locks.file_lock(path + ".lock", f"layer {dest}", {"output": dest}):
        disk.remove_temporaries(path)  # of an export that was killed
        _check_existing_dest(path, dest, overwrite)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            info = _write("file://" + tmp, True, *args)
            with disk.disk_errors(dest):
                _replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return info


def _probe_remote(url: str, dest: str) -> None:
    """An ExportError (one line) when the bucket at ``url`` cannot be reached (no credentials,
    no network, no such bucket), before anything is read or written."""
    import contextlib
    import io

    try:
        # cloudfiles prints its credential warnings: kept off the terminal (the error says it in one line)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from cloudfiles import CloudFiles

            if url.startswith("gs://"):  # no credentials: fail now, not after the client's retries
                from cloudfiles.secrets import google_credentials

                if google_credentials(url[len("gs://"):].split("/", 1)[0])[1] is None:
                    import google.auth

                    google.auth.default()
            CloudFiles(url).exists("info")
    except Exception as exc:  # noqa: BLE001 - every client library has its own errors
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{dest}: cannot reach it ({type(exc).__name__}: {first})") from None


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


def _write(url: str, local: bool, spec, dest, layer_type, levels, resolution_zyx, bbox, tile, CloudVolume,
           counter=None) -> dict:
    """The layer of :func:`export` written at ``url``; returns its info JSON. ``counter``
    (a :class:`floodfilling.meshes.VoxelCounter`) is given every level-0 tile of a segmentation."""
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
            if labels and counter is not None:
                counter.add(data)
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


def _request(spec, layer_type, levels, resolution_zyx, bbox, opts) -> dict:
    """What a work directory builds: the input's identity (path, dataset, shape, dtype, the file's
    size and modification time) and every option; a rerun resumes only an equal request."""
    from dataclasses import asdict

    with volumes.open_volume(spec) as vol:
        path = os.path.abspath(vol.path)
        st = os.stat(path)
        shape, dtype, dataset = list(vol.shape), str(vol.dtype), vol.dataset
    req = {"volume": path, "dataset": dataset, "shape": shape, "dtype": dtype, "file_size": st.st_size,
           "file_mtime_ns": st.st_mtime_ns, "layer_type": layer_type, "levels": levels,
           "resolution_zyx": None if resolution_zyx is None else [float(r) for r in resolution_zyx],
           "bbox": None if bbox is None else [list(bbox.start), list(bbox.stop)], "options": asdict(opts)}
    return json.loads(json.dumps(req))  # tuples as lists, as read back from export.json


def _check_labels_for_meshes(spec: str, layer_type: str) -> None:
    """Meshes and skeletons need a segmentation: an integer volume (uint8 only with layer_type="segmentation")."""
    with volumes.open_volume(spec) as vol:
        dt = np.dtype(vol.dtype)
    if layer_type == "image" or dt.kind not in "iu" or (dt == np.uint8 and layer_type != "segmentation"):
        hint = " (uint8 labels: pass layer_type=segmentation)" if dt == np.uint8 and layer_type == "auto" else ""
        raise ExportError(f"{spec}: dtype {dt} is not a label volume; meshes and skeletons need a "
                          f"segmentation{hint}")


def _export_with_meshes(url, local, args, opts, overwrite, parallel, join, progress) -> dict:
    """:func:`export` with meshes and/or skeletons: the layer is built in the work directory
    ``DEST.partial`` (stages recorded there: a killed export resumes) and renamed onto DEST."""
    from . import meshes

    meshes.check_available()
    spec, dest, layer_type, levels, resolution_zyx, bbox = args[:6]
    if not local:
        raise ExportError(f"{dest}: meshes and skeletons are built in a directory (shared by the nodes that "
                          "join); export to one and copy it to the bucket")
    if parallel < 0:
        raise ExportError(f"parallel={parallel}: must be >= 0 (0: only nodes that join work)")
    _check_labels_for_meshes(spec, layer_type)
    path = url[len("file://"):]
    work = path + ".partial"
    request = _request(spec, layer_type, levels, resolution_zyx, bbox, opts)
    if join:
        meshes.join(work, path, request, parallel, progress)
        return dict(args[-1](url, progress=False).info)
    with locks.file_lock(path + ".lock", f"layer {dest}", {"output": dest}):
        disk.remove_temporaries(path)
        _check_existing_dest(path, dest, overwrite)
        st = meshes.read_state(work)
        if st is not None and st.request != request:
            log.info("%s: an unfinished export of other arguments; starting over", work)
            st = None
        if st is None:
            shutil.rmtree(work, ignore_errors=True)
            with disk.disk_errors(work):
                os.makedirs(work)
            st = meshes.WorkState(request=request)
            meshes.write_state(work, st)
        else:
            log.info("%s: resuming (stages done: %s)", work, ", ".join(["layer"] * st.layer_done + st.done) or "none")
        layer = os.path.join(work, "layer")
        lurl = "file://" + layer
        try:
            if not st.layer_done:
                shutil.rmtree(layer, ignore_errors=True)
                counter = meshes.VoxelCounter()
                _write(lurl, True, *args, counter=counter)
                meshes.write_segment_properties(layer, counter.ids, counter.counts)
                st.objects, st.layer_done = len(counter.ids), True
                meshes.write_state(work, st)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming yet
            raise
        meshes.run_stages(work, lurl, st, opts, parallel, progress)
        with disk.disk_errors(dest):
            _replace_directory(layer, path)
        shutil.rmtree(work, ignore_errors=True)
    info = dict(args[-1](url, progress=False).info)
    log.info("wrote %s with %s", dest, ", ".join(opts.stages()))
    return info


def _placed_at(vol) -> tuple[int, int, int]:
    """Where the volume lies in its image (z, y, x): the start of its ``bbox_zyx`` attribute
    (written by ``segment`` with a ``bbox``), else the origin."""
    b = vol.attrs.get("bbox_zyx")
    try:
        start = [int(v) for v in np.asarray(b[0]).reshape(-1)] if b is not None else [0, 0, 0]
    except (TypeError, ValueError, IndexError):
        start = [0, 0, 0]
    return tuple(start) if len(start) == 3 and min(start) >= 0 else (0, 0, 0)  # type: ignore[return-value]
