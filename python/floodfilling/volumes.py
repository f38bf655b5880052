"""Volume addressing and I/O: ``file.h5:dataset`` / ``dir.zarr[/array]`` specs, lazy read-only
handles, bounding boxes and atomic writes.

Arrays are indexed (z, y, x). Every user-facing failure (bad spec, missing file or dataset,
wrong rank or dtype, existing output) raises :class:`VolumeError`, a ``ValueError`` whose
message is one line naming the file and dataset, so a command line can print it as is.

zarr is an optional dependency (``pip install 'floodfilling[zarr]'``); it is imported only when
a ``.zarr`` volume is opened or written. Writes replace one array of a zarr group atomically
(:func:`write_zarr_atomic`), leaving the group's other arrays (the raw image, say) alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "VolumeError",
    "VolumeSpec",
    "parse_volume_spec",
    "Volume",
    "open_volume",
    "BBox",
    "atomic_path",
    "atomic_write_bytes",
    "write_hdf5_atomic",
    "write_volume",
]

PathLike = Union[str, "os.PathLike[str]"]

_HDF5_RE = re.compile(r"^(?P<path>.+?\.(?:h5|hdf5|hdf))(?::(?P<dataset>.*))?$", re.IGNORECASE)
_ZARR_RE = re.compile(r"^(?P<path>.+?\.zarr)(?:/(?P<dataset>.*?))?/*$", re.IGNORECASE)


class VolumeError(ValueError):
    """A volume cannot be addressed, opened, read or written as asked (one-line message)."""


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
# bounding boxes


def _int3(value: Any, what: str) -> tuple[int, int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}")
    out = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}")
        out.append(int(v))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class BBox:
    """A half-open box ``[start, stop)`` of voxels, coordinates (z, y, x).

    ``start`` is the first voxel inside, ``stop`` the first voxel past the end on each axis, as
    in Python slices; ``shape = stop - start``::

        index:    0   1   2   3   4   5
                +---+---+---+---+---+---+
                |   | # | # | # |   |   |    start=1, stop=4: voxels 1, 2, 3
                +---+---+---+---+---+---+    shape = 4 - 1 = 3
                    ^           ^
                  start        stop (not included)

    Text form (``parse``/``str``): ``"z0,y0,x0:z1,y1,x1"``, e.g. ``"0,0,0:64,128,128"``.
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _int3(self.start, "BBox start"))
        object.__setattr__(self, "stop", _int3(self.stop, "BBox stop"))

    @classmethod
    def parse(cls, text: str) -> "BBox":
        """Parse ``"z0,y0,x0:z1,y1,x1"`` (whitespace allowed)."""
        parts = str(text).split(":")
        if len(parts) != 2:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'")
        try:
            start = [int(v) for v in parts[0].split(",")]
            stop = [int(v) for v in parts[1].split(",")]
        except ValueError:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'") from None
        if len(start) != 3 or len(stop) != 3:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'")
        return cls(tuple(start), tuple(stop))

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> "BBox":
        """The box covering a whole volume of ``shape``."""
        return cls((0, 0, 0), _int3(shape, "shape"))

    def __str__(self) -> str:
        return "{},{},{}:{},{},{}".format(*self.start, *self.stop)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``stop - start`` per axis (may be <= 0 for an invalid box)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        """Number of voxels (0 when empty)."""
        z, y, x = self.shape
        return max(z, 0) * max(y, 0) * max(x, 0)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """``(slice(z0, z1), slice(y0, y1), slice(x0, x1))`` for indexing a (z, y, x) array."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def validate(self, shape: Sequence[int]) -> "BBox":
        """Return ``self`` if it is non-empty and inside a volume of ``shape``, else raise
        ``ValueError`` naming the box and the volume shape."""
        vshape = _int3(shape, "volume shape")
        if self.empty:
            raise ValueError(f"bbox {self} is empty (shape {self.shape}); volume shape {vshape}")
        if any(a < 0 for a in self.start) or any(b > s for b, s in zip(self.stop, vshape)):
            raise ValueError(f"bbox {self} is outside the volume of shape {vshape}")
        return self

    def clip(self, shape: Sequence[int]) -> "BBox":
        """The part of the box inside a volume of ``shape``; ``ValueError`` (naming the box and
        the volume shape) if nothing is left."""
        vshape = _int3(shape, "volume shape")
        start = tuple(max(a, 0) for a in self.start)
        stop = tuple(min(b, s) for b, s in zip(self.stop, vshape))
        out = BBox(start, stop)  # type: ignore[arg-type]
        if out.empty:
            raise ValueError(
                f"bbox {self} does not overlap the volume of shape {vshape} (or is empty)"
            )
        return out


class ParameterError(VolumeError):
    """A bad value of the library parameter ``param`` (its message names the parameter); the
    command line prefixes it with the flag that gave the value (``--bbox X: ...``)."""

    def __init__(self, param: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.param, self.value = param, value


def box_in(bbox: BBox | None, shape: Sequence[int], param: str = "bbox") -> BBox:
    """``bbox`` checked against a volume of ``shape`` (the whole volume when None);
    :class:`ParameterError` naming ``param`` when it is empty or reaches outside."""
    if bbox is None:
        return BBox.from_shape(shape)
    if not isinstance(bbox, BBox):
        raise ParameterError(param, bbox, f"{param} {bbox!r}: expected a BBox (parse text with BBox.parse)")
    try:
        return bbox.validate(shape)
    except ValueError as exc:
        raise ParameterError(param, str(bbox), str(exc)) from None


# --------------------------------------------------------------------------------------------
# attributes


def _decode_attr(value: Any) -> Any:
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
            return [_decode_attr(v) for v in value.tolist()]
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


def _encode_attr(name: str, value: Any) -> Any:
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


def _check_volume_array(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
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


def _hdf5_datasets(h5file: Any) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(name)

    h5file.visititems(visit)
    return sorted(names)


def _import_zarr() -> Any:
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
        self.attrs: dict[str, Any] = {str(k): _decode_attr(v) for k, v in raw_attrs.items()}

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
            available = ", ".join(_hdf5_datasets(h5file)) or "none"
            what = "is a group, not a dataset" if obj is not None else "no dataset"
            if obj is None:
                msg = f"{path}: no dataset '{name}' (available datasets: {available})"
            else:
                msg = f"{path}: '{name}' {what} (available datasets: {available})"
            raise VolumeError(msg)
        _check_volume_array(f"{path}:{name}", obj.shape, obj.dtype)
        return Volume(spec, obj, closer=h5file.close)
    except BaseException:
        h5file.close()
        raise


def _open_zarr(spec: VolumeSpec) -> Volume:
    path, name = spec.path, spec.dataset
    zarr = _import_zarr()
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
    _check_volume_array(where, tuple(obj.shape), np.dtype(obj.dtype))
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


# --------------------------------------------------------------------------------------------
# atomic writes, disk errors, free space


def _fsync_dir(directory: str) -> None:
    """Persist a rename (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


fsync_dir = _fsync_dir  # the public name (callers outside this module)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    if not os.path.lexists(path):
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover
        logger.warning("could not remove temporary file %s: %s", path, exc)


def os_error_text(exc: OSError, target: PathLike, doing: str = "writing") -> str:
    """One line for an operating-system error while ``doing`` ``target``: the cause in words
    (no space, read-only, permission, not a directory) and the path."""
    import errno

    target = os.fspath(target)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while {doing} {target}"
    if code == errno.EROFS:
        return f"cannot write {target}: read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {target}: permission denied ({exc.filename or target})"
    if code in (errno.ENOTDIR, errno.EEXIST) and exc.filename:
        culprit = up = os.fspath(exc.filename)
        while up and not (os.path.lexists(up) and not os.path.isdir(up)) and os.path.dirname(up) != up:
            up = os.path.dirname(up)
        if up and os.path.lexists(up) and not os.path.isdir(up):  # the regular file on the way
            culprit = up
        return f"cannot write {target}: {culprit} exists and is not a directory"
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"error while {doing} {target}: {first}"


@contextlib.contextmanager
def disk_errors(target: PathLike, doing: str = "writing") -> Iterator[None]:
    """Turns an ``OSError`` raised inside into a :class:`VolumeError` of one line naming
    ``target`` (:func:`os_error_text`); other exceptions pass unchanged."""
    try:
        yield
    except VolumeError:
        raise
    except OSError as exc:
        raise VolumeError(os_error_text(exc, target, doing)) from None


# Free space kept in hand beyond what a write needs: HDF5 writes its metadata on close, and
# HDF5 (h5py 3) crashes the process (SIGSEGV) when a write fails for lack of space, so every
# HDF5 write of this package first checks that its bytes fit (see :class:`SpaceCheck`).
SPACE_MARGIN_BYTES = 1 << 20


class SpaceCheck:
    """Checks before each write into ``directory`` that ``nbytes`` (an upper bound of what the
    write adds) plus :data:`SPACE_MARGIN_BYTES` are free; :class:`VolumeError` ("no space left
    on device while writing TARGET") otherwise, before anything is written. A write that fills
    the disk anyway (another process writing at the same time, quotas) still fails, but HDF5
    is never asked to write into a full disk when this package alone fills it."""

    def __init__(self, target: PathLike, directory: PathLike | None = None) -> None:
        self.target = os.fspath(target)
        self.directory = os.fspath(directory) if directory is not None else \
            os.path.dirname(os.path.abspath(self.target))

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return int(st.f_bavail) * int(st.f_frsize)

    def need(self, nbytes: int) -> None:
        free = self.free_bytes()
        if free < int(nbytes) + SPACE_MARGIN_BYTES:
            raise VolumeError(f"no space left on device while writing {self.target} "
                              f"({free / 2**20:.1f} MiB free, {(int(nbytes) + SPACE_MARGIN_BYTES) / 2**20:.1f} "
                              f"MiB needed)")


def remove_temporaries(path: PathLike) -> int:
    """Removes ``PATH.tmp-*`` left beside ``path`` by a killed writer (call while holding the
    output's lock, :mod:`floodfilling.locks`); returns how many were removed."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    n = 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(base + ".tmp-"):
                p = os.path.join(directory, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else _remove_quietly(p)
                n += 1
    if n:
        logger.info("removed %d temporary file(s) of an interrupted write of %s", n, target)
    return n


@contextlib.contextmanager
def atomic_path(path: PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary file path next to ``path``; on success, fsync it and ``os.replace``
    it onto ``path``; on any exception, remove it and re-raise (``path`` is left untouched).

    The temporary name is ``path + ".tmp-<pid>"`` (same directory, so the rename is atomic).
    With ``overwrite=False`` an existing ``path`` raises :class:`VolumeError` before anything
    is written. Files only (not directories). Operating-system errors (no space, read-only
    file system, permissions) become one-line :class:`VolumeError` naming ``path``.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise VolumeError(f"cannot write {target}: {directory} exists and is not a directory")
        raise VolumeError(f"{target}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise VolumeError(f"{target}: is a directory")
    if not overwrite and os.path.exists(target):
        raise VolumeError(f"{target} exists; pass --overwrite")
    tmp = f"{target}.tmp-{os.getpid()}"
    _remove_quietly(tmp)  # stale leftover of a crashed process with the same pid
    try:
        with disk_errors(target):
            yield tmp
            if not os.path.isfile(tmp):
                raise VolumeError(f"{target}: nothing was written to the temporary file {tmp}")
            _fsync_file(tmp)
            os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def names_clash(a: str, b: str) -> bool:
    """True when writing dataset ``a`` would replace dataset ``b`` of the same file or group
    (equal, or one inside the other: replacing group ``v`` removes ``v/raw``)."""
    a, b = a.strip("/"), b.strip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def hdf5_storage_bytes(obj: Any) -> int:
    """Bytes an HDF5 dataset, or every dataset under a group, occupies in its file."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        return int(obj.id.get_storage_size())
    total = [0]

    def visit(_name: str, o: Any) -> None:
        if isinstance(o, h5py.Dataset):
            total[0] += int(o.id.get_storage_size())

    obj.visititems(visit)
    return total[0]


def hdf5_copy_others(src_path: PathLike, dst: Any, replaced: Sequence[str], space: SpaceCheck) -> list[str]:
    """Copies everything of the HDF5 file ``src_path`` into the open file ``dst`` except the
    datasets named in ``replaced`` (and, for a group on the way to one of them, only its other
    members): datasets with their chunks, filters and attributes, groups, soft and external
    links, and the root attributes. Returns the names of the objects copied. This is how an
    output written into an existing file keeps the file's other datasets (the raw image and
    labels beside a segmentation)."""
    import h5py

    replaced = [r.strip("/") for r in replaced]
    copied: list[str] = []
    with h5py.File(src_path, "r") as src:
        def walk(sg: Any, dg: Any, prefix: str) -> None:
            for k, v in sg.attrs.items():
                dg.attrs[k] = v
            for name in sg:
                full = f"{prefix}{name}"
                if full in replaced:
                    continue
                link = sg.get(name, getlink=True)
                if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                    dg[name] = link
                    copied.append(full)
                    continue
                obj = sg[name]
                if isinstance(obj, h5py.Group) and any(r.startswith(full + "/") for r in replaced):
                    walk(obj, dg.require_group(name), full + "/")
                    continue
                space.need(hdf5_storage_bytes(obj))
                sg.copy(obj, dg, name=name)
                copied.append(full)

        walk(src, dst, "")
    return copied


def _slab_planes(shape: tuple[int, ...], itemsize: int, chunks: tuple[int, ...] | None) -> int:
    """Planes (first axis) per write: whole chunks, about 64 MiB."""
    plane = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    step = max(1, (64 << 20) // max(plane, 1))
    if chunks:
        step = max(chunks[0], step // chunks[0] * chunks[0])
    return step


def hdf5_write_array(group: Any, name: str, arr: np.ndarray, space: SpaceCheck,
                     compression: str | None = "gzip", chunks: Any = None) -> Any:
    """Creates dataset ``name`` in ``group`` and fills it from ``arr`` slab by slab along the
    first axis, checking before each slab that its uncompressed bytes fit on the disk."""
    kwargs: dict[str, Any] = {}
    if compression and arr.ndim > 0 and arr.size > 0:
        kwargs["compression"] = compression
        kwargs["chunks"] = chunks if chunks is not None else True
    elif chunks is not None:
        kwargs["chunks"] = chunks
    dset = group.create_dataset(name, shape=arr.shape, dtype=arr.dtype, **kwargs)
    if arr.size == 0:
        return dset
    if arr.ndim == 0:
        space.need(arr.nbytes)
        dset[()] = arr
        return dset
    step = _slab_planes(arr.shape, arr.dtype.itemsize, dset.chunks)
    for z0 in range(0, arr.shape[0], step):
        part = arr[z0:z0 + step]
        space.need(part.nbytes)
        dset[z0:z0 + step] = part
    return dset


def _existing_hdf5(target: str) -> bool:
    """True when ``target`` is an existing HDF5 file; :class:`VolumeError` when something else
    is there (never written into or replaced)."""
    import h5py

    if not os.path.lexists(target):
        return False
    if os.path.isdir(target):
        raise VolumeError(f"output {target}: is a directory")
    try:
        ok = h5py.is_hdf5(target)
    except OSError as exc:
        raise VolumeError(os_error_text(exc, target, "reading")) from None
    if not ok:
        raise VolumeError(f"output {target}: exists and is not an HDF5 file; nothing is written into it "
                          "(move it away or choose another name)")
    return True


def _existing_hdf5_names(target: str, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that exist in the HDF5 file ``target`` (which must exist)."""
    import h5py

    try:
        with h5py.File(target, "r") as f:
            for n in names:
                obj = f.get(n.strip("/"))
                if isinstance(obj, h5py.Group):
                    inside = _hdf5_datasets(obj)
                    raise VolumeError(f"output {target}:{n.strip('/')} is a group (holding "
                                      f"{', '.join(n.strip('/') + '/' + d for d in inside[:3]) or 'nothing'}"
                                      f"{', ...' if len(inside) > 3 else ''}); an output never replaces a group: "
                                      "choose another dataset name")
                parts = n.strip("/").split("/")
                for i in range(1, len(parts)):
                    if isinstance(f.get("/".join(parts[:i])), h5py.Dataset):
                        raise VolumeError(f"output {target}:{n.strip('/')}: {'/'.join(parts[:i])} is a dataset, "
                                          "not a group")
            return [n for n in names if n.strip("/") in f]
    except OSError as exc:
        raise VolumeError(f"output {target}: cannot open the existing HDF5 file ({exc}); nothing is written "
                          "into it") from None


def write_hdf5_atomic(
    path: PathLike,
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    file_attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    compression: str | None = "gzip",
) -> str:
    """Write datasets into an HDF5 file atomically and return its path.

    ``datasets`` maps dataset names (``"a/b"`` creates group ``a``) to arrays; ``attrs`` maps
    dataset names to their attribute dicts; ``file_attrs`` go on the root group. Attribute
    values: strings, numbers, numeric arrays and flat numeric lists are stored natively; dicts
    and other lists as JSON strings (:attr:`Volume.attrs` decodes them).

    A new file holds just these datasets. Into an existing HDF5 file they are added: every
    other dataset, group, link and root attribute of the file is kept (copied into the new
    file, :func:`hdf5_copy_others`), and a dataset of the same name is replaced only with
    ``overwrite`` (:class:`VolumeError` "... exists; pass --overwrite" otherwise, before
    anything is written). Something at ``path`` that is not an HDF5 file is never replaced.
    Everything goes into ``path + ".tmp-<pid>"``, is flushed and fsynced, then renamed onto
    ``path``: a failure leaves no partial file and the previous ``path`` intact. Each write
    first checks that it fits on the disk (:class:`SpaceCheck`).
    """
    import h5py

    target = os.fspath(path)
    if not datasets:
        raise VolumeError(f"{target}: no datasets to write")
    attrs = dict(attrs or {})
    unknown = sorted(set(attrs) - set(datasets))
    if unknown:
        raise VolumeError(f"{target}: attrs given for unknown datasets: {', '.join(unknown)}")
    # Encode (and validate) every attribute before touching the disk.
    enc_attrs = {
        name: {str(k): _encode_attr(f"{name}:{k}", v) for k, v in (attrs.get(name) or {}).items()}
        for name in datasets
    }
    enc_file_attrs = {str(k): _encode_attr(str(k), v) for k, v in (file_attrs or {}).items()}
    arrays = {}
    for name, arr in datasets.items():
        arr = np.asarray(arr)
        compound = arr.dtype.names is not None and all(
            arr.dtype.fields[n][0].kind in "biuf" for n in arr.dtype.names)  # tables (origins, ...)
        if arr.dtype.kind not in "biuf" and not compound:
            raise VolumeError(f"{target}:{name}: unsupported dtype {arr.dtype}")
        arrays[str(name).strip("/")] = arr
    keep = _existing_hdf5(target)
    if keep and not overwrite:
        there = _existing_hdf5_names(target, list(arrays))
        if there:
            raise VolumeError(f"{target}:{there[0]} exists; pass --overwrite to replace it (the file's other "
                              "datasets are kept)")
    with atomic_path(target, overwrite=True) as tmp:
        space = SpaceCheck(target)
        with h5py.File(tmp, "w") as f:
            if keep:
                hdf5_copy_others(target, f, list(arrays), space)
            for k, v in enc_file_attrs.items():
                f.attrs[k] = v
            for name, arr in arrays.items():
                dset = hdf5_write_array(f, name, arr, space, compression)
                for k, v in enc_attrs[name].items():
                    dset.attrs[k] = v
            f.flush()
    logger.debug("wrote %s (%s)", target, ", ".join(arrays))
    return target


def _zarr_chunks(shape: tuple[int, ...], chunks: Sequence[int] | None) -> tuple[int, ...]:
    if not shape:
        return ()
    if chunks is None:
        chunks = (64,) * len(shape) if len(shape) == 3 else (max(1, min(65536, shape[0])),) + tuple(shape[1:])
    return tuple(max(1, min(int(c), int(n))) if n else 1 for c, n in zip(chunks, shape))


def _zarr_create(group: Any, name: str, shape, dtype, chunks) -> Any:
    """An empty (zero-filled) array in a zarr group; zarr 3 (create_array) or 2 (create_dataset)."""
    make = getattr(group, "create_array", None) or group.create_dataset
    return make(name, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), fill_value=0)


def write_zarr_atomic(
    store: PathLike,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
) -> str:
    """Write arrays into the zarr group ``store`` (created when missing), each atomically.

    Each array is written complete under a hidden temporary name in the group
    (``.NAME.tmp-<pid>``), then renamed onto ``NAME``; an existing ``NAME`` is moved aside
    first and removed after the rename (only with ``overwrite``; otherwise
    :class:`VolumeError` before anything is written). Other arrays of the group (the raw
    image beside its segmentation, say) are left alone. Structured arrays (tables such as
    origins) become a subgroup with one 1-D array per field. 3-D volumes are chunked
    ``chunks`` (default 64^3, clipped to the shape); attributes as for HDF5 (JSON for dicts).
    """
    root_path = os.fspath(store)
    attrs = dict(attrs or {})
    targets = {str(name).strip("/"): np.asarray(arr) for name, arr in arrays.items()}
    if not targets:
        raise VolumeError(f"{root_path}: no arrays to write")
    for name, arr in targets.items():
        if arr.dtype.names is None and arr.dtype.kind not in "biuf":
            raise VolumeError(f"{root_path}/{name}: unsupported dtype {arr.dtype}")
        if os.path.exists(os.path.join(root_path, name)) and not overwrite:
            raise VolumeError(f"{root_path}/{name} exists; pass --overwrite")
    enc = {name: zarr_attrs(name, attrs.get(name)) for name in targets}
    group = open_zarr_group(root_path)
    tag = str(os.getpid())
    for name, arr in targets.items():
        tmp_name = zarr_tmp_name(name, tag)
        tmp_path = os.path.join(root_path, tmp_name)
        shutil.rmtree(tmp_path, ignore_errors=True)  # a crashed run's leftover
        try:
            with disk_errors(os.path.join(root_path, name)):
                _zarr_write_one(group, root_path, tmp_name, name, tag, arr, enc[name], chunks)
        except BaseException:
            shutil.rmtree(tmp_path, ignore_errors=True)
            raise
    _fsync_dir(root_path)
    logger.debug("wrote %s (%s)", root_path, ", ".join(targets))
    return root_path


def _zarr_write_one(group: Any, root_path: str, tmp_name: str, name: str, tag: str, arr: np.ndarray,
                    attrs: Mapping[str, Any], chunks: Sequence[int] | None) -> None:
    """One array (or table) of :func:`write_zarr_atomic`: built under ``tmp_name``, then committed."""
    if arr.dtype.names is not None:  # a table: one array per field
        target_obj = zarr_put_table(group, tmp_name, arr)
    else:
        target_obj = _zarr_create(group, tmp_name, arr.shape, arr.dtype, _zarr_chunks(arr.shape, chunks))
        if arr.size:
            target_obj[...] = arr
    for k, v in attrs.items():
        target_obj.attrs[k] = v
    zarr_commit(group, root_path, tmp_name, name, tag)


def write_arrays(path: PathLike, arrays: Mapping[str, np.ndarray],
                 attrs: Mapping[str, Mapping[str, Any]] | None = None, overwrite: bool = False) -> str:
    """Named arrays (volumes or tables) with their attributes into the HDF5 file or the zarr
    group at ``path`` (by its suffix), atomically, keeping everything else there
    (:func:`write_hdf5_atomic`, :func:`write_zarr_atomic`). The one way this package writes
    results."""
    if os.fspath(path).lower().endswith(".zarr"):
        return write_zarr_atomic(path, arrays, attrs=attrs, overwrite=overwrite)
    return write_hdf5_atomic(path, arrays, attrs=attrs, overwrite=overwrite)


def zarr_tmp_name(name: str, tag: str) -> str:
    """The hidden name an array of a zarr group is built under before :func:`zarr_commit`."""
    return f".{name.strip('/').replace('/', '_')}.tmp-{tag}"


def zarr_attrs(name: str, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes as zarr stores them (JSON types; dicts and arrays as for HDF5)."""
    return {str(k): _decode_attr(_encode_attr(f"{name}:{k}", v)) for k, v in (attrs or {}).items()}


def open_zarr_group(store: PathLike) -> Any:
    """The zarr group at ``store``, created when missing (:class:`VolumeError` otherwise)."""
    zarr = _import_zarr()
    root_path = os.fspath(store)
    if os.path.exists(root_path) and not os.path.isdir(root_path):
        raise VolumeError(f"{root_path}: exists and is not a zarr store (directory)")
    try:
        return zarr.open_group(root_path, mode="a")
    except Exception as exc:  # zarr raises various types across versions
        raise VolumeError(f"{root_path}: cannot open or create a zarr group: {exc}") from None


def zarr_create_volume(group: Any, name: str, shape, dtype, chunks: Sequence[int] | None = None) -> Any:
    """An empty (zero-filled, nothing stored) 3-D array ``name`` in a zarr group."""
    return _zarr_create(group, name, tuple(shape), np.dtype(dtype), _zarr_chunks(tuple(shape), chunks))


def zarr_put_table(group: Any, name: str, table: np.ndarray) -> Any:
    """A structured array as a subgroup ``name`` with one 1-D array per field."""
    sub = group.create_group(name)
    for field in table.dtype.names:
        col = np.ascontiguousarray(table[field])
        z = _zarr_create(sub, field, col.shape, col.dtype, _zarr_chunks(col.shape, None))
        if col.size:
            z[...] = col
    sub.attrs["columns"] = list(table.dtype.names)
    return sub


def read_table(path: PathLike, name: str) -> np.ndarray | None:
    """The table ``name`` of the HDF5 file or zarr group at ``path`` (a compound dataset, or a
    group of columns as :func:`zarr_put_table` writes it) as a structured array; ``None`` when
    the file has no such table; :class:`VolumeError` naming it when it cannot be read."""
    path = os.fspath(path)
    if path.lower().endswith(".zarr"):
        zarr = _import_zarr()
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


def zarr_commit(group: Any, root_path: str, tmp_name: str, name: str, tag: str) -> None:
    """Renames the finished ``tmp_name`` of the group onto ``name`` (an existing ``name`` is
    moved aside first and removed after the rename)."""
    final = os.path.join(root_path, name)
    old = None
    if os.path.exists(final):
        old = os.path.join(root_path, f".{name.replace('/', '_')}.old-{tag}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    parent = name.rpartition("/")[0]
    if parent:  # intermediate groups, with their metadata
        group.require_group(parent)
    os.replace(os.path.join(root_path, tmp_name), final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or directory: by identity (symlinks
    resolved, same device and inode) when both exist, else by resolved absolute path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _writable_dir_check(what: str, directory: str) -> None:
    """``directory`` (created later when missing) can receive files: its nearest existing
    ancestor is a directory and is writable; :class:`VolumeError` naming ``what`` otherwise."""
    d = os.path.abspath(directory)
    while not os.path.lexists(d):
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        raise VolumeError(f"cannot write {what}: {d} exists and is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        import errno

        ro = False
        try:
            ro = bool(os.statvfs(d).f_flag & os.ST_RDONLY)
        except OSError:  # pragma: no cover
            pass
        why = "read-only file system" if ro else "permission denied"
        raise VolumeError(os_error_text(OSError(errno.EROFS if ro else errno.EACCES, why, d), what))


def check_output(spec: PathLike | VolumeSpec, overwrite: bool = False, *, names: Sequence[str] | None = None,
                 inputs: Sequence[PathLike | VolumeSpec | None] = ()) -> VolumeSpec:
    """Checks an output spec before any work; returns it parsed, :class:`VolumeError` otherwise.

    - A zarr output names its array (and zarr is installed).
    - No input is ever replaced: none of the datasets to be written (``names``: default the
      output dataset alone; ``ffn segment`` adds its ``_origins`` and ``_overlaps``) may be
      (or contain, or lie inside) one of ``inputs``, the volumes the same command reads, in
      the same file or zarr group. Files are compared by identity (symlinks resolved, same
      inode), not by their names. ``overwrite`` does not lift this.
    - HDF5: something at the path that is not an HDF5 file is refused; an existing dataset of
      ``names`` needs ``overwrite`` (the file's other datasets are always kept, see
      :func:`write_hdf5_atomic`). Zarr: an existing array of ``names`` needs ``overwrite``.
    - The directory that receives the output can be written (not a regular file on the way,
      not a read-only file system).
    """
    out = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec)
    if out.kind == "zarr":
        if not out.dataset:
            raise VolumeError(f"output {out.path}: name the array to write, as {out.path}/ARRAY")
        _import_zarr()
    names = [n.strip("/") for n in (names if names is not None else [str(out.dataset)])]
    sep = "/" if out.kind == "zarr" else ":"
    for inp in inputs:
        if inp is None:
            continue
        ip = inp if isinstance(inp, VolumeSpec) else parse_volume_spec(inp)
        if ip.kind != out.kind or not same_path(ip.path, out.path):
            continue
        for n in names:
            if ip.dataset is None or names_clash(n, ip.dataset):
                raise VolumeError(f"output {out.path}{sep}{n} would replace the input {ip}; write the output to "
                                  f"another dataset or file")
    there = existing_outputs(out, names)
    if there and not overwrite:
        if out.kind == "zarr":
            raise VolumeError(f"output {os.path.join(out.path, there[0])} exists; pass --overwrite to replace it")
        raise VolumeError(f"output {out.path}{sep}{there[0]} exists; pass --overwrite to replace it (the "
                          "file's other datasets are kept)")
    in_store = out.kind == "zarr" and os.path.isdir(out.path)
    _writable_dir_check(str(out), out.path if in_store else os.path.dirname(os.path.abspath(out.path)))
    return out


def existing_outputs(out: VolumeSpec, names: Sequence[str]) -> list[str]:
    """Those of the datasets ``names`` that exist in the output file or zarr group ``out``;
    :class:`VolumeError` when something that is not an HDF5 file (or not a zarr store) is at
    its path (never written into or replaced)."""
    if out.kind == "zarr":
        if os.path.lexists(out.path) and not os.path.isdir(out.path):
            raise VolumeError(f"output {out.path}: exists and is not a zarr store (directory)")
        return [n for n in names if os.path.exists(os.path.join(out.path, n))]
    if not _existing_hdf5(out.path):
        return []
    return _existing_hdf5_names(out.path, names)


def write_volume(
    spec: PathLike | VolumeSpec,
    array: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    compression: str | None = "gzip",
) -> VolumeSpec:
    """Write one 3-D array as ``file.h5:dataset`` atomically (into an existing HDF5 file its
    other datasets are kept; an existing dataset of that name is replaced only with
    ``overwrite=True``, :func:`write_hdf5_atomic`). Returns the parsed spec. ``dir.zarr/array``
    writes that array of the zarr group (:func:`write_zarr_atomic`; other arrays stay)."""
    parsed = spec if isinstance(spec, VolumeSpec) else parse_volume_spec(spec)
    arr = np.asarray(array)
    _check_volume_array(str(parsed), arr.shape, arr.dtype)
    if parsed.kind == "zarr":
        if not parsed.dataset:
            raise VolumeError(f"{parsed}: name the array to write, as {parsed.path}/ARRAY")
        write_zarr_atomic(parsed.path, {parsed.dataset: arr}, attrs={parsed.dataset: dict(attrs or {})},
                          overwrite=overwrite)
        return parsed
    assert parsed.dataset is not None
    write_hdf5_atomic(
        parsed.path,
        {parsed.dataset: arr},
        attrs={parsed.dataset: dict(attrs or {})},
        overwrite=overwrite,
        compression=compression,
    )
    return parsed
