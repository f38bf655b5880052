r"""The contact graph of a segmentation and the features of each pair of touching objects
(the learned agglomeration of ``ffn segment --refine --refine-model``,
:mod:`floodfilling.inference.learned`).

Two objects touch where a voxel of one and a voxel of the other are 6-neighbours (a *face*).
Everything kept per object and per pair is a **sufficient statistic that adds** when two objects
merge, so that the features of a merged object's pairs are computed from sums, never from the
volume again:

- per object (:data:`NODE_STATS`): voxels, sum and sum of squares of the intensity, voxels darker
  than :data:`DARK` (glia and membrane-like objects are dark), faces with other objects (its
  surface; on a merge the faces between the two are taken off twice), voxels the flood itself
  gave it (the rest the watershed filled);
- per pair (:data:`EDGE_STATS`): faces, faces where both voxels were the flood's (two floods
  met there and the network stopped both); on each face the darker and the brighter of its two voxels
  (membranes are dark: a membrane between two cells makes the darker side dark) and the same of
  the smoothed image (Gaussian, sigma 1): sums, sums of squares, and counts below the thresholds
  :data:`CONTACT_BINS` (an additive histogram); the shape of the image across the contact at each
  scale of :data:`HESSIAN_SIGMAS` (below); and the voxels each object's flood ran into the other
  (the flood's recorded overlaps, NaN where the flood recorded none).

The Hessian statistics tell a membrane from a dark patch of cytoplasm: a membrane is a dark
*sheet*, so the Hessian H of the smoothed image (scale-normalised, sigma^2 H) has one large
positive eigenvalue there, the curvature across the sheet, whatever the sheet's orientation;
inside a dark organelle or a dark glial process there is no such sheet. On each face (the
larger of its two voxels') the largest eigenvalue (*sheet*: sum, sum of squares, faces where it
is positive), and the second derivative along the face's own axis (*across*: the mean of its two
voxels') — a membrane between the two objects runs along the face::

      a a a | b b b      intensity along the axis:   ‾‾‾\_/‾‾‾   (dark sheet at the face)
      a a a | b b b      d2/dx2 > 0 at the face  ->  across > 0, sheet > 0
      a a a | b b b      a face inside one cell:  ‾‾‾‾‾‾‾‾  ->  across ~ 0, sheet ~ 0


:func:`features` turns the statistics of pairs into the classifier's inputs (:data:`FEATURES`, in
that order), symmetric in the two objects (each per-object feature as the smaller and the larger
object's value). Intensity is the image as normalised for the flood, membranes dark (an image
with bright membranes is negated first). 6-connectivity, voxel units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DARK = -1.0  # a voxel darker than this (normalised image) counts as dark (node statistic)
CONTACT_BINS = (-1.5, -1.0, -0.5, 0.0, 0.5)  # contact intensity thresholds: counts of faces below each

# per-object statistics (columns of ContactGraph.node_stats)
NODE_STATS = ("voxels", "sum", "sum2", "dark", "surface", "flooded")
HESSIAN_SIGMAS = (1.0, 2.0)  # scales (Gaussian sigma, voxels) of the contact's Hessian statistics
# per-pair statistics (columns of ContactGraph.edge_stats)
EDGE_STATS = (("faces", "lo_sum", "lo_sum2", "hi_sum", "slo_sum", "slo_sum2", "flooded_faces")
              + tuple(f"lo_below_{t:g}" for t in CONTACT_BINS)
              + tuple(f"{n}_s{s:g}" for s in HESSIAN_SIGMAS for n in ("sheet_sum", "sheet_sum2", "across_sum",
                                                                     "sheet_pos"))
              + ("overlap",))
N_NODE, N_EDGE = len(NODE_STATS), len(EDGE_STATS)
_E = {n: i for i, n in enumerate(EDGE_STATS)}
_N = {n: i for i, n in enumerate(NODE_STATS)}

FEATURES = (
    "log_faces",  # log(1 + contact faces)
    "contact_mean",  # mean over faces of the darker voxel's intensity
    "contact_std",  # its standard deviation
    "contact_bright_mean",  # mean of the brighter voxel's intensity
    "contact_smooth_mean",  # mean of the darker voxel's intensity in the smoothed image
    "contact_smooth_std",
) + tuple(f"contact_below_{t:g}" for t in CONTACT_BINS) + (  # fraction of faces darker than t
    "log_size_small", "log_size_large",  # log(1 + voxels) of the smaller / larger object
    "mean_small", "mean_large",  # object mean intensity
    "std_small", "std_large",
    "dark_small", "dark_large",  # fraction of the object's voxels darker than DARK
    "contact_of_surface_small", "contact_of_surface_large",  # faces / the object's surface
    "contact_per_size",  # faces / voxels of the smaller object ** (2/3)
    "mean_difference",  # |mean_small - mean_large|
    "overlap",  # flood overlap voxels between the two / voxels of the smaller object (NaN: none recorded)
    "flooded_small", "flooded_large",  # fraction of the object's voxels the flood gave it (0: a core's or filled)
    "contact_flooded",  # fraction of the faces where both voxels were the flood's
) + tuple(f"{n}_s{s:g}" for s in HESSIAN_SIGMAS for n in ("sheet_mean", "sheet_std", "across_mean", "sheet_pos"))


@dataclass
class ContactGraph:
    """Objects and pairs of touching objects with their additive statistics."""

    ids: np.ndarray  # (n,) int64 object ids (> 0), sorted
    node_stats: np.ndarray  # (n, N_NODE) float64, rows in the order of ids
    pairs: np.ndarray  # (m, 2) int64 object ids a < b, sorted
    edge_stats: np.ndarray  # (m, N_EDGE) float64

    def node_index(self) -> dict[int, int]:
        return {int(i): k for k, i in enumerate(self.ids)}


def _faces(seg: np.ndarray, incore: np.ndarray | None = None):
    """Every face between two different objects (id 0 is no object): (a, b, flat index of the
    voxel on a's side, flat index on b's side), a < b; ``incore`` (bool, seg's shape): only the
    faces whose lower voxel (along the face's axis) is in it."""
    idx = np.arange(seg.size, dtype=np.int64).reshape(seg.shape)
    out = []
    for ax in range(seg.ndim):
        lo = [slice(None)] * seg.ndim
        hi = [slice(None)] * seg.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        u, v = seg[tuple(lo)], seg[tuple(hi)]
        m = (u != v) & (u > 0) & (v > 0)
        if incore is not None:
            m &= incore[tuple(lo)]
        out.append((u[m].astype(np.int64), v[m].astype(np.int64), idx[tuple(lo)][m], idx[tuple(hi)][m],
                    np.full(int(m.sum()), ax, np.int8)))
    u, v, iu, iv, axis = (np.concatenate(c) for c in zip(*out))
    swap = u > v
    a, b = np.where(swap, v, u), np.where(swap, u, v)
    ia, ib = np.where(swap, iv, iu), np.where(swap, iu, iv)
    return a, b, ia, ib, axis


def contact_graph(seg: np.ndarray, image: np.ndarray, overlaps: dict | None = None,
                  smooth_sigma: float = 1.0, flooded: np.ndarray | None = None,
                  core: tuple[slice, ...] | None = None) -> ContactGraph:
    """The :class:`ContactGraph` of ``seg`` (integer ids, 0 = no object) over ``image`` (the
    normalised intensity, membranes dark, same shape); ``overlaps``: the flood's id -> (ids,
    voxels) its flood ran into (None: not recorded, the overlap statistic is NaN); ``flooded``:
    the voxels the flood segmented (bool; None: all of ``seg``'s objects).

    ``core``: one tile's share (a box of the arrays, which are its window; default all of
    them): the objects' statistics over the core's voxels, and the faces whose lower voxel (along
    the face's axis) lies in the core, so a face across two tiles is counted once, by the tile
    below it, and the statistics of the tiles of a volume add up to the volume's
    (:func:`sum_graphs`). The smoothing sees the whole window."""
    seg = np.asarray(seg)
    if seg.shape != np.shape(image):
        raise ValueError(f"segmentation shape {seg.shape} and image shape {np.shape(image)} differ")
    incore = None
    if core is not None and any((s.start or 0) > 0 or (s.stop if s.stop is not None else n) < n
                                for s, n in zip(core, seg.shape)):
        incore = np.zeros(seg.shape, bool)
        incore[core] = True
    img = np.asarray(image, np.float64)
    smooth = ndimage.gaussian_filter(img, smooth_sigma) if smooth_sigma > 0 else img
    flat = seg.ravel().astype(np.int64)
    ids = np.unique(flat)
    ids = ids[ids > 0]
    pos = np.searchsorted(ids, flat)
    inside = flat > 0
    if incore is not None:
        inside &= incore.ravel()
    n = len(ids)
    node = np.zeros((n, N_NODE), np.float64)
    fi = img.ravel()
    node[:, _N["voxels"]] = np.bincount(pos[inside], minlength=n)[:n]
    node[:, _N["sum"]] = np.bincount(pos[inside], weights=fi[inside], minlength=n)[:n]
    node[:, _N["sum2"]] = np.bincount(pos[inside], weights=fi[inside] ** 2, minlength=n)[:n]
    node[:, _N["dark"]] = np.bincount(pos[inside], weights=(fi[inside] < DARK).astype(np.float64), minlength=n)[:n]
    fl = (np.asarray(flooded, bool) if flooded is not None else seg > 0).ravel()
    node[:, _N["flooded"]] = np.bincount(pos[inside], weights=fl[inside].astype(np.float64), minlength=n)[:n]
    a, b, ia, ib, axis = _faces(seg, incore)
    if len(a) == 0:
        return _drop_absent(ContactGraph(ids.astype(np.int64), node, np.zeros((0, 2), np.int64),
                                         np.zeros((0, N_EDGE))), incore)
    pa, pb = np.searchsorted(ids, a), np.searchsorted(ids, b)
    node[:, _N["surface"]] = np.bincount(np.concatenate([pa, pb]), minlength=n)[:n]
    key = pa * n + pb
    keys, inv = np.unique(key, return_inverse=True)
    m = len(keys)
    lo, hi = np.minimum(fi[ia], fi[ib]), np.maximum(fi[ia], fi[ib])
    fs = smooth.ravel()
    slo = np.minimum(fs[ia], fs[ib])
    edge = np.zeros((m, N_EDGE), np.float64)
    edge[:, _E["faces"]] = np.bincount(inv, minlength=m)
    edge[:, _E["lo_sum"]] = np.bincount(inv, weights=lo, minlength=m)
    edge[:, _E["lo_sum2"]] = np.bincount(inv, weights=lo ** 2, minlength=m)
    edge[:, _E["hi_sum"]] = np.bincount(inv, weights=hi, minlength=m)
    edge[:, _E["slo_sum"]] = np.bincount(inv, weights=slo, minlength=m)
    edge[:, _E["slo_sum2"]] = np.bincount(inv, weights=slo ** 2, minlength=m)
    edge[:, _E["flooded_faces"]] = np.bincount(inv, weights=(fl[ia] & fl[ib]).astype(np.float64), minlength=m)
    for t in CONTACT_BINS:
        edge[:, _E[f"lo_below_{t:g}"]] = np.bincount(inv, weights=(lo < t).astype(np.float64), minlength=m)
    for sigma in HESSIAN_SIGMAS:
        sheet, across = _hessian_faces(img, sigma, ia, ib, axis)
        edge[:, _E[f"sheet_sum_s{sigma:g}"]] = np.bincount(inv, weights=sheet, minlength=m)
        edge[:, _E[f"sheet_sum2_s{sigma:g}"]] = np.bincount(inv, weights=sheet ** 2, minlength=m)
        edge[:, _E[f"across_sum_s{sigma:g}"]] = np.bincount(inv, weights=across, minlength=m)
        edge[:, _E[f"sheet_pos_s{sigma:g}"]] = np.bincount(inv, weights=(sheet > 0).astype(np.float64), minlength=m)
    pairs = np.stack([ids[keys // n], ids[keys % n]], axis=1).astype(np.int64)
    edge[:, _E["overlap"]] = pair_overlaps(pairs, overlaps)
    return _drop_absent(ContactGraph(ids.astype(np.int64), node, pairs, edge), incore)


def _hessian_faces(img: np.ndarray, sigma: float, ia, ib, axis):
    """At each face (flat voxel indices ``ia``, ``ib`` of its two voxels, ``axis`` its axis):
    *sheet*, the largest eigenvalue of sigma^2 times the Hessian of ``img`` smoothed at ``sigma``
    (Gaussian derivatives), the larger of its two voxels'; *across*, sigma^2 times the second
    derivative along the face's axis, the mean of its two voxels' (module docstring)."""
    ndim = img.ndim
    comp = {}
    for i in range(ndim):
        for j in range(i, ndim):
            order = [0] * ndim
            order[i] += 1
            order[j] += 1
            d = ndimage.gaussian_filter(img, sigma, order=order).ravel() * sigma ** 2
            comp[i, j] = comp[j, i] = (d[ia], d[ib])
    out = []
    for side in (0, 1):
        h = np.empty((len(ia), ndim, ndim))
        for (i, j), v in comp.items():
            h[:, i, j] = v[side]
        out.append(np.linalg.eigvalsh(h)[:, -1])
    sheet = np.maximum(out[0], out[1])
    across = np.zeros(len(ia))
    for ax in range(ndim):
        sel = axis == ax
        across[sel] = 0.5 * (comp[ax, ax][0][sel] + comp[ax, ax][1][sel])
    return sheet, across


def _drop_absent(g: ContactGraph, incore: np.ndarray | None) -> ContactGraph:
    """A tile's graph without the objects of its window that have no voxel in its core and no
    face counted by it (the whole volume's graph: unchanged)."""
    if incore is None:
        return g
    keep = (g.node_stats[:, _N["voxels"]] > 0) | np.isin(g.ids, g.pairs.ravel())
    return ContactGraph(g.ids[keep], g.node_stats[keep], g.pairs, g.edge_stats)


def sum_graphs(graphs: list[ContactGraph], overlaps: dict | None = None) -> ContactGraph:
    """The graph of a volume from those of its tiles (:func:`contact_graph` with ``core``):
    every statistic summed, tile by tile in the order given (so two runs that sum the same
    tiles in the same order agree to the bit), the overlap statistic then taken from the
    flood's ``overlaps`` (:func:`pair_overlaps`)."""
    ids = np.unique(np.concatenate([g.ids for g in graphs] or [np.zeros(0, np.int64)])).astype(np.int64)
    node = np.zeros((len(ids), N_NODE), np.float64)
    pairs = np.concatenate([g.pairs for g in graphs] or [np.zeros((0, 2), np.int64)]).reshape(-1, 2)
    upairs, inv = np.unique(pairs, axis=0, return_inverse=True)
    edge = np.zeros((len(upairs), N_EDGE), np.float64)
    at = 0
    for g in graphs:  # np.add.at adds element by element in order: tile order, then the tile's rows
        np.add.at(node, np.searchsorted(ids, g.ids), g.node_stats)
        np.add.at(edge, inv.ravel()[at:at + len(g.pairs)], g.edge_stats)
        at += len(g.pairs)
    edge[:, _E["overlap"]] = pair_overlaps(upairs, overlaps)
    return ContactGraph(ids, node, upairs.astype(np.int64).reshape(-1, 2), edge)


def pair_overlaps(pairs: np.ndarray, overlaps: dict | None) -> np.ndarray:
    """For each pair (a, b): the voxels a's flood ran into b plus those b's ran into a (the
    flood's overlaps: id -> (ids, voxels)); NaN for every pair when ``overlaps`` is None."""
    if overlaps is None:
        return np.full(len(pairs), np.nan)
    got: dict[tuple[int, int], float] = {}
    for k, (oids, vox) in overlaps.items():
        for j, v in zip(np.asarray(oids, np.int64), np.asarray(vox, np.int64)):
            if j > 0 and j != k:
                key = (min(int(k), int(j)), max(int(k), int(j)))
                got[key] = got.get(key, 0.0) + float(v)
    return np.asarray([got.get((int(a), int(b)), 0.0) for a, b in pairs], np.float64)


def merged_node(sa: np.ndarray, sb: np.ndarray, edge_ab: np.ndarray) -> np.ndarray:
    """The statistics of the union of two objects with statistics ``sa``, ``sb`` and pair
    statistics ``edge_ab``: sums, less the faces between them on both surfaces."""
    s = sa + sb
    s[_N["surface"]] -= 2 * edge_ab[_E["faces"]]
    return s


def merged_edge(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """Statistics of the pair (a + b, c) from those of (a, c) and (b, c): sums (NaN overlap
    stays NaN)."""
    return e1 + e2


def features(edge: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` (k, len(FEATURES)) float64 of k pairs from their statistics
    (``edge`` (k, N_EDGE)) and those of their two objects (``na``, ``nb`` (k, N_NODE), in
    either order)."""
    edge, na, nb = (np.atleast_2d(np.asarray(x, np.float64)) for x in (edge, na, nb))
    small_first = na[:, _N["voxels"]] <= nb[:, _N["voxels"]]
    s = np.where(small_first[:, None], na, nb)
    g = np.where(small_first[:, None], nb, na)
    f = edge[:, _E["faces"]]
    fd = np.maximum(f, 1.0)

    def mean_std(sum_, sum2, n):
        mean = sum_ / n
        return mean, np.sqrt(np.maximum(sum2 / n - mean ** 2, 0.0))

    cm, cs = mean_std(edge[:, _E["lo_sum"]], edge[:, _E["lo_sum2"]], fd)
    sm, ss = mean_std(edge[:, _E["slo_sum"]], edge[:, _E["slo_sum2"]], fd)
    vs, vg = np.maximum(s[:, _N["voxels"]], 1.0), np.maximum(g[:, _N["voxels"]], 1.0)
    ms, ss_ = mean_std(s[:, _N["sum"]], s[:, _N["sum2"]], vs)
    mg, sg_ = mean_std(g[:, _N["sum"]], g[:, _N["sum2"]], vg)
    cols = [np.log1p(f), cm, cs, edge[:, _E["hi_sum"]] / fd, sm, ss]
    cols += [edge[:, _E[f"lo_below_{t:g}"]] / fd for t in CONTACT_BINS]
    cols += [np.log1p(s[:, _N["voxels"]]), np.log1p(g[:, _N["voxels"]]), ms, mg, ss_, sg_,
             s[:, _N["dark"]] / vs, g[:, _N["dark"]] / vg,
             f / np.maximum(s[:, _N["surface"]], 1.0), f / np.maximum(g[:, _N["surface"]], 1.0),
             f / vs ** (2.0 / 3.0), np.abs(ms - mg), edge[:, _E["overlap"]] / vs,
             s[:, _N["flooded"]] / vs, g[:, _N["flooded"]] / vg, edge[:, _E["flooded_faces"]] / fd]
    for sigma in HESSIAN_SIGMAS:
        hm, hs = mean_std(edge[:, _E[f"sheet_sum_s{sigma:g}"]], edge[:, _E[f"sheet_sum2_s{sigma:g}"]], fd)
        cols += [hm, hs, edge[:, _E[f"across_sum_s{sigma:g}"]] / fd, edge[:, _E[f"sheet_pos_s{sigma:g}"]] / fd]
    return np.stack(cols, axis=1)
