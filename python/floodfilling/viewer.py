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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Sequence

import numpy as np

from . import boxes, volumes

log = logging.getLogger(__name__)


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

    return _Cast()


def make_viewer(image: str, labels: Sequence[str] = (), *, bbox: boxes.BBox | None = None,
                bind_address: str = "127.0.0.1", port: int = 0):
    """A neuroglancer Viewer serving ``image`` and ``labels``; returns ``(viewer, layers)``.
    The server starts on the first ``viewer.get_viewer_url()``. ``port`` 0: any free port."""
    ng = _import_neuroglancer()
    layers, res = open_layers(image, labels, bbox)
    ng.set_server_bind_address(bind_address, port)
    dims = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=list(res))
    offset = list(layers[0].data.box.start)
    viewer = ng.Viewer()
    with viewer.txn() as s:
        s.dimensions = dims
        for layer in layers:
            src = layer.source = ng.LocalVolume(_ng_data(layer), dimensions=dims, voxel_offset=offset,
                                                volume_type=layer.kind)
            if layer.kind == "image":
                s.layers[layer.name] = ng.ImageLayer(source=src)
            else:
                s.layers[layer.name] = ng.SegmentationLayer(source=src)
                if layer.origins is not None and len(layer.origins):
                    s.layers[f"{layer.name}_origins"] = ng.LocalAnnotationLayer(
                        dimensions=dims, annotations=_seed_points(ng, layer.origins, layer.data.box))
        s.position = [o + n / 2 for o, n in zip(offset, layers[0].data.shape)]
        s.layout = "xy-3d" if len(layers) > 1 else "xy"
    log.info("viewer with layers %s", ", ".join(f"{lay.name} ({lay.spec})" for lay in layers))
    return viewer, layers


def _seed_points(ng, origins: np.ndarray, box: boxes.BBox) -> list:
    """Point annotations at the voxel centres of the seeds inside ``box``."""
    z, y, x = (np.asarray(origins[c], np.int64) for c in ("z", "y", "x"))
    inside = np.all([(v >= a) & (v < b) for v, a, b in zip((z, y, x), box.start, box.stop)], axis=0)
    return [ng.PointAnnotation(id=str(int(i)), point=[float(a) + 0.5, float(b) + 0.5, float(c) + 0.5])
            for i, a, b, c in zip(origins["id"][inside], z[inside], y[inside], x[inside])]
