"""The segmentation result format, written and read in this one place.

A result named ``DS`` lives in an HDF5 file (``out.h5:DS``) or a zarr group (``out.zarr/DS``)::

    DS             (z, y, x) uint32 (uint64 when ids need it); 0 = unsegmented
    DS_origins     table ORIGIN_DTYPE, one row per object: id, seed z/y/x, FOV steps, seconds
    DS_overlaps    table OVERLAP_DTYPE: (id, other_id, voxels) an object flooded over (plain
                   segment only; dropped when ids were renumbered)
    DS_forward     (refined results only, ``ffn segment --refine``) the exact flood before
                   refinement, same ids; objects the refinement added have origins with 0 steps
    DS_agglomeration  (``ffn agglomerate`` only) the table of merge candidates

These companions belong to ``DS`` (:func:`floodfilling.outputs.companion_names`): a write of
``DS`` removes, in the same atomic write, those it does not write, so that no table or flood of
an earlier result is left beside a new one (``--overwrite`` of a refined result by a plain one,
say); datasets of other names are kept.

Tables are compound HDF5 datasets, or zarr groups with one 1-D array per column. Attributes of
``DS`` (:class:`ResultAttrs`): ``resolution_zyx_nm``, ``bbox_zyx`` (where the result sits in
the source image), ``source_image``, ``model``, ``config``, ``normalisation`` and ``counters``
(JSON), ``refine`` (JSON, refined results); block runs add ``block_manifest``, consensus and agglomeration their own keys. The
writes go through :func:`floodfilling.storage.write_arrays` (atomic; the file's or group's
other datasets are kept). Digests that tie a result or a resume state to its inputs
(:func:`file_digest`, :func:`image_digest`) are here too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import errors, storage, volumes
from .outputs import companions_not_written

ORIGIN_DTYPE = np.dtype([("id", "<u8"), ("z", "<i8"), ("y", "<i8"), ("x", "<i8"), ("steps", "<i8"), ("seconds", "<f8")])
OVERLAP_DTYPE = np.dtype([("id", "<u8"), ("other_id", "<u8"), ("voxels", "<i8")])
# Attributes a derived result (consensus, agglomeration) carries over from its source segmentation.
PROVENANCE_KEYS = ("resolution_zyx_nm", "bbox_zyx", "source_image")


@dataclass
class Origin:
    """How an object was created: its seed, FOV steps and wall seconds."""

    seed_zyx: tuple[int, int, int]
    steps: int
    seconds: float


@dataclass
class ResultAttrs:
    """The attributes of a segmentation (see the module docstring); ``None`` values are left out."""

    resolution_zyx_nm: tuple[float, float, float] | None  # voxel size of the source image
    bbox_zyx: tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, stop) in the source image
    source_image: str  # the image spec segmented
    model: str  # the model file used
    config: dict[str, Any]  # InferenceConfig.to_dict()
    normalisation: dict[str, Any]  # Normalisation.to_dict()
    counters: dict[str, Any]  # objects, FOV steps, ...
    refine: dict[str, Any] | None = None  # RefineConfig.to_dict() of a refined result (None: the exact flood)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "resolution_zyx_nm": list(self.resolution_zyx_nm) if self.resolution_zyx_nm is not None else None,
            "bbox_zyx": [list(self.bbox_zyx[0]), list(self.bbox_zyx[1])],
            "source_image": self.source_image,
            "model": self.model,
            "config": json.dumps(self.config),
            "normalisation": json.dumps(self.normalisation),
            "counters": json.dumps(self.counters),
            "refine": json.dumps(self.refine) if self.refine is not None else None,
        }
        return {k: v for k, v in out.items() if v is not None}


def result_names(ds: str, refined: bool = False) -> list[str]:
    """The datasets a segmentation result ``ds`` consists of: itself, ``ds_origins``,
    ``ds_overlaps``, and for a refined result ``ds_forward`` (the exact flood it refined)."""
    return [ds, f"{ds}_origins", f"{ds}_overlaps"] + ([f"{ds}_forward"] if refined else [])


def origins_table(origins: Mapping[int, Origin]) -> np.ndarray:
    """``{id: Origin}`` as an ORIGIN_DTYPE table, by id."""
    ids = sorted(origins)
    tab = np.zeros(len(ids), dtype=ORIGIN_DTYPE)
    for r, i in enumerate(ids):
        o = origins[i]
        tab[r] = (i, *o.seed_zyx, o.steps, o.seconds)
    return tab


def overlaps_table(overlaps: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``{id: (other ids, voxels)}`` as an OVERLAP_DTYPE table, by id."""
    rows = [(i, a, c) for i in sorted(overlaps) for a, c in zip(*overlaps[i])]
    return np.array(rows, dtype=OVERLAP_DTYPE)


def overlaps_dict(table: np.ndarray, ids=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """An overlaps table (OVERLAP_DTYPE, or rows (id, other id, voxels)) as ``{id: (other ids,
    voxels)}`` int64, for ``ids`` (default: the ids in the table; an id without rows gets empty arrays)."""
    t = np.asarray(table)
    cols = np.stack([t[n] for n in t.dtype.names], 1) if t.dtype.names else t.reshape(-1, 3)
    cols = cols.astype(np.int64)
    cols = cols[np.argsort(cols[:, 0], kind="stable")]  # grouped by id, rows of an id in table order
    uniq, starts = np.unique(cols[:, 0], return_index=True)
    stops = np.r_[starts[1:], len(cols)].astype(np.int64)
    groups = {int(u): (cols[a:b, 1].copy(), cols[a:b, 2].copy()) for u, a, b in zip(uniq, starts, stops)}
    if ids is None:
        return groups
    return {int(i): groups.get(int(i), (np.zeros(0, np.int64), np.zeros(0, np.int64))) for i in ids}


def write_result(out_path: str | os.PathLike, ds: str, segmentation: np.ndarray, origins: np.ndarray | None,
                 attrs: Mapping[str, Any], overwrite: bool, overlaps: np.ndarray | None = None,
                 extra: Mapping[str, np.ndarray] | None = None) -> None:
    """``ds`` (+ ``ds_origins``, ``ds_overlaps`` when given, + ``extra`` tables) into the HDF5
    file or zarr group ``out_path``, atomically, keeping its other datasets; the companions of
    ``ds`` not written are removed by the same write (see the module docstring). ``attrs``: a
    :class:`ResultAttrs` dict or any attributes (``None`` values left out)."""
    arrays = {ds: segmentation}
    if origins is not None:
        arrays[f"{ds}_origins"] = origins
    if overlaps is not None:
        arrays[f"{ds}_overlaps"] = overlaps
    arrays.update(extra or {})
    clean = {k: v for k, v in attrs.items() if v is not None}
    stale = companions_not_written(ds, arrays)  # an earlier result's, removed with it
    storage.write_arrays(out_path, arrays, attrs={ds: clean}, overwrite=overwrite, drop=stale)


def read_origins(spec: str) -> np.ndarray | None:
    """The origins table ``<ds>_origins`` beside a segmentation ``spec`` as an ORIGIN_DTYPE
    array (extra columns dropped); None when absent; :class:`errors.VolumeError` naming the
    table when it is not an origins table."""
    parsed = volumes.parse_volume_spec(spec)
    name = f"{parsed.dataset}_origins"
    raw = volumes.read_table(parsed.path, name)
    if raw is None:
        return None
    where = f"{parsed.path}/{name}" if parsed.kind == "zarr" else f"{parsed.path}:{name}"
    if raw.dtype.names is None or not set(ORIGIN_DTYPE.names) <= set(raw.dtype.names):
        raise errors.VolumeError(f"{where}: not an origins table (columns {raw.dtype.names})")
    tab = np.zeros(len(raw), ORIGIN_DTYPE)
    for col in ORIGIN_DTYPE.names:
        tab[col] = raw[col]
    return tab


def file_digest(path: str | os.PathLike, digits: int | None = 16) -> str:
    """sha256 of a file's bytes, its first ``digits`` hex digits (16: a model file in manifests;
    None: all 64, as a fine-tuned model records its parent)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits]


def image_digest(raw: np.ndarray) -> str:
    """A digest of an image's voxels (shape, dtype and bytes), recorded in the resume state so that
    a rerun after the image changed is refused, not mixed."""
    h = hashlib.sha256(f"{raw.shape}|{raw.dtype.str}".encode())
    h.update(memoryview(np.ascontiguousarray(raw)).cast("B"))
    return h.hexdigest()[:16]
