"""Volume addressing and reading: ``file.h5:dataset`` / ``dir.zarr[/array]`` specs, lazy
read-only handles, attributes, label checks and tables. Boxes (:class:`~floodfilling.boxes.BBox`)
are :mod:`floodfilling.boxes`; writing is :mod:`floodfilling.storage`; the rules an output
obeys (never an input, ...) are :mod:`floodfilling.outputs`.

Arrays are indexed (z, y, x). Every user-facing failure (bad spec, missing file or dataset,
wrong rank or dtype, existing output) raises :class:`~floodfilling.errors.VolumeError`, a
``ValueError`` whose message is one line naming the file and dataset, so a command line can
print it as is.

zarr is an optional dependency (``pip install 'floodfilling[zarr]'``); it is imported only when
a ``.zarr`` volume is opened or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, NamedTuple, Union

import numpy as np

from .boxes import BBox
from .errors import VolumeError

logger = logging.getLogger(__name__)

__all__ = [
    "VolumeSpec",
    "parse_volume_spec",
    "Volume",
    "open_volume",
    "check_labels",
    "read_table",
]

PathLike = Union[str, "os.PathLike[str]"]

_HDF5_RE = re.compile(r"^(?P<path>.+?\.(?:h5|hdf5|hdf))(?::(?P<dataset>.*))?$", re.IGNORECASE)
_ZARR_RE = re.compile(r"^(?P<path>.+?\.zarr)(?:/(?P<dataset>.*?))?/*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# specs


class VolumeSpec(NamedTuple):
    """A parsed volume spec: ``path`` of the file/directory and ``dataset`` inside it
    (``None``: the zarr path itself is the array). Unpacks as ``path, dataset``."""

    path: str
    dataset: str | None

    @property
    def kind(self) -> str:
        """``"hdf5"`` or ``"zarr"``."""
        return "zarr" if self.path.lower().endswith(".zarr") else "hdf5"

    def __str__(self) -> str:
        if self.dataset is None:
            return self.path
        sep = "/" if self.kind == "zarr" else ":"
        return f"{self.path}{sep}{self.dataset}"


def parse_volume_spec(spec: PathLike, default_dataset: str | None = None) -> VolumeSpec:
    """Split a volume spec into ``(path, dataset)``.

    Accepted forms: ``file.h5:dataset`` (also ``.hdf5``, ``.hdf``; the dataset may be a group
    path such as ``volumes/raw``), ``file.h5`` alone only when ``default_dataset`` is given,
    ``dir.zarr`` (the array itself, or ``default_dataset`` inside it when given) and
    ``dir.zarr/array``. Nothing is opened. Raises :class:`VolumeError` otherwise.
    """
    text = os.fspath(spec)
    if not isinstance(text, str):
        raise VolumeError(f"volume spec must be a string path, got {spec!r}")
    text = text.strip()
    if not text:
        raise VolumeError("empty volume spec; expected file.h5:dataset or dir.zarr[/array]")
    m = _HDF5_RE.match(text)
    if m:
        path, dataset = m.group("path"), m.group("dataset")
        if dataset is None:
            if default_dataset is None:
                raise VolumeError(
                    f"volume spec '{text}' names no dataset; use '{path}:DATASET'"
                )
            dataset = default_dataset
        dataset = dataset.strip("/")
        if not dataset:
            raise VolumeError(f"volume spec '{text}' has an empty dataset name")
        return VolumeSpec(path, dataset)
    m = _ZARR_RE.match(text)
    if m:
        path, dataset = m.group("path"), m.group("dataset")
        dataset = dataset.strip("/") if dataset else None
        if not dataset:
            dataset = default_dataset.strip("/") if default_dataset else None
        return VolumeSpec(path, dataset or None)
    raise VolumeError(
        f"unrecognised volume spec '{text}'; expected file.h5:dataset "
        f"(or .hdf5) or dir.zarr[/array]"
    )


# --------------------------------------------------------------------------------------------
# attributes


def decode_attr(value: Any) -> Any:
    """HDF5/zarr attribute -> plain Python (JSON-encoded dicts/lists are decoded back)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in ("{", "["):
            try:
                return json.loads(s)
            except ValueError:
                return value
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O", "U"):
            return [decode_attr(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_SCALAR_TYPES = (bool, int, float, np.bool_, np.integer, np.floating)


def encode_attr(name: str, value: Any) -> Any:
    """Plain Python value -> something h5py stores natively.

    Strings, numbers and numeric arrays are stored as they are; flat lists/tuples of numbers
    become numeric arrays (e.g. ``resolution_zyx_nm``); dicts and any other list are stored as
    JSON strings (decoded again by :attr:`Volume.attrs`).
    """
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, _SCALAR_TYPES):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return value
        raise VolumeError(f"attribute '{name}': unsupported array dtype {value.dtype}")
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, _SCALAR_TYPES) for v in value
    ):
        return np.asarray(value)
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, default=_json_default, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"attribute '{name}' is not JSON serialisable: {exc}") from None
    raise VolumeError(
        f"attribute '{name}' has unsupported type {type(value).__name__}; "
        f"use str, numbers, arrays, lists or dicts"
    )


# --------------------------------------------------------------------------------------------
# reading


def check_volume_array(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 3:
        raise VolumeError(f"{where}: expected a 3-D (z, y, x) volume, got shape {tuple(shape)}")
    if dtype.kind not in "iuf":
        raise VolumeError(
            f"{where}: unsupported dtype {dtype}; expected an integer or floating-point type"
        )


def check_labels(values: Any, source: str, *, minimum: Any = None, where: str = "",
                 error: type = VolumeError) -> None:
    """Label volumes (segmentations, ground truth) hold ids >= 0 of an integer type: refuses
    another dtype, or a negative id, with one line naming ``source`` (``file.h5:dataset``), the
    minimum and ``where`` (e.g. " in z 0:64"), raised as ``error``. ``values``: the volume, a
    slab of it or its ids; ``minimum``: the smallest id when already known (saves a pass)."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        raise error(f"{source}: dtype {a.dtype} is not a label (integer) type")
    if a.dtype.kind == "i" and a.size:
        m = int(a.min()) if minimum is None else int(minimum)
        if m < 0:
            raise error(f"{source}: negative labels (minimum {m}{where}): label ids must be >= 0")


def hdf5_datasets(h5file: Any) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(name)

    h5file.visititems(visit)
    return sorted(names)


def import_zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:
        raise VolumeError(
            "reading or writing .zarr volumes needs the optional zarr package: "
            "install floodfilling[zarr] (pip install 'floodfilling[zarr]')"
        ) from exc
    return zarr


class Volume:
    """A lazy, read-only handle on one 3-D array in an HDF5 file or a zarr store.

    Attributes: ``spec`` (:class:`VolumeSpec`), ``path``, ``dataset``, ``shape``, ``dtype``,
    ``attrs`` (plain-Python dict), ``resolution_zyx_nm``. Data are read on demand with
    :meth:`read` or indexing. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, spec: VolumeSpec, array: Any, closer: Any = None) -> None:
        self.spec = spec
        self._array = array
        self._closer = closer
        self.shape: tuple[int, int, int] = tuple(int(s) for s in array.shape)  # type: ignore
        self.dtype: np.dtype = np.dtype(array.dtype)
        raw_attrs = dict(array.attrs.items()) if hasattr(array.attrs, "items") else {}
        self.attrs: dict[str, Any] = {str(k): decode_attr(v) for k, v in raw_attrs.items()}

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def dataset(self) -> str | None:
        return self.spec.dataset

    @property
    def ndim(self) -> int:
        return 3

    @property
    def closed(self) -> bool:
        return self._array is None

    @property
    def resolution_zyx_nm(self) -> tuple[float, float, float] | None:
        """Voxel size in nm, (z, y, x): attribute ``resolution_zyx_nm``, else the CREMI-style
        ``resolution`` (taken as z, y, x), else ``None``."""
        for key in ("resolution_zyx_nm", "resolution"):
            if key not in self.attrs:
                continue
            value = self.attrs[key]
            try:
                res = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
            except (TypeError, ValueError):
                res = ()
            if len(res) == 3:
                return res  # type: ignore[return-value]
            logger.warning("%s: ignoring attribute %s=%r (expected 3 numbers)", self.spec, key, value)
        return None

    def _live(self) -> Any:
        if self._array is None:
            raise VolumeError(f"{self.spec}: volume is closed")
        return self._array

    def read(self, bbox: BBox | str | None = None) -> np.ndarray:
        """Read the whole volume, or the part in ``bbox`` (a :class:`BBox` or its text form),
        as a NumPy array. The box must lie inside the volume (``ValueError`` otherwise)."""
        array = self._live()
        if bbox is None:
            return np.asarray(array[...])
        try:
            if isinstance(bbox, str):
                bbox = BBox.parse(bbox)
            bbox.validate(self.shape)
        except VolumeError:
            raise
        except ValueError as exc:
            raise VolumeError(f"{self.spec}: {exc}") from None
        return self[bbox.slices]

    def __getitem__(self, index: Any) -> np.ndarray:
        array = self._live()
        try:
            return np.asarray(array[index])
        except (OSError, RuntimeError, ValueError, KeyError) as exc:  # a corrupt chunk, a vanished file
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise VolumeError(f"{self.spec}: cannot read {_index_text(index)}: {first} (damaged or truncated "
                              f"file?)") from None

    def close(self) -> None:
        """Release the file (idempotent)."""
        if self._closer is not None:
            try:
                self._closer()
            finally:
                self._closer = None
        self._array = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"shape={self.shape}, dtype={self.dtype}"
        return f"Volume('{self.spec}', {state})"


def _index_text(index: Any) -> str:
    """``z0:z1,y0:y1,x0:x1`` for a tuple of slices (the part of a volume being read)."""
    if not isinstance(index, tuple):
        index = (index,)
    parts = []
    for sl in index:
        if isinstance(sl, slice):
            parts.append(f"{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}")
        else:
            parts.append("..." if sl is Ellipsis else str(sl))
    return "[" + ",".join(parts) + "]"


def _open_hdf5(spec: VolumeSpec) -> Volume:
    import h5py

    path, name = spec.path, spec.dataset
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such file (volume '{spec}')")
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: not an HDF5 file (it is a directory)")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read file: {exc}") from None
    if not is_h5:
        raise VolumeError(f"{path}: not an HDF5 file")
    try:
        h5file = h5py.File(path, "r")
    except OSError as exc:
        raise VolumeError(f"{path}: cannot open HDF5 file: {exc}") from None
    try:
        obj = h5file.get(name)
        if not isinstance(obj, h5py.Dataset):
            available = ", ".join(hdf5_datasets(h5file)) or "none"
            what = "is a group, not a dataset" if obj is not None else "no dataset"
            if obj is None:
                msg = f"{path}: no dataset '{name}' (available datasets: {available})"
            else:
                msg = f"{path}: '{name}' {what} (available datasets: {available})"
            raise VolumeError(msg)
        check_volume_array(f"{path}:{name}", obj.shape, obj.dtype)
        return Volume(spec, obj, closer=h5file.close)
    except BaseException:
        h5file.close()
        raise


def _open_zarr(spec: VolumeSpec) -> Volume:
    path, name = spec.path, spec.dataset
    zarr = import_zarr()
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such zarr store (volume '{spec}')")
    try:
        root = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises various types across versions
        raise VolumeError(f"{path}: cannot open zarr store: {exc}") from None
    where = f"{path}/{name}" if name else path
    if name:
        try:
            obj = root[name]
        except (KeyError, TypeError, ValueError):
            obj = None
        if obj is None or not hasattr(obj, "dtype"):
            try:
                keys = sorted(root.array_keys()) if hasattr(root, "array_keys") else []
            except Exception:  # pragma: no cover
                keys = []
            available = ", ".join(keys) or "none"
            raise VolumeError(f"{path}: no array '{name}' (available arrays: {available})")
    else:
        obj = root
        if not hasattr(obj, "dtype"):
            keys = sorted(root.array_keys()) if hasattr(root, "array_keys") else []
            available = ", ".join(keys) or "none"
            raise VolumeError(
                f"{path}: is a zarr group; name an array as {path}/ARRAY "
                f"(available arrays: {available})"
            )
    check_volume_array(where, tuple(obj.shape), np.dtype(obj.dtype))
    return Volume(spec, obj)


def open_volume(spec: PathLike | VolumeSpec, default_dataset: str | None = None) -> Volume:
    """Open a volume lazily, read-only (see :func:`parse_volume_spec` for the spec forms).

    Raises :class:`VolumeError` for a missing file, a missing dataset (the message lists the
    available ones), a non-HDF5 file, an array that is not 3-D or whose dtype is neither
    integer nor floating point, and for zarr when the zarr package is not installed.
    """
    parsed = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec, default_dataset)
    if parsed.kind == "zarr":
        return _open_zarr(parsed)
    return _open_hdf5(parsed)


def read_table(path: PathLike, name: str) -> np.ndarray | None:
    """The table ``name`` of the HDF5 file or zarr group at ``path`` (a compound dataset, or a
    group of columns as :func:`zarr_put_table` writes it) as a structured array; ``None`` when
    the file has no such table; :class:`VolumeError` naming it when it cannot be read."""
    path = os.fspath(path)
    if path.lower().endswith(".zarr"):
        zarr = import_zarr()
        try:
            g = zarr.open_group(path, mode="r")
            if name not in g:
                return None
            grp = g[name]
            cols = list(grp.attrs.get("columns") or sorted(grp.array_keys()))
            data = [np.asarray(grp[c][...]) for c in cols]
        except Exception as exc:  # noqa: BLE001 - zarr raises various types
            raise VolumeError(f"{path}/{name}: unreadable table ({exc})") from None
        tab = np.zeros(len(data[0]) if data else 0, np.dtype([(c, d.dtype) for c, d in zip(cols, data)]))
        for c, d in zip(cols, data):
            tab[c] = d
        return tab
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if name not in f:
                return None
            return f[name][...]
    except OSError as exc:
        raise VolumeError(f"{path}:{name}: cannot read ({(str(exc).splitlines() or ['?'])[0]})") from None
