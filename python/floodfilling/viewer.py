"""Looking at segmentations in neuroglancer (``pip install 'floodfilling[viewer]'``).

``ffn view IMAGE [SEG ...]`` serves an image and any number of label volumes (segmentations,
ground truth) from this process through neuroglancer's ``LocalVolume``: chunks are read
lazily from the HDF5/zarr files when the browser asks for them, so a large volume is never
loaded whole. The viewer's URL is printed; the command serves until Ctrl-C.

Axes: our arrays are (z, y, x); the layers get dimensions named z, y, x in nm, scaled by the
image's ``resolution_zyx_nm`` attribute (1 nm per voxel when it has none). With ``bbox``
only that box is served, placed at its offset in the volume. A segmentation written by
``ffn segment`` also gets a point layer ``<name>_origins``: the seed of every object (its id
as the point's id), inside the box.

Meshes (the 3-D panel): a volume's segmentation is meshed on demand by neuroglancer's
``LocalVolume`` (marching cubes of the objects shown; the box is read into memory on the first
mesh request, so at most ``MESH_MAX_VOXELS``). A precomputed layer directory (``ffn export``,
with ``--meshes``/``--skeletons``) given as IMAGE or SEG is served as it is from a local HTTP
server (CloudVolume's handler: CORS, byte ranges, gzip-stored files decoded) with its meshes,
skeletons and segment properties. ``show``: the meshes of that many of the largest objects are
shown at start (others: double-click them); the panels are zoomed to the volume.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Sequence

import numpy as np

from . import boxes, volumes

log = logging.getLogger(__name__)

MESH_MAX_VOXELS = 512**3  # largest box meshed on demand (read into memory on the first mesh request)


class ViewerError(ValueError):
    """Bad input to the viewer (one-line message naming the culprit)."""


def _import_neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise ViewerError("viewing needs the optional neuroglancer package: install floodfilling[viewer] "
                          "(pip install 'floodfilling[viewer]')") from None
    return neuroglancer


class LazyBox:
    """Array-like view of ``box`` of a :class:`~floodfilling.volumes.Volume`: shape, dtype and
    slicing with ``slice`` objects (steps of 1), read from the file on each access."""

    def __init__(self, vol: volumes.Volume, box: boxes.BBox):
        self.vol, self.box = vol, box
        self.shape = box.shape
        self.dtype = vol.dtype

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (3 - len(index))
        out = []
        for sl, start, n in zip(index, self.box.start, self.shape):
            if not isinstance(sl, slice) or sl.step not in (None, 1):
                raise IndexError("LazyBox supports slices with step 1 only")
            a, b, _ = sl.indices(n)
            out.append(slice(start + a, start + max(a, b)))
        return self.vol[tuple(out)]

    def transpose(self) -> np.ndarray:
        """The whole box, axes reversed: what neuroglancer's on-demand mesh generator asks for on
        the first mesh request (so on-demand meshes need the box in memory: at most
        ``MESH_MAX_VOXELS``; larger ones: ``ffn export --meshes`` and view the export)."""
        n = int(np.prod(self.shape))
        if n > MESH_MAX_VOXELS:
            raise ViewerError(f"{self.vol.spec}: {n} voxels is too many to mesh on demand (at most "
                              f"{MESH_MAX_VOXELS}); export it with meshes and view the export")
        return self[:, :, :].transpose()


@dataclass
class Layer:
    name: str
    spec: str
    kind: str  # "image" or "segmentation"
    data: LazyBox
    source: Any = None  # the neuroglancer LocalVolume serving it (after make_viewer)
    origins: np.ndarray | None = None  # a segmentation's origins table (ffn segment output), if any


def _layer_name(spec: str, taken: set[str]) -> str:
    parsed = volumes.parse_volume_spec(spec)
    base = parsed.dataset.strip("/").replace("/", "_") if parsed.dataset else PurePath(parsed.path).stem
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def open_layers(image: str, labels: Sequence[str] = (), bbox: boxes.BBox | None = None) -> tuple[list[Layer], tuple]:
    """Opens the volumes (lazily) and checks they fit together; returns the layers and the
    voxel size (z, y, x) in nm. Labels must be an integer type and have the image's shape."""
    vols: list[volumes.Volume] = []
    try:
        img = volumes.open_volume(image)
        vols.append(img)
        box = boxes.box_in(bbox, img.shape)
        taken: set[str] = set()
        layers = [Layer(_layer_name(image, taken), image, "image", LazyBox(img, box))]
        for spec in labels:
            v = volumes.open_volume(spec)
            vols.append(v)
            if v.shape != img.shape:
                raise ViewerError(f"{spec}: shape {v.shape} does not match the image {image}'s {img.shape}")
            if v.dtype.kind not in "iu":
                raise ViewerError(f"{spec}: dtype {v.dtype} is not a label (integer) type")
            from .results import read_origins

            try:
                org = read_origins(spec)
            except ValueError:
                org = None
            layers.append(Layer(_layer_name(spec, taken), spec, "segmentation", LazyBox(v, box), origins=org))
    except BaseException:
        for v in vols:
            v.close()
        raise
    res = img.resolution_zyx_nm or (1.0, 1.0, 1.0)
    return layers, tuple(float(r) for r in res)


def _ng_data(layer: Layer):
    """Neuroglancer's LocalVolume serves uint8/16/32/64 and float32; other types are converted
    chunk by chunk (int labels to uint64 of the same bits, float64 to float32)."""
    dt = layer.data.dtype
    if dt.kind == "u" or dt == np.float32:
        return layer.data
    target = np.dtype(np.uint64) if dt.kind == "i" else np.dtype(np.float32)

    class _Cast:
        shape, dtype = layer.data.shape, target

        def __getitem__(self, index):
            return layer.data[index].astype(target)

        def transpose(self):
            return layer.data.transpose().astype(target)

    return _Cast()


def is_precomputed(spec: str) -> bool:
    """A directory holding a precomputed layer (its ``info`` file), e.g. written by ``ffn export``."""
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "info"))


@dataclass
class ServedLayer:
    """A precomputed layer directory served over HTTP (CORS, gzip-stored files decoded) to neuroglancer."""

    name: str
    spec: str
    kind: str  # the info's "type": "image" or "segmentation"
    info: dict
    url: str = ""  # precomputed://http://host:port (after serve)
    server: Any = None


def serve_layer(layer: ServedLayer, bind_address: str) -> None:
    """Serves ``layer``'s directory on a free port (a daemon thread) with CloudVolume's viewer
    handler: CORS, byte ranges and ``.gz`` files served decoded (igneous' skeletons)."""
    import socket
    import threading
    from http.server import ThreadingHTTPServer

    try:
        from cloudvolume.server import ViewerServerHandler
    except ImportError:
        raise ViewerError("serving a precomputed layer needs the optional package cloud-volume: install "
                          "floodfilling[export] (pip install 'floodfilling[export]')") from None
    cloudpath = "file://" + os.path.abspath(layer.spec)

    class Handler(ViewerServerHandler):
        def __init__(self, *args):
            super().__init__(cloudpath, *args)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            log.debug("%s: " + format, layer.name, *args)

    server = ThreadingHTTPServer((bind_address, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name=f"serve-{layer.name}").start()
    host = bind_address if bind_address not in ("0.0.0.0", "::", "") else socket.getfqdn()
    layer.server, layer.url = server, f"precomputed://http://{host}:{server.server_address[1]}"


def _served_layers(specs: Sequence[str], taken: set[str]) -> list[ServedLayer]:
    out = []
    for spec in specs:
        try:
            with open(os.path.join(spec, "info")) as f:
                info = json.load(f)
            kind = info["type"]
            info["scales"][0]["resolution"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ViewerError(f"{spec}: not a readable precomputed layer ({type(exc).__name__} in its info)") from None
        if kind not in ("image", "segmentation"):
            raise ViewerError(f"{spec}: layer type {kind!r} is not image or segmentation")
        name, i = os.path.basename(os.path.normpath(spec)), 2
        base = name
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        taken.add(name)
        out.append(ServedLayer(name, spec, kind, info))
    return out


def largest_objects(layer: "Layer | ServedLayer", n: int | None) -> list[int]:
    """The ``n`` largest objects of a segmentation layer (None: all), by voxel count: a served
    layer's segment properties (none without them), a volume's box read slab by slab."""
    if n == 0:
        return []
    if isinstance(layer, ServedLayer):
        prop = layer.info.get("segment_properties")
        try:
            with open(os.path.join(layer.spec, prop, "info")) as f:
                inline = json.load(f)["inline"]
            ids = np.array([int(i) for i in inline["ids"]], np.uint64)
            counts = np.array(next(p["values"] for p in inline["properties"] if p["id"] == "voxels"), np.int64)
        except (TypeError, OSError, ValueError, KeyError, StopIteration):
            log.warning("%s: no segment properties with voxel counts; no objects shown", layer.spec)
            return []
    else:
        from .meshes import VoxelCounter

        counter = VoxelCounter()
        for z in range(0, layer.data.shape[0], 32):
            counter.add(layer.data[z:z + 32])
        ids, counts = counter.ids, counter.counts
    order = np.lexsort((ids, -counts))  # largest first, ties by id
    return [int(i) for i in ids[order][:n]]


def make_viewer(image: str, labels: Sequence[str] = (), *, bbox: boxes.BBox | None = None,
                bind_address: str = "127.0.0.1", port: int = 0, show: int | None = 0):
    """A neuroglancer Viewer serving ``image`` and ``labels``; returns ``(viewer, layers)``.
    The server starts on the first ``viewer.get_viewer_url()``. ``port`` 0: any free port.
    Precomputed layer directories (:func:`is_precomputed`) are served as they are (with their
    meshes and skeletons); volumes' segmentations get meshes on demand. ``show``: the meshes of
    the ``show`` largest objects of each segmentation are shown (None: all; 0: none, the user
    picks them)."""
    ng = _import_neuroglancer()
    if is_precomputed(image):
        bad = [spec for spec in labels if not is_precomputed(spec)]
        if bad:
            raise ViewerError(f"{bad[0]}: with a precomputed layer as the image, labels must be precomputed "
                              "layers too")
        layers: list = []
        taken: set[str] = set()
        served = _served_layers([image, *labels], taken)
        info0 = served[0].info["scales"][0]
        res = tuple(float(r) for r in info0["resolution"][::-1])
        offset = [int(v) for v in info0.get("voxel_offset", [0, 0, 0])[::-1]]
        size = [int(v) for v in info0["size"][::-1]]
    else:
        precomputed = [spec for spec in labels if is_precomputed(spec)]
        layers, res = open_layers(image, [spec for spec in labels if not is_precomputed(spec)], bbox)
        taken = {lay.name for lay in layers}
        served = _served_layers(precomputed, taken)
        offset, size = list(layers[0].data.box.start), list(layers[0].data.shape)
    ng.set_server_bind_address(bind_address, port)
    dims = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=list(res))
    viewer = ng.Viewer()
    for lay in served:
        serve_layer(lay, bind_address)
    with viewer.txn() as s:
        s.dimensions = dims
        for layer in layers:
            src = layer.source = ng.LocalVolume(_ng_data(layer), dimensions=dims, voxel_offset=offset,
                                                volume_type=layer.kind)
            if layer.kind == "image":
                s.layers[layer.name] = ng.ImageLayer(source=src)
            else:
                s.layers[layer.name] = ng.SegmentationLayer(source=src, segments=largest_objects(layer, show))
                if layer.origins is not None and len(layer.origins):
                    s.layers[f"{layer.name}_origins"] = ng.LocalAnnotationLayer(
                        dimensions=dims, annotations=_seed_points(ng, layer.origins, layer.data.box))
        for lay in served:
            if lay.kind == "image":
                s.layers[lay.name] = ng.ImageLayer(source=lay.url)
            else:
                s.layers[lay.name] = ng.SegmentationLayer(source=lay.url, segments=largest_objects(lay, show))
        s.position = [o + n / 2 for o, n in zip(offset, size)]
        # zoom to the volume: its largest extent over ~300 screen pixels in the 2-D panels
        # (neuroglancer's units: the smallest voxel size), a bit more in the 3-D panel
        extent = max(n * r for n, r in zip(size, res)) / min(res)
        s.cross_section_scale = max(extent / 300.0, 1e-3)
        s.projection_scale = 1.6 * extent
        segs = any(lay.kind == "segmentation" for lay in [*layers, *served])
        s.layout = "4panel" if segs else "xy"
    log.info("viewer with layers %s", ", ".join(f"{lay.name} ({lay.spec})" for lay in [*layers, *served]))
    return viewer, [*layers, *served]


def _seed_points(ng, origins: np.ndarray, box: boxes.BBox) -> list:
    """Point annotations at the voxel centres of the seeds inside ``box``."""
    z, y, x = (np.asarray(origins[c], np.int64) for c in ("z", "y", "x"))
    inside = np.all([(v >= a) & (v < b) for v, a, b in zip((z, y, x), box.start, box.stop)], axis=0)
    return [ng.PointAnnotation(id=str(int(i)), point=[float(a) + 0.5, float(b) + 0.5, float(c) + 0.5])
            for i, a, b, c in zip(origins["id"][inside], z[inside], y[inside], x[inside])]


def headless_screenshot(viewer, chromium: str | None, size=(800, 600), timeout: float = 180) -> np.ndarray:
    """The viewer's screenshot (RGB uint8 array) in headless Chromium (``chromium``: its binary;
    Debian's chromium and chromium-driver, driven through neuroglancer's webdriver helper), taken
    once every visible layer reports loaded; RuntimeError when they do not within ``timeout`` s."""
    import threading

    import neuroglancer.webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: the driver on PATH, no downloads
    wd = neuroglancer.webdriver.Webdriver(viewer, headless=True, browser_binary_path=chromium, docker=True,
                                          print_logs=False)
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(viewer.screenshot(size=list(size))), daemon=True)
        t.start()
        t.join(timeout)
        if not out:
            raise RuntimeError(f"no screenshot within {timeout} s (the layers never reported loaded)")
        return out[0].screenshot.image_pixels[..., :3]
    finally:
        wd.driver.quit()
