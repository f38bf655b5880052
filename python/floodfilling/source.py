"""The image a run segments, its spec parsed once: :class:`ImageSource`.

A run names its image by a spec (``file.h5:dataset``, ``dir.zarr/array``). :func:`image_source`
parses it ONCE, reads the volume's shape, dtype and resolution and fixes the box of it that the
run segments; :meth:`ImageSource.normalised` attaches the run's one normalisation (statistics of
the whole volume, whatever the box). From then on every phase takes the ImageSource, never the
spec's text: the flood, the block workers, the refinement's tile windows, the result's
attributes and manifests. An ImageSource holds no open file (it is broadcast to every rank of
a block run); :meth:`ImageSource.open` opens the volume, :meth:`ImageSource.reader` reads
normalised windows of it.

Coordinates: a *window* is given in box coordinates (``(0, 0, 0)`` is ``box.start``)::

    image (the whole volume)
    +--------------------------------------------+
    |  box.start                                 |
    |     +--------------------------------+     |
    |     | (0,0,0)   +--------+           |     |
    |     |           | window |  start,   |     |  read in image coordinates:
    |     |           +--------+  stop     |     |  box.start + start .. box.start + stop
    |     |                       box.stop |     |
    |     +--------------------------------+     |
    +--------------------------------------------+
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import boxes, results, volumes
from .normalise import Normalisation, resolve_normalisation

if TYPE_CHECKING:  # (types only)
    from .config import InferenceConfig
    from .model import ModelInfo

__all__ = ["ImageSource", "image_source", "WindowReader", "combine_digests", "digest_slabs"]

DIGEST_SLAB_BYTES = 64 << 20  # the image digest reads the box in z slabs of about this many bytes


@dataclass(frozen=True)
class ImageSource:
    """The image of a run: which volume, which box of it, how it is normalised."""

    spec: volumes.VolumeSpec  # the image's file and dataset (parsed once)
    box: boxes.BBox  # the box of the image the run segments (image coordinates)
    shape: tuple[int, int, int]  # the whole volume's shape (z, y, x)
    dtype: str  # the volume's dtype, as numpy names it
    resolution_zyx_nm: tuple[float, float, float] | None  # voxel size recorded in the file, if any
    norm: Normalisation | None = None  # the run's one normalisation (:meth:`normalised`)

    @property
    def name(self) -> str:
        """The spec as the user gave it (messages, ``source_image`` of a result)."""
        return str(self.spec)

    @property
    def identity(self) -> str:
        """The spec with its file's absolute path (manifests and resume states: the same image
        from another working directory is the same image)."""
        return f"{os.path.abspath(self.spec.path)}:{self.spec.dataset}"

    def open(self) -> volumes.Volume:
        """The volume, opened lazily (read-only); close it (or use ``with``)."""
        return volumes.open_volume(self.spec)

    def read(self, vol: volumes.Volume | None = None) -> np.ndarray:
        """The raw voxels of the whole box (from ``vol`` when given, an open :meth:`open`)."""
        if vol is not None:
            return vol.read(self.box)
        with self.open() as v:
            return v.read(self.box)

    def normalised(self, cfg: "InferenceConfig", info: "ModelInfo", vol=None) -> "ImageSource":
        """This source with the normalisation ``cfg`` asks for, for the model ``info``, its
        statistics those of the whole volume (``vol``: the volume or its voxels when the caller
        holds them; opened here otherwise)."""
        if vol is not None:
            return replace(self, norm=resolve_normalisation(cfg, info, vol, self.name))
        with self.open() as v:
            return replace(self, norm=resolve_normalisation(cfg, info, v, self.name))

    def apply(self, raw: np.ndarray, where: str = "") -> np.ndarray:
        """``raw`` (voxels of this image) normalised, as float32; errors name the image and ``where``."""
        if self.norm is None:
            raise RuntimeError("ImageSource.apply before normalised()")  # a programming error
        return self.norm.apply(raw, f"{self.name} {where}".rstrip())

    def window(self, start, stop) -> boxes.BBox:
        """The window ``[start, stop)`` (box coordinates) in image coordinates."""
        o = self.box.start
        return boxes.BBox(tuple(a + int(x) for a, x in zip(o, start)), tuple(a + int(x) for a, x in zip(o, stop)))

    def slab_digests(self, rank: int = 0, size: int = 1) -> dict[int, str]:
        """The digests (:func:`floodfilling.results.image_digest`) of this rank's share of the
        box's z slabs (:func:`digest_slabs`; slab i goes to rank i % size), one slab in memory at
        a time; :func:`combine_digests` of every rank's share is :meth:`digest`."""
        out = {}
        with self.open() as vol:
            for i, (z0, z1) in enumerate(digest_slabs(self.box.shape, np.dtype(self.dtype).itemsize)):
                if i % size == rank:
                    out[i] = results.image_digest(vol.read(self.window((z0, 0, 0), (z1, *self.box.shape[1:]))))
        return out

    def digest(self) -> str:
        """One digest of the box's voxels (what a block run's manifest and a resume state
        record: blocks of an image rewritten in place are never reused), read slab by slab."""
        return combine_digests([self.slab_digests()])

    def reader(self, what: str = "") -> "WindowReader":
        """Reads normalised windows (box coordinates) of this image; close it when done.
        ``what`` the windows are (``"block"``), for errors: ``IMAGE block 0,0,0:8,8,8: ...``."""
        return WindowReader(self, what)


class WindowReader:
    """Normalised windows of an :class:`ImageSource` (box coordinates), the volume open meanwhile."""

    def __init__(self, source: ImageSource, what: str = ""):
        self.source = source
        self.what = what  # what the windows are, for errors
        self.vol = source.open()

    def __call__(self, start, stop) -> np.ndarray:
        box = self.source.window(start, stop)
        return self.source.apply(self.vol.read(box), f"{self.what} {box}".lstrip())

    def close(self) -> None:
        self.vol.close()

    def __enter__(self) -> "WindowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_source(spec: volumes.PathLike | volumes.VolumeSpec, bbox: boxes.BBox | None = None) -> ImageSource:
    """The :class:`ImageSource` of ``spec`` (parsed here, once) and the box ``bbox`` of it
    (default: all of it; :class:`~floodfilling.boxes.ParameterError` naming ``bbox`` when it is
    empty or reaches outside); errors of the spec or file name them in one line."""
    parsed = spec if isinstance(spec, volumes.VolumeSpec) else volumes.parse_volume_spec(spec)
    with volumes.open_volume(parsed) as vol:
        if vol.ndim != 3:
            raise volumes.VolumeError(f"{parsed}: expected a 3-D image (z, y, x), got shape {tuple(vol.shape)}")
        box = boxes.box_in(bbox, vol.shape)
        return ImageSource(parsed, box, tuple(int(v) for v in vol.shape), str(vol.dtype), vol.resolution_zyx_nm)


def digest_slabs(shape_zyx, itemsize: int) -> list[tuple[int, int]]:
    """The z ranges (box coordinates) the image digest reads, each about
    :data:`DIGEST_SLAB_BYTES` (a function of the box and dtype alone: the digest is the same for
    any number of ranks)."""
    plane = max(1, int(shape_zyx[1]) * int(shape_zyx[2]) * int(itemsize))
    step = max(1, DIGEST_SLAB_BYTES // plane)
    return [(z, min(z + step, int(shape_zyx[0]))) for z in range(0, int(shape_zyx[0]), step)]


def combine_digests(parts: list[dict[int, str]]) -> str:
    """One digest of the image box from every rank's :meth:`ImageSource.slab_digests` (in slab order)."""
    merged = {k: v for d in parts for k, v in d.items()}
    h = hashlib.sha256("|".join(merged[i] for i in range(len(merged))).encode())
    return h.hexdigest()[:16]
