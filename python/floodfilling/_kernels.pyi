"""Type stubs of ``floodfilling._kernels``, the private pybind11 extension (csrc/).

The public, documented API is :mod:`floodfilling.kernels`, which normalises arguments
before calling these.  The bindings check every argument themselves (``ValueError`` naming
it) and take the typed array arguments only with exactly the dtypes given here (native byte
order, C-contiguous; writeable where written in place).  Parameter names are the
bindings' ``py::arg`` names (callable by keyword).  tests/test_kernels_stub.py checks that
every binding has a stub here with the same parameters.
"""

from typing import Any, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

_Float32 = NDArray[np.float32]
_Labels = Union[NDArray[np.uint32], NDArray[np.uint64]]
# One float32 3-D canvas (shared by every FOV), a 4-D (K, z, y, x) stack of canvases, or a
# sequence of K 3-D canvases; all C-contiguous.
_Canvases = Union[_Float32, Sequence[_Float32]]
# FOV centres: any integer array-like of shape (K, 3), (z, y, x).
_Centers = ArrayLike
# Exactly 3 ints (z, y, x) (a std::array<int64_t, 3> in C++).
_Triple = Sequence[int]

# -------------------------------------------------------------- FOV update (bind_fov_update.cpp)

def update_fovs(
    canvases: _Canvases,
    logits: _Float32,
    centers: _Centers,
    move_threshold: float,
    deltas: _Triple,
    disco_seed_threshold: float,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Disco-rule write of K FOVs (logits (K, fz, fy, fx), modified in place) into their
    canvases; returns (scores float32 (K, 6), offsets int64 (K, 6, 3))."""

def gather_fovs(
    canvases: _Canvases,
    centers: _Centers,
    fov_size: _Triple,
    pad_value: float,
    out: _Float32,
) -> NDArray[np.float32]:
    """out[k] (float32 (K, fz, fy, fx)) = canvas_k[FOV box at centers[k]], NaN -> pad_value;
    returns out."""

def commit_object(
    logits: _Float32,
    logits_start: _Triple,
    seg: NDArray[np.int32],
    seg_start: _Triple,
    size: _Triple,
    seg_threshold: float,
    min_size: int,
    new_id: int,
) -> tuple[int, NDArray[np.int64], NDArray[np.int64]]:
    """Object commit over a box of 3-D logits/seg (seg modified in place): (new voxels,
    overlapped ids sorted, their counts)."""

# ------------------------------------------------------------------------ peaks (bind_peaks.cpp)

def find_peaks(
    image: Union[NDArray[np.float32], NDArray[np.float64]],
    min_distance: int,
    threshold: float,
    border: _Triple,
) -> NDArray[np.int64]:
    """Local maxima of a 3-D C-contiguous image (peak_local_max semantics), int64 (N, 3) in
    raster order; threshold already in the image dtype, border widths (z, y, x)."""

# ---------------------------------------------------------------- reconcile (bind_reconcile.cpp)

def count_pairs(
    a: _Labels, b: _Labels, ignore_zero: bool
) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Distinct (a, b) label pairs of two same-shape C-contiguous arrays: pairs uint64 (M, 2)
    lexicographic, counts int64 (M,)."""

def union_find(edges: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Sorted distinct ids of uint64 (M, 2) edges and their component minimum."""

def relabel(labels: _Labels, keys: NDArray[np.uint64], values: NDArray[np.uint64]) -> None:
    """In place: labels equal to keys[j] (uint64 1-D, strictly increasing) become values[j]."""

def _set_count_pairs_grain(n: int) -> int:
    """Testing hook: minimum voxels per count_pairs thread (n <= 0: default); returns the
    previous value."""

def _set_count_pairs_simd(allowed: bool) -> bool:
    """Testing hook: whether count_pairs may use its SIMD run scan; returns the previous
    value."""

# --------------------------------------------------------------- build and threads (module.cpp)

def build_info() -> dict[str, Any]:
    """Build configuration: {'openmp': bool, 'compiler': str,
    'openmp_version': int | None, 'cxx_standard': int}."""

def set_num_threads(n: int) -> None:
    """Threads used by the parallel kernels; n <= 0 restores the default."""

def get_num_threads() -> int:
    """Threads used by the parallel kernels."""

def _set_parallel_grain(n: int) -> int:
    """Testing hook: minimum elements per parallel chunk (n <= 0: default); returns the
    previous value."""
