"""Runtime wrappers of the native kernels (``floodfilling._kernels``).

Each public function (``update_fovs``, ``gather_fovs``, ``commit_object``, ``find_peaks``,
``count_pairs``, ``union_find``, ``relabel``) checks and normalises its arguments, then runs
the C++ kernel (OpenMP on CPU).  Every kernel has a plain NumPy/SciPy twin with the same
semantics, ``<kernel>_reference`` in :mod:`floodfilling.kernels_reference` (obviously
correct, slow), used by the tests, the benchmarks (``bench/kernels.py``) and as
documentation.

Launchers: every call runs the OpenMP launcher (``floodfilling._kernels``) unless
:func:`launcher` routes the process's calls through another one while a run lasts:
``"sycl"``, :mod:`floodfilling.sycl_backend` (the same kernel bodies on a SYCL device; option
``kernels`` of the inference config).  :func:`empty` gives arrays the current launcher uses
in place (USM shared memory under SYCL).  Every launcher returns the same bits.

Native and reference agree exactly (float32 bitwise, NaN positions included).  Arrays are
indexed (z, y, x).  Invalid arguments raise ``ValueError`` naming the argument.

FOV geometry (``update_fovs``): a FOV of odd size ``f`` centred at ``c`` covers the box
``c - f//2 .. c + f//2`` of its canvas.  The six movement faces, in this order, are
``z-dz, z+dz, y-dy, y+dy, x-dx, x+dx``: the face for axis ``a`` and offset ``o`` is the plane
at FOV index ``f//2 + o`` along ``a``, restricted to ``f//2 - d .. f//2 + d`` along the two
other axes (a 17 x 17 plane for deltas 8).  Its score is the plane's first maximum in C
order (``np.argmax`` semantics: a NaN, if any, wins) and its offset is that position
relative to the FOV centre, ``(dz, dy, dx)``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import operator
import warnings
from typing import Tuple

import numpy as np

try:
    from . import _kernels
except ImportError as _err:  # pragma: no cover - exercised only without a build
    _kernels = None
    _IMPORT_ERROR = _err
else:
    _IMPORT_ERROR = None

__all__ = [
    "HAVE_NATIVE",
    "LAUNCHERS",
    "LauncherError",
    "launcher",
    "launcher_name",
    "empty",
    "build_info",
    "set_num_threads",
    "get_num_threads",
    "update_fovs",
    "gather_fovs",
    "commit_object",
    "find_peaks",
    "count_pairs",
    "union_find",
    "relabel",
]

log = logging.getLogger(__name__)

HAVE_NATIVE = _kernels is not None
"""Whether the compiled extension ``floodfilling._kernels`` could be imported."""


class LauncherError(ValueError):
    """The launcher asked for cannot run here (one line: what is missing)."""


LAUNCHERS = ("openmp", "sycl")
"""Kernel launchers: the compiled extension (OpenMP threads) and the SYCL backend."""

_routed = None  # the launcher module serving the entry points instead of the extension (None: OpenMP)
_routed_name = "openmp"


def launcher_name() -> str:
    """The launcher the kernel calls of this process go through now."""
    return _routed_name


@contextlib.contextmanager
def launcher(name: str):
    """Route every kernel call of this process through launcher ``name`` (one of
    :data:`LAUNCHERS`) while the ``with`` block runs, then back to the previous one.  The SYCL
    backend is imported, its device opened and its kernels compiled on entry, so a missing
    runtime fails here (:class:`LauncherError`, one line), before any work."""
    global _routed, _routed_name
    if name not in LAUNCHERS:
        raise ValueError(f"launcher: expected one of {', '.join(LAUNCHERS)}, got {name!r}")
    module = None
    if name == "sycl":
        module = importlib.import_module(".sycl_backend", __package__)
        try:
            device = module.backend().device
        except module.SyclError as exc:
            raise LauncherError(f"kernels='sycl': {exc}") from None
        log.info("kernels: sycl (%s:%s %s, driver %s)", device["backend"], device["type"], device["name"],
                 device["driver"])
    previous = (_routed, _routed_name)
    _routed, _routed_name = module, name
    try:
        yield
    finally:
        _routed, _routed_name = previous


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array that the current launcher uses in place (host
    memory for OpenMP, USM shared memory of the device under SYCL: no copies per call)."""
    if _routed is not None:
        return _routed.empty(shape, dtype)
    return np.empty(shape, dtype)


def _native():
    if _kernels is None:
        raise ImportError(
            "floodfilling._kernels (the compiled extension) is not available; reinstall "
            f"floodfilling with a C++ compiler ({_IMPORT_ERROR})"
        )
    return _kernels


def build_info() -> dict:
    """Build configuration of the native extension: ``{'openmp': bool, 'compiler': str,
    ...}`` (``{'native': False}`` when it is not built).  The SYCL backend is separate:
    :mod:`floodfilling.sycl_backend`."""
    if _kernels is None:
        return {"native": False, "openmp": False, "compiler": None}
    info = dict(_kernels.build_info())
    info["native"] = True
    return info


def set_num_threads(n: int) -> None:
    """Threads used by the parallel native kernels (``n <= 0`` restores the default)."""
    _native().set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads used by the parallel native kernels."""
    return int(_native().get_num_threads())


# --------------------------------------------------------------------------- helpers


def _triple(value, name: str) -> Tuple[int, int, int]:
    """An int or 3 ints (z, y, x) as a tuple of 3 ints; ValueError naming ``name``."""
    try:
        if isinstance(value, (int, np.integer)):
            v = operator.index(value)
            return (v, v, v)
        out = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}: expected an int or 3 ints, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name}: expected 3 values (z, y, x), got {value!r}")
    return out


def _deltas3(deltas) -> Tuple[int, int, int]:
    if deltas.__class__ is tuple and len(deltas) == 3 and all(d.__class__ is int for d in deltas):
        return deltas  # fast path (per-step call)
    return _triple(deltas, "deltas")


def _fov3(fov_size) -> Tuple[int, int, int]:
    return _triple(fov_size, "fov_size")


def _ids_array(x, name: str) -> np.ndarray:
    """1-D non-negative integer ids as a contiguous uint64 array."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.uint64)
    if a.dtype.kind == "i":
        if a.min() < 0:
            raise ValueError(f"{name}: ids must be non-negative")
    elif a.dtype.kind != "u":
        raise ValueError(f"{name}: expected an integer array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.uint64)


def _label_input(x, name: str) -> np.ndarray:
    """A read-only label input: uint32/uint64 (uint8/uint16 widened), native byte order,
    C-contiguous (copied if needed)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind != "u":
        raise ValueError(f"{name}: expected an unsigned integer label array (uint32 or uint64), "
                         f"got dtype {x.dtype}")
    if x.dtype.itemsize <= 4:
        dtype = np.dtype(np.uint32)
    else:
        dtype = np.dtype(np.uint64)
    return np.ascontiguousarray(x, dtype=dtype)


# --------------------------------------------------------------------- FOV update


def update_fovs(canvases, logits: np.ndarray, centers, *, move_threshold: float,
                deltas=(8, 8, 8), disco_seed_threshold: float = 0.0):
    """Write K FOVs of network logits into their canvases and return the movement faces.

    Parameters
    ----------
    canvases : list of K float32 3-D C-contiguous arrays (updated IN PLACE)
        Canvas ``k`` receives FOV ``k``.  Entries may be the same array (then the FOVs
        are written in order k = 0..K-1, serially).  Also accepted: one 3-D array (used
        for every FOV) or one C-contiguous 4-D array ``(K, z, y, x)``.
    logits : float32 (K, fz, fy, fx), C-contiguous, odd FOV sizes
        Network output, MODIFIED IN PLACE to the values actually written.
    centers : int (K, 3)
        FOV centres in canvas coordinates; each box ``centre -+ f//2`` must lie inside its
        canvas (``ValueError`` naming ``centers`` otherwise).
    move_threshold : float
        Logit threshold (compared in float32) of the disco rule.
    deltas : int or 3 ints (z, y, x)
        Movement step per axis, ``0 <= d <= f//2``.  An axis with delta 0 has no faces.
    disco_seed_threshold : float
        The disco rule is applied when ``mean(logits[k] >= move_threshold)`` exceeds it; a
        negative value disables the rule.  Rule: where ``old < 0`` and ``new > old``, keep
        ``old`` (NaN old values never match).  Then ``canvas[box] = new``.

    Returns
    -------
    scores : float32 (K, 6)
        Face maxima in the order z-, z+, y-, y+, x-, x+ (``-inf`` for axes with delta 0).
    offsets : int64 (K, 6, 3)
        Argmax positions relative to the FOV centre, (dz, dy, dx).  The caller keeps a face
        when ``not (score < move_threshold)``.
    """
    if _routed is not None:
        return _routed.update_fovs(canvases, logits, centers, move_threshold=move_threshold,
                                   deltas=deltas, disco_seed_threshold=disco_seed_threshold)
    return _native().update_fovs(canvases, logits, centers, float(move_threshold),
                                 _deltas3(deltas), float(disco_seed_threshold))


def gather_fovs(canvases, centers, fov_size, pad_value: float, out: np.ndarray) -> np.ndarray:
    """``out[k] = canvas_k[FOV box at centers[k]]`` with NaN replaced by ``pad_value``.

    ``canvases`` as in :func:`update_fovs` (read only); ``centers`` int (K, 3);
    ``fov_size`` int or 3 odd ints; ``out`` float32 (K, fz, fy, fx) C-contiguous, written
    and returned.
    """
    if _routed is not None:
        return _routed.gather_fovs(canvases, centers, fov_size, pad_value, out)
    return _native().gather_fovs(canvases, centers, _fov3(fov_size), float(pad_value), out)


def commit_object(logits: np.ndarray, logits_start, seg: np.ndarray, seg_start, size, *,
                  seg_threshold: float, min_size: int, new_id: int):
    """Commit one flooded object over a box of ``size`` (z, y, x).

    The box starts at ``logits_start`` in ``logits`` (float32, 3-D, C-contiguous) and at
    ``seg_start`` in ``seg`` (int32, 3-D, C-contiguous, modified IN PLACE). The object's
    mask is ``logits >= seg_threshold`` (float32 comparison); its *new* voxels are those of
    the mask whose segment is ``<= 0`` (free or a rejected-seed mark). When there are at
    least ``min_size`` new voxels they get ``new_id``, and the ids ``> 0`` under the mask
    are counted.

    Returns ``(n_new, ids, counts)``: ids int64 sorted ascending with their voxel counts
    (both empty, and ``seg`` untouched, when ``n_new < min_size``).
    """
    if _routed is not None:
        return _routed.commit_object(logits, logits_start, seg, seg_start, size,
                                     seg_threshold=seg_threshold, min_size=min_size, new_id=new_id)
    return _native().commit_object(logits, _triple(logits_start, "logits_start"), seg,
                                   _triple(seg_start, "seg_start"), _triple(size, "size"),
                                   float(seg_threshold), int(min_size), int(new_id))


def _require_array(a, name: str, dtype, ndim: int, writeable: bool) -> np.ndarray:
    """``a`` itself when it is a C-contiguous ndarray of ``dtype`` (native byte order) and
    ``ndim`` dimensions (and writeable if asked); ValueError naming ``name`` otherwise, with the
    messages of the bindings (csrc/bind_common.hpp), for the launchers without a binding."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype or not a.dtype.isnative:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (it is modified in place or read as "
                         "a flat buffer); use numpy.ascontiguousarray")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name}: must be writeable (it is modified in place)")
    return a


def _commit_args(logits, logits_start, seg, seg_start, size, new_id):
    """The checked arguments of :func:`commit_object` for the launchers without a binding of
    their own (the SYCL one): ``(logits_start, seg_start, size)`` as 3-tuples; the same checks
    and messages as ``csrc/bind_fov_update.cpp``."""
    ls, ss, sz = _triple(logits_start, "logits_start"), _triple(seg_start, "seg_start"), \
        _triple(size, "size")
    _require_array(logits, "logits", np.float32, 3, writeable=False)
    _require_array(seg, "seg", np.int32, 3, writeable=True)
    for d in range(3):
        if sz[d] < 0:
            raise ValueError("size: must be >= 0 on every axis")
        if ls[d] < 0 or ls[d] + sz[d] > logits.shape[d]:
            raise ValueError("logits_start: box does not fit logits of shape "
                             f"({', '.join(str(v) for v in logits.shape)})")
        if ss[d] < 0 or ss[d] + sz[d] > seg.shape[d]:
            raise ValueError("seg_start: box does not fit seg of shape "
                             f"({', '.join(str(v) for v in seg.shape)})")
    if not 1 <= int(new_id) <= 2**31 - 1:
        raise ValueError("new_id: must lie in [1, 2^31 - 1]")
    return ls, ss, sz


# -------------------------------------------------------------------------- peaks


def _border_widths(exclude_border, min_distance: int) -> Tuple[int, int, int]:
    if isinstance(exclude_border, (bool, np.bool_)):
        return (min_distance if exclude_border else 0,) * 3
    if isinstance(exclude_border, (int, np.integer)):
        if exclude_border < 0:
            raise ValueError("exclude_border: cannot be negative")
        return (int(exclude_border),) * 3
    if isinstance(exclude_border, tuple):
        if len(exclude_border) != 3:
            raise ValueError("exclude_border: a tuple must have one width per axis (3)")
        if not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                   for w in exclude_border):
            raise ValueError("exclude_border: a tuple must contain only ints")
        if any(w < 0 for w in exclude_border):
            raise ValueError("exclude_border: cannot be negative")
        return tuple(int(w) for w in exclude_border)
    raise ValueError("exclude_border: expected a bool, an int or a tuple of 3 ints, got "
                     f"{exclude_border!r}")


def _effective_threshold(image: np.ndarray, threshold) -> float:
    """scikit-image's threshold: max(threshold_abs, 0 * image.max()), compared in the
    image dtype (a Python float is a weak scalar under NumPy 2 promotion)."""
    if threshold is None:
        thr = float(image.min())
    else:
        try:
            thr = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"threshold: expected a number, got {threshold!r}") from None
    if thr < 0:  # threshold_rel=0 clamps negative thresholds to 0 (unless max is +-inf)
        rel = 0.0 * float(image.max())
        if rel > thr:
            thr = rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to +-inf, like numpy
        return float(image.dtype.type(thr))


def find_peaks(image: np.ndarray, min_distance: int = 3, threshold: float | None = 0.0,
               exclude_border=True) -> np.ndarray:
    """Local maxima of a 3-D float image, int64 (N, 3) in raster (z, y, x) order.

    Exactly the set returned by ``skimage.feature.peak_local_max(image,
    min_distance=min_distance, threshold_abs=threshold, threshold_rel=0,
    exclude_border=exclude_border)``: voxels equal to the maximum of the
    ``(2*min_distance+1)^3`` cube around them (``mode='nearest'``), greater than the
    threshold, outside the excluded border, then thinned greedily by descending value
    (ties in raster order) so that no two peaks are closer than ``min_distance``
    (Chebyshev).  No peaks when every voxel is its own local maximum (e.g. a constant
    image).  ``threshold`` is compared in the image dtype; ``None`` means ``image.min()``.
    ``image`` must not contain NaN.  An empty image gives no peaks.
    """
    if _routed is not None:
        return _routed.find_peaks(image, min_distance, threshold, exclude_border)
    args = _find_peaks_args(image, min_distance, threshold, exclude_border)
    if args is None:
        return np.zeros((0, 3), np.int64)
    return _native().find_peaks(*args)


def _find_peaks_args(image, min_distance, threshold, exclude_border):
    """The checked arguments of :func:`find_peaks` (every launcher): ``(image C-contiguous
    native-order, min_distance, threshold in the image dtype, border widths)``, or None for
    an empty image."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.dtype.kind != "f" or image.dtype.itemsize not in (4, 8):
        raise ValueError(f"image: expected dtype float32 or float64, got {image.dtype}")
    if image.ndim != 3:
        raise ValueError(f"image: expected a 3-D (z, y, x) array, got shape {image.shape}")
    try:
        md = operator.index(min_distance)
    except TypeError:
        raise ValueError(f"min_distance: expected an int, got {min_distance!r}") from None
    if md < 0:
        raise ValueError(f"min_distance: must be >= 0, got {md}")
    border = _border_widths(exclude_border, md)
    if image.size == 0:
        return None
    image = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("="))
    thr = _effective_threshold(image, threshold)
    return image, md, thr, border


# ----------------------------------------------------------------------- reconcile


def count_pairs(a: np.ndarray, b: np.ndarray, *, ignore_zero: bool = False):
    """Every distinct (a, b) label pair over the voxels of two same-shape label arrays.

    ``a``, ``b``: uint32 or uint64 (uint8/uint16 are widened), any ndim, any strides
    (non-contiguous inputs are copied).  Returns ``pairs`` uint64 (M, 2) sorted
    lexicographically and ``counts`` int64 (M,).  ``ignore_zero`` drops pairs where either
    label is 0.  Memory-bound (about 2 ns per voxel): it uses several threads only from
    2**22 voxels per thread.
    """
    if _routed is not None:
        return _routed.count_pairs(a, b, ignore_zero=ignore_zero)
    a, b = _count_pairs_args(a, b)
    return _native().count_pairs(a, b, bool(ignore_zero))


def _count_pairs_args(a, b):
    """The checked label inputs of :func:`count_pairs` (every launcher)."""
    a = _label_input(a, "a")
    b = _label_input(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b: shape {b.shape} does not match a's shape {a.shape}")
    return a, b


def _edges_input(edges) -> np.ndarray:
    e = np.asarray(edges)
    if e.size == 0:
        return np.zeros((0, 2), np.uint64)
    if e.ndim != 2 or e.shape[1] != 2:
        raise ValueError(f"edges: expected shape (M, 2), got {e.shape}")
    if e.dtype.kind == "i":
        if e.min() < 0:
            raise ValueError("edges: ids must be non-negative")
    elif e.dtype.kind != "u":
        raise ValueError(f"edges: expected an integer array, got dtype {e.dtype}")
    return np.ascontiguousarray(e, dtype=np.uint64)


def union_find(edges):
    """Connected components of merge pairs.

    ``edges``: (M, 2) non-negative integer ids (converted to uint64).  Returns ``ids``
    uint64 (N,), the sorted distinct ids appearing in ``edges``, and ``roots`` uint64 (N,),
    the minimum id of each id's component.
    """
    if _routed is not None:
        return _routed.union_find(edges)
    return _native().union_find(_edges_input(edges))


def relabel(labels: np.ndarray, keys, values) -> np.ndarray:
    """In place: every voxel of ``labels`` equal to ``keys[j]`` becomes ``values[j]``.

    ``labels``: uint32/uint64 C-contiguous writeable array (any ndim).  ``keys``: sorted,
    strictly increasing non-negative integers; ``values``: same length (each must fit in
    ``labels``' dtype where its key can occur).  Returns ``labels``.
    """
    if _routed is not None:
        return _routed.relabel(labels, keys, values)
    labels, keys, values = _relabel_args(labels, keys, values)
    _native().relabel(labels, keys, values)
    return labels


def _relabel_args(labels, keys, values):
    """The checked arguments of :func:`relabel` (every launcher): ``(labels, keys, values)``,
    keys and values as contiguous uint64."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"labels: expected a numpy.ndarray, got {type(labels).__name__}")
    if labels.dtype not in (np.uint32, np.uint64) or not labels.dtype.isnative:
        raise ValueError(f"labels: expected dtype uint32 or uint64, got {labels.dtype}")
    if not labels.flags.c_contiguous:
        raise ValueError("labels: must be C-contiguous (it is relabelled in place)")
    if not labels.flags.writeable:
        raise ValueError("labels: must be writeable (it is relabelled in place)")
    keys = _ids_array(keys, "keys")
    values = _ids_array(values, "values")
    if values.shape != keys.shape:
        raise ValueError(f"values: length {values.size} does not match keys' {keys.size}")
    if keys.size > 1 and np.any(keys[1:] <= keys[:-1]):
        raise ValueError("keys: must be sorted in strictly increasing order (unique)")
    return labels, keys, values


# ------------------------------------------------------------------------------ report


def report(selector: str | None = None) -> dict:
    """What each launcher would use here: ``{"openmp": build info and threads, "sycl": the SYCL
    backend's device, driver, fp64, runtime, cache and compile times (opening the device and
    compiling its kernels if needed), or {"error": one line} where it cannot run}``."""
    out: dict = {"openmp": build_info()}
    if HAVE_NATIVE:
        out["openmp"]["threads"] = get_num_threads()
    sb = importlib.import_module(".sycl_backend", __package__)
    try:
        out["sycl"] = sb.info(selector)
    except sb.SyclError as exc:
        out["sycl"] = {"error": str(exc)}
    return out


def format_report(rep: dict) -> str:
    """:func:`report` as a few lines of text."""
    omp = rep["openmp"]
    lines = ["openmp  " + (f"{omp['compiler']}, OpenMP {'on' if omp['openmp'] else 'off'}, "
                           f"{omp.get('threads', '?')} threads" if omp.get("native")
                           else "not built (reinstall floodfilling with a C++ compiler)")]
    s = rep["sycl"]
    if "error" in s:
        lines.append(f"sycl    unavailable: {s['error']}")
    else:
        lines.append(f"sycl    {s['backend']}:{s['type']} {s['device']} ({s['vendor']}, driver {s['driver']}), "
                     f"fp64 {'yes' if s['fp64'] else 'no'}, 64-bit atomics {'yes' if s['atomic64'] else 'no'}")
        lines.append(f"        runtime {s['runtime_version']} ({s['runtime']}), cache {s['cache']}")
        host = "cached" if s.get("host_cached") else f"compiled in {s.get('host_compile_s', '?')} s"
        lines.append(f"        host glue {host}; kernels built in {s.get('kernel_compile_s', '?')} s "
                     f"(device opened in {s.get('open_s', '?')} s)")
        lines.append("        devices: " + "; ".join(f"{d['backend']}:{d['type']} {d['name']}" for d in s["devices"]))
    return "\n".join(lines)


def _main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m floodfilling.kernels",
                                description="The kernel launchers available here (OpenMP, SYCL) and what they use.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default=None, help="SYCL device selector, e.g. cpu, gpu, level_zero:gpu")
    a = p.parse_args(argv)
    rep = report(a.device)
    print(json.dumps(rep, indent=1) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
