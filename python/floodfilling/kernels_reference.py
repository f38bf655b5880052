"""NumPy reference twins of the native kernels (``floodfilling._kernels``).

Every native kernel wrapped by :mod:`floodfilling.kernels` has its twin here, named
``<kernel>_reference`` (``update_fovs_reference``, ``gather_fovs_reference``,
``commit_object_reference``, ``find_peaks_reference``, ``count_pairs_reference``,
``union_find_reference``, ``relabel_reference``): a plain NumPy/SciPy version with the
same signature, in-place effects and outputs -- obviously correct, slow.  The tests
(``tests/test_kernels_*.py``) check that native and reference agree exactly (float32
bitwise, NaN positions included); the benchmarks (``bench/kernels.py``) time one against
the other.  Nothing in the library calls these at run time: they are the specification
of the kernels, and their documentation.

scikit-image (``find_peaks_reference``) is imported lazily: it is a test/bench dependency
only.
"""

from __future__ import annotations

import numpy as np

from .kernels import _deltas3, _edges_input, _fov3, _ids_array

__all__ = [
    "update_fovs_reference",
    "gather_fovs_reference",
    "commit_object_reference",
    "find_peaks_reference",
    "count_pairs_reference",
    "union_find_reference",
    "relabel_reference",
]


# --------------------------------------------------------------------------- helpers


def _canvas_list(canvases, k: int):
    """The reference's view of ``canvases`` (see update_fovs)."""
    if isinstance(canvases, np.ndarray):
        if canvases.ndim == 3:
            return [canvases] * k
        return [canvases[i] for i in range(canvases.shape[0])]
    return list(canvases)


def _box(center, fov) -> tuple:
    return tuple(slice(int(c) - f // 2, int(c) + f // 2 + 1) for c, f in zip(center, fov))


def _check_box(center, fov, shape, k: int) -> None:
    for c, f, s in zip(center, fov, shape):
        if int(c) - f // 2 < 0 or int(c) + f // 2 >= s:
            raise ValueError(
                f"centers[{k}] = {tuple(int(v) for v in center)}: the FOV box of size "
                f"{tuple(fov)} does not fit inside canvas {k} of shape {tuple(shape)}"
            )


# --------------------------------------------------------------------- FOV update


def update_fovs_reference(canvases, logits: np.ndarray, centers, *, move_threshold: float,
                          deltas=(8, 8, 8), disco_seed_threshold: float = 0.0):
    """NumPy reference of :func:`~floodfilling.kernels.update_fovs` (same in-place effects
    and outputs)."""
    logits = np.asarray(logits)
    if logits.dtype != np.float32 or logits.ndim != 4:
        raise ValueError("logits: expected a float32 (K, fz, fy, fx) array")
    k_total = logits.shape[0]
    fov = logits.shape[1:]
    if any(f % 2 == 0 for f in fov):
        raise ValueError(f"logits: FOV sizes must be odd, got {fov}")
    d = _deltas3(deltas)
    if any(not 0 <= dd <= f // 2 for dd, f in zip(d, fov)):
        raise ValueError(f"deltas: each delta must lie in [0, fov_size // 2], got {d}")
    centers = np.asarray(centers).reshape(-1, 3) if k_total else np.zeros((0, 3), np.int64)
    cvs = _canvas_list(canvases, k_total)
    if len(cvs) != k_total or len(centers) != k_total:
        raise ValueError("canvases: need one canvas and one centre per FOV")
    thr = np.float32(move_threshold)
    c = [f // 2 for f in fov]
    scores = np.empty((k_total, 6), np.float32)
    offsets = np.zeros((k_total, 6, 3), np.int64)
    for k in range(k_total):
        canvas = cvs[k]
        _check_box(centers[k], fov, canvas.shape, k)
        sel = _box(centers[k], fov)
        new = logits[k]
        if disco_seed_threshold >= 0 and np.mean(new >= thr) > disco_seed_threshold:
            old = canvas[sel]
            keep = (old < np.float32(0.0)) & (new > old)
            new[keep] = old[keep]
        canvas[sel] = new
        for a in range(3):
            others = [b for b in range(3) if b != a]
            for side, sign in enumerate((-1, 1)):
                face = 2 * a + side
                if d[a] == 0:
                    scores[k, face] = -np.inf
                    continue
                o = sign * d[a]
                index = [slice(c[b] - d[b], c[b] + d[b] + 1) for b in range(3)]
                index[a] = c[a] + o
                plane = new[tuple(index)]
                j = int(np.argmax(plane))
                i0, i1 = np.unravel_index(j, plane.shape)
                scores[k, face] = plane[i0, i1]
                offsets[k, face, a] = o
                offsets[k, face, others[0]] = i0 - d[others[0]]
                offsets[k, face, others[1]] = i1 - d[others[1]]
    return scores, offsets


def gather_fovs_reference(canvases, centers, fov_size, pad_value: float,
                          out: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference of :func:`~floodfilling.kernels.gather_fovs` (allocates ``out`` when
    it is None)."""
    fov = _fov3(fov_size)
    centers = np.asarray(centers).reshape(-1, 3)
    k_total = len(centers)
    cvs = _canvas_list(canvases, k_total)
    if out is None:
        out = np.empty((k_total,) + fov, np.float32)
    pad = np.float32(pad_value)
    for k in range(k_total):
        _check_box(centers[k], fov, cvs[k].shape, k)
        box = cvs[k][_box(centers[k], fov)]
        out[k] = np.where(np.isnan(box), pad, box)
    return out


def commit_object_reference(logits, logits_start, seg, seg_start, size, *, seg_threshold: float,
                            min_size: int, new_id: int):
    """NumPy reference of :func:`~floodfilling.kernels.commit_object` (same in-place effect
    and outputs)."""
    lb = logits[tuple(slice(a, a + n) for a, n in zip(logits_start, size))]
    seg_box = seg[tuple(slice(a, a + n) for a, n in zip(seg_start, size))]
    mask = lb >= np.float32(seg_threshold)
    taken = seg_box > 0
    new = mask & ~taken
    n_new = int(np.count_nonzero(new))
    if n_new < min_size:
        return n_new, np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids, counts = np.unique(seg_box[mask & taken], return_counts=True)
    seg_box[new] = new_id
    return n_new, ids.astype(np.int64), counts.astype(np.int64)


# -------------------------------------------------------------------------- peaks


def find_peaks_reference(image: np.ndarray, min_distance: int = 3,
                         threshold: float | None = 0.0, exclude_border=True) -> np.ndarray:
    """``skimage.feature.peak_local_max(..., threshold_rel=0)`` sorted in raster order
    (scikit-image is imported lazily: it is a test/bench dependency only)."""
    from skimage.feature import peak_local_max

    image = np.asarray(image)
    if image.size == 0:  # scikit-image raises on empty images
        return np.zeros((0, image.ndim), np.int64)
    thr = None if threshold is None else float(threshold)
    pts = peak_local_max(image, min_distance=min_distance, threshold_abs=thr,
                         threshold_rel=0, exclude_border=exclude_border)
    pts = np.asarray(pts, dtype=np.int64).reshape(-1, image.ndim)
    order = np.lexsort(pts.T[::-1])
    return pts[order]


# ----------------------------------------------------------------------- reconcile


def count_pairs_reference(a: np.ndarray, b: np.ndarray, *, ignore_zero: bool = False):
    """np.unique reference of :func:`~floodfilling.kernels.count_pairs` (combined 64-bit key
    when both labels fit in 32 bits, row-wise unique otherwise)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"b: shape {b.shape} does not match a's shape {a.shape}")
    a = a.reshape(-1).astype(np.uint64)
    b = b.reshape(-1).astype(np.uint64)
    if ignore_zero:
        keep = (a != 0) & (b != 0)
        a, b = a[keep], b[keep]
    if a.size == 0:
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    if int(a.max()) < 2**32 and int(b.max()) < 2**32:
        key = (a << np.uint64(32)) | b
        u, counts = np.unique(key, return_counts=True)
        pairs = np.stack([u >> np.uint64(32), u & np.uint64(0xFFFFFFFF)], axis=1)
    else:
        pairs, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    return pairs.astype(np.uint64), counts.astype(np.int64)


def union_find_reference(edges):
    """scipy.sparse.csgraph reference of :func:`~floodfilling.kernels.union_find`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = _edges_input(edges)
    ids = np.unique(e)
    if ids.size == 0:
        return ids, ids.copy()
    idx = np.searchsorted(ids, e)
    n = ids.size
    graph = coo_matrix((np.ones(len(e), np.int8), (idx[:, 0], idx[:, 1])), shape=(n, n))
    _, lab = connected_components(graph, directed=False)
    # ids are sorted: a component's first member is its minimum id
    _, first = np.unique(lab, return_index=True)
    return ids, ids[first][lab]


def relabel_reference(labels: np.ndarray, keys, values) -> np.ndarray:
    """np.searchsorted reference of :func:`~floodfilling.kernels.relabel` (in place,
    returns ``labels``)."""
    keys = _ids_array(keys, "keys")
    values = _ids_array(values, "values")
    if keys.size == 0 or labels.size == 0:
        return labels
    flat = labels.reshape(-1).copy()
    lab = flat.astype(np.uint64)
    idx = np.minimum(np.searchsorted(keys, lab), keys.size - 1)
    match = keys[idx] == lab
    flat[match] = values[idx[match]].astype(labels.dtype)
    labels[...] = flat.reshape(labels.shape)
    return labels
