"""Segmentation quality metrics: variation of information, adapted Rand error, split/merge lists.

Every metric here is computed from one sparse contingency table (the voxel counts of each
co-occurring ``(seg id, gt id)`` pair), built with NumPy alone, so a pair of 250^3 volumes is
scored in about a second.

Conventions
-----------
Arguments are always ordered ``(seg, gt)``: the segmentation under test first, the ground truth
second. Arrays are integer label volumes of equal shape (any dimensionality, usually z, y, x).
Label ids are >= 0 (as ``ffn prepare`` and ``ffn consensus`` require): :func:`evaluate` refuses
negative ids; the contingency tables themselves accept any integers.

Split and merge
    *split* errors are over-segmentation: one ground-truth object broken into several
    segmentation objects. *merge* errors are under-segmentation: one segmentation object
    covering several ground-truth objects.

Variation of information (Meila 2007)
    ``vi = vi_split + vi_merge`` with ``vi_split = H(seg | gt)`` and ``vi_merge = H(gt | seg)``.
    Logarithms are base 2 (bits) by default, as in ``skimage.metrics.variation_of_information``
    (whose result ``[H(image1|image0), H(image0|image1)]`` for ``(gt, seg)`` is
    ``[vi_split, vi_merge]``); pass ``base=math.e`` for nats.

Adapted Rand error (SNEMI3D / CREMI, Arganda-Carreras et al. 2015)
    With ``p_ij`` the contingency counts, ``a_i`` the ground-truth object sizes and ``b_j`` the
    segmentation object sizes: ``precision = sum p_ij^2 / sum b_j^2`` (hurt by merges),
    ``recall = sum p_ij^2 / sum a_i^2`` (hurt by splits), ``are = 1 - 2PR / (P + R)``.
    scikit-image's ``adapted_rand_error(image_true, image_test)`` returns the same error but
    with precision and recall swapped relative to this convention, and counts pairs of
    *distinct* voxels (``n (n - 1)`` instead of ``n^2``); ``exclude_self_pairs=True`` selects
    that pair counting, which reproduces its error exactly.

Ground-truth label 0 (option ``gt_zero``)
    ``"ignore"`` (default, the CREMI/SNEMI convention): voxels where ``gt == 0`` are dropped
    from every metric. ``"label"``: 0 is an ordinary ground-truth label (every voxel counts;
    this is how the reference quality figures of the FIB-25 cube were computed with
    scikit-image).

Segmentation label 0
    Always an ordinary label in the contingency table and the metrics: unsegmented voxels form
    one big "object", so leaving a ground-truth object unsegmented costs splits (and, where
    the 0 region spans several ground-truth objects, merges). In the split/merge *lists*,
    seg id 0 is never reported as a false merge (it is not an object), but it does appear as
    a fragment of split ground-truth objects.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import volumes

logger = logging.getLogger(__name__)

__all__ = [
    "Contingency",
    "contingency",
    "variation_of_information",
    "adapted_rand",
    "evaluate",
    "check_nonnegative",
    "format_report",
    "GT_ZERO_MODES",
]

GT_ZERO_MODES = ("ignore", "label")

# Dense relabelling / pair counting use np.bincount when the id span is at most this large
# (or at most twice the number of voxels); otherwise they fall back to sorting (np.unique).
_BINCOUNT_MIN_SPAN = 1 << 22


# --------------------------------------------------------------------------------------------
# validation and dense relabelling


def _check_pair(seg: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    seg = np.asarray(seg)
    gt = np.asarray(gt)
    for name, arr in (("seg", seg), ("gt", gt)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must have an integer dtype (label ids), got {arr.dtype}")
    if seg.shape != gt.shape:
        raise ValueError(f"shape mismatch: seg has shape {seg.shape}, gt has shape {gt.shape}")
    if seg.size == 0:
        raise ValueError(f"seg and gt are empty (shape {seg.shape})")
    return seg, gt


def _check_gt_zero(gt_zero: str) -> None:
    if gt_zero not in GT_ZERO_MODES:
        raise ValueError(f"gt_zero must be one of {GT_ZERO_MODES}, got {gt_zero!r}")


def _dense_ids(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, inverse)``: the sorted distinct values and each voxel's index into them."""
    flat = arr.reshape(-1)
    lo = int(flat.min())
    hi = int(flat.max())
    span = hi - lo + 1
    if span <= max(_BINCOUNT_MIN_SPAN, 2 * flat.size):
        if np.issubdtype(flat.dtype, np.unsignedinteger):
            off = (flat - flat.dtype.type(lo)).astype(np.intp, copy=False)
        else:
            off = flat.astype(np.intp)
            if lo:
                off -= lo
        present = np.flatnonzero(np.bincount(off, minlength=span))
        lut = np.zeros(span, dtype=np.intp)
        lut[present] = np.arange(present.size, dtype=np.intp)
        inverse = lut[off]
        ids = present.astype(flat.dtype) + flat.dtype.type(lo)
        return ids, inverse
    ids, inverse = np.unique(flat, return_inverse=True)
    return ids, inverse.reshape(-1).astype(np.intp, copy=False)


# --------------------------------------------------------------------------------------------
# contingency table


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table of a ``(seg, gt)`` pair.

    One row per co-occurring pair, sorted by ``(seg_id, gt_id)``: ``counts[k]`` voxels have
    label ``seg_ids[k]`` in the segmentation and ``gt_ids[k]`` in the ground truth. The ids keep
    the dtypes of the input arrays; ``counts`` is int64.
    """

    seg_ids: np.ndarray
    gt_ids: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        """Number of voxels the table covers."""
        return int(self.counts.sum())

    def __len__(self) -> int:
        return int(self.counts.size)

    def drop_gt_zero(self) -> "Contingency":
        """The table restricted to voxels where ``gt != 0``."""
        keep = self.gt_ids != 0
        return Contingency(self.seg_ids[keep], self.gt_ids[keep], self.counts[keep])

    def select(self, gt_zero: str) -> "Contingency":
        """The table for a ``gt_zero`` mode (``"ignore"`` drops gt 0, ``"label"`` keeps it)."""
        _check_gt_zero(gt_zero)
        return self.drop_gt_zero() if gt_zero == "ignore" else self

    def seg_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, voxels)`` of the segmentation objects in the table, ids ascending."""
        return _group_sum(self.seg_ids, self.counts)

    def gt_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, voxels)`` of the ground-truth objects in the table, ids ascending."""
        return _group_sum(self.gt_ids, self.counts)


def _group_sum(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inverse = np.unique(keys, return_inverse=True)
    return ids, np.bincount(inverse.reshape(-1), weights=values, minlength=ids.size).astype(np.int64)


def contingency(seg: Any, gt: Any) -> Contingency:
    """Count the voxels of every co-occurring ``(seg id, gt id)`` pair over all voxels.

    Label 0 is an ordinary id on both sides here; use :meth:`Contingency.drop_gt_zero` (or
    ``select(gt_zero)``) to leave out unlabelled ground truth. Raises ``ValueError`` on shape
    mismatch, non-integer dtypes or empty arrays.
    """
    seg, gt = _check_pair(seg, gt)
    s_ids, s_inv = _dense_ids(seg)
    g_ids, g_inv = _dense_ids(gt)
    n_g = g_ids.size
    key = s_inv.astype(np.int64, copy=False) * n_g
    del s_inv
    key += g_inv
    del g_inv
    n_cells = s_ids.size * n_g
    if n_cells <= max(_BINCOUNT_MIN_SPAN, key.size):
        counts = np.bincount(key, minlength=n_cells)
        cells = np.flatnonzero(counts)
        counts = counts[cells].astype(np.int64, copy=False)
    else:
        cells, counts = np.unique(key, return_counts=True)
        counts = counts.astype(np.int64, copy=False)
    del key
    return Contingency(s_ids[cells // n_g], g_ids[cells % n_g], counts)


def contingency_volumes(seg: Any, gt: Any, slab_voxels: int = 1 << 24) -> Contingency:
    """:func:`contingency` of two same-shape 3-D volumes read in z-slabs of about
    ``slab_voxels`` voxels (NumPy arrays or :class:`~floodfilling.volumes.Volume` handles), so
    memory stays bounded for volumes larger than RAM; the same table as the whole arrays give."""
    if tuple(seg.shape) != tuple(gt.shape) or len(seg.shape) != 3:
        raise ValueError(f"shape mismatch: seg has shape {tuple(seg.shape)}, gt has shape {tuple(gt.shape)} "
                         "(both must be 3-D)")
    shape = tuple(int(s) for s in seg.shape)
    step = max(1, int(slab_voxels) // max(1, shape[1] * shape[2]))
    parts = [contingency(np.asarray(seg[z:z + step]), np.asarray(gt[z:z + step])) for z in range(0, shape[0], step)]
    if len(parts) == 1:
        return parts[0]
    s_ids = np.concatenate([p.seg_ids for p in parts])
    g_ids = np.concatenate([p.gt_ids for p in parts])
    counts = np.concatenate([p.counts for p in parts])
    order = np.lexsort((g_ids, s_ids))  # (seg, gt) in their own dtypes, signed ones included
    s_ids, g_ids, counts = s_ids[order], g_ids[order], counts[order]
    head = np.flatnonzero(np.r_[True, (s_ids[1:] != s_ids[:-1]) | (g_ids[1:] != g_ids[:-1])])
    return Contingency(s_ids[head], g_ids[head], np.add.reduceat(counts, head).astype(np.int64))


def check_nonnegative(table: Contingency, names: tuple[str, str] = ("seg", "gt")) -> None:
    """Refuses negative label ids in either volume of ``table`` (segmentations and ground truth
    hold unsigned ids, 0 = unlabelled): a one-line ``ValueError`` naming the volume
    (``names``: e.g. ``file.h5:dataset``) and its minimum id. Free: the ids are the table's."""
    for name, ids in zip(names, (table.seg_ids, table.gt_ids)):
        volumes.check_labels(ids, name)


def _table(seg: Any, gt: Any, table: Contingency | None, gt_zero: str) -> Contingency:
    _check_gt_zero(gt_zero)
    if table is None:
        table = contingency(seg, gt)
    table = table.select(gt_zero)
    if table.total == 0:
        raise ValueError("no voxels to evaluate: every gt voxel is 0 and gt_zero='ignore'")
    return table


def _pair_sizes(table: Contingency) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the size of its seg object and of its gt object (within the table)."""
    _, s_inv = np.unique(table.seg_ids, return_inverse=True)
    _, g_inv = np.unique(table.gt_ids, return_inverse=True)
    s_inv = s_inv.reshape(-1)
    g_inv = g_inv.reshape(-1)
    c = table.counts.astype(np.float64)
    seg_size = np.bincount(s_inv, weights=c)[s_inv]
    gt_size = np.bincount(g_inv, weights=c)[g_inv]
    return seg_size, gt_size


# --------------------------------------------------------------------------------------------
# metrics


def _vi_from_table(table: Contingency, base: float) -> dict[str, float]:
    n = float(table.total)
    c = table.counts.astype(np.float64)
    seg_size, gt_size = _pair_sizes(table)
    log_base = math.log(base)
    # H(seg | gt) = sum_ij p_ij log(p_gt_j / p_ij) = sum_ij (c_ij / n) log(gt_j / c_ij)
    split = float(np.sum(c * np.log(gt_size / c)) / n / log_base)
    merge = float(np.sum(c * np.log(seg_size / c)) / n / log_base)
    split = max(split, 0.0)  # rounding can give -0.0 / -1e-17 for perfect matches
    merge = max(merge, 0.0)
    return {"vi": split + merge, "vi_split": split, "vi_merge": merge}


def variation_of_information(
    seg: Any,
    gt: Any,
    *,
    gt_zero: str = "ignore",
    base: float = 2.0,
    table: Contingency | None = None,
) -> dict[str, float]:
    """Variation of information between a segmentation and the ground truth.

    Returns ``{"vi", "vi_split", "vi_merge"}`` where ``vi_split = H(seg | gt)`` (grows when a
    gt object is split across several seg objects) and ``vi_merge = H(gt | seg)`` (grows when
    a seg object merges several gt objects). Logarithm ``base`` 2 gives bits (scikit-image's
    unit); ``math.e`` gives nats. ``table`` may pass a precomputed :func:`contingency` of
    all voxels (``seg``/``gt`` are then ignored).
    """
    if base <= 0 or base == 1:
        raise ValueError(f"base must be positive and != 1, got {base}")
    return _vi_from_table(_table(seg, gt, table, gt_zero), base)


def _arand_from_table(table: Contingency, exclude_self_pairs: bool) -> dict[str, float]:
    c = table.counts.astype(np.float64)
    _, seg_sizes = table.seg_sizes()
    _, gt_sizes = table.gt_sizes()
    b = seg_sizes.astype(np.float64)
    a = gt_sizes.astype(np.float64)
    sum_p2 = float(c @ c)
    sum_a2 = float(a @ a)
    sum_b2 = float(b @ b)
    if exclude_self_pairs:
        n = float(c.sum())
        sum_p2 -= n
        sum_a2 -= n
        sum_b2 -= n
    # No pairs at all (only possible when excluding self pairs and every object has one
    # voxel): nothing can be wrong.
    precision = sum_p2 / sum_b2 if sum_b2 > 0 else 1.0
    recall = sum_p2 / sum_a2 if sum_a2 > 0 else 1.0
    denom = precision + recall
    f_score = 2.0 * precision * recall / denom if denom > 0 else 0.0
    return {"are": 1.0 - f_score, "precision": precision, "recall": recall}


def adapted_rand(
    seg: Any,
    gt: Any,
    *,
    gt_zero: str = "ignore",
    exclude_self_pairs: bool = False,
    table: Contingency | None = None,
) -> dict[str, float]:
    """Adapted Rand error (SNEMI3D/CREMI definition) with its precision and recall.

    ``precision = sum p_ij^2 / sum b_j^2`` over seg sizes ``b_j`` (1.0 unless seg objects merge
    several gt objects), ``recall = sum p_ij^2 / sum a_i^2`` over gt sizes ``a_i`` (1.0 unless
    gt objects are split) and ``are = 1 - 2PR / (P + R)``. ``exclude_self_pairs=True``
    counts pairs of distinct voxels, ``n (n - 1)``, as scikit-image does.
    """
    return _arand_from_table(_table(seg, gt, table, gt_zero), exclude_self_pairs)


# --------------------------------------------------------------------------------------------
# per-object split / merge lists


def _ranked_errors(
    owners: np.ndarray,
    parts: np.ndarray,
    counts: np.ndarray,
    skip_owner_zero: bool,
    top: int,
    voxels: int,
    base: float,
) -> list[tuple[int, int, int, list[tuple[int, int]], int, float]]:
    """Objects (``owners``) overlapping several ``parts``, ranked by voxels outside the
    dominant part. Returns ``(owner, voxels, wrong_voxels, [(part, voxels)...], n_parts,
    bits)``: ``bits`` is the owner's term of the conditional entropy H(parts | owners) over
    ``voxels`` scored voxels, sum_j (c_j / voxels) log(owner voxels / c_j) in log ``base``
    (owners = gt: its share of the VI split term; owners = seg: of the merge term)."""
    if top <= 0 or counts.size == 0:
        return []
    order = np.lexsort((-counts, owners))  # by owner, then counts descending
    owners, parts, counts = owners[order], parts[order], counts[order]
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    n_parts = np.diff(np.r_[starts, owners.size])
    totals = np.add.reduceat(counts, starts)
    c = counts.astype(np.float64)
    own = np.repeat(totals, n_parts).astype(np.float64)
    bits = np.add.reduceat(c * np.log(own / c), starts) / float(voxels) / math.log(base)
    dominant = counts[starts]
    wrong = totals - dominant
    cand = np.flatnonzero(n_parts > 1)
    if skip_owner_zero:
        cand = cand[owners[starts[cand]] != 0]
    if cand.size == 0:
        return []
    # rank: most wrong voxels first, ties by owner id ascending (owners are sorted)
    cand = cand[np.argsort(-wrong[cand], kind="stable")][:top]
    out = []
    for g in cand:
        s, k = int(starts[g]), int(n_parts[g])
        shown = min(k, top)
        plist = [(int(parts[s + i]), int(counts[s + i])) for i in range(shown)]
        out.append((int(owners[s]), int(totals[g]), int(wrong[g]), plist, k, float(bits[g])))
    return out


def _count_objects(ids: np.ndarray) -> int:
    u = np.unique(ids)
    return int(np.count_nonzero(u))


def evaluate(
    seg: Any,
    gt: Any,
    gt_zero: str = "ignore",
    top: int = 10,
    *,
    base: float = 2.0,
    table: Contingency | None = None,
    names: tuple[str, str] = ("seg", "gt"),
) -> dict[str, Any]:
    """All metrics of a segmentation against the ground truth, as a JSON-serialisable dict.

    Keys: ``vi``, ``vi_split``, ``vi_merge`` (in bits for ``base=2``), ``are``, ``precision``,
    ``recall``, ``gt_zero``, ``vi_base``, ``voxels`` (voxels scored), ``seg_objects`` and
    ``gt_objects`` (distinct nonzero ids over the whole volumes), ``false_merges`` and
    ``false_splits``: the ``top`` worst objects each.

    A false merge is a seg object (never id 0) overlapping several gt ids, ranked by the voxels
    of its non-dominant gt objects: ``{"seg_id", "voxels", "absorbed_voxels", "n_gt",
    "gt": [[gt_id, voxels], ...], "vi_merge"}`` (the ``top`` largest overlaps; ``vi_merge``:
    the object's share of the merge term, in the unit of ``base``). A false split is a gt
    object (never id 0) spread over several seg ids (0 included), ranked by the voxels outside
    its dominant seg id: ``{"gt_id", "voxels", "split_voxels", "n_seg", "seg": [[seg_id,
    voxels], ...], "vi_split"}`` (its share of the split term). The shares of all ids (0
    included, which is never listed) sum to ``vi_merge`` and ``vi_split``: they say which
    objects carry the VI. Both lists respect ``gt_zero``. ``table``: the :func:`contingency` of
    ``seg`` and ``gt`` when already computed (e.g. by :func:`contingency_volumes` for volumes
    larger than memory; ``seg`` and ``gt`` are then not read). Negative label ids are refused
    (``ValueError`` naming the volume by ``names`` and its minimum id).
    """
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    _check_gt_zero(gt_zero)
    full = table if table is not None else contingency(seg, gt)
    check_nonnegative(full, names)
    table = _table(None, None, full, gt_zero)
    result: dict[str, Any] = {}
    result.update(_vi_from_table(table, base))
    result.update(_arand_from_table(table, exclude_self_pairs=False))
    result["gt_zero"] = gt_zero
    result["vi_base"] = float(base)
    result["voxels"] = table.total
    result["seg_objects"] = _count_objects(full.seg_ids)
    result["gt_objects"] = _count_objects(full.gt_ids)

    merges = _ranked_errors(table.seg_ids, table.gt_ids, table.counts, True, top, table.total, base)
    result["false_merges"] = [
        {"seg_id": o, "voxels": v, "absorbed_voxels": w, "n_gt": k, "gt": [list(p) for p in pl], "vi_merge": b}
        for o, v, w, pl, k, b in merges
    ]
    splits = _ranked_errors(table.gt_ids, table.seg_ids, table.counts, True, top, table.total, base)
    result["false_splits"] = [
        {"gt_id": o, "voxels": v, "split_voxels": w, "n_seg": k, "seg": [list(p) for p in pl], "vi_split": b}
        for o, v, w, pl, k, b in splits
    ]
    logger.debug(
        "evaluated %d voxels: VI %.4f (split %.4f, merge %.4f), ARE %.4f",
        result["voxels"], result["vi"], result["vi_split"], result["vi_merge"], result["are"],
    )
    return result


def _parts_text(parts: list, n: int, name: str, limit: int = 5) -> str:
    shown = ", ".join(f"{name} {pid}: {cnt:,}" for pid, cnt in parts[:limit])
    if n > min(len(parts), limit):
        shown += f", ... ({n} {name} ids in all)"
    return shown


def format_report(result: dict[str, Any]) -> str:
    """A readable multi-line text report of an :func:`evaluate` result."""
    unit = "bits" if result.get("vi_base", 2.0) == 2.0 else f"log base {result['vi_base']:g}"
    lines = [
        f"Segmentation evaluation ({result['voxels']:,} voxels scored, "
        f"gt label 0: {result['gt_zero']})",
        f"  objects: seg {result['seg_objects']:,}, gt {result['gt_objects']:,}",
        f"  variation of information: {result['vi']:.4f} {unit}",
        f"    split  H(seg|gt): {result['vi_split']:.4f}   (over-segmentation)",
        f"    merge  H(gt|seg): {result['vi_merge']:.4f}   (under-segmentation)",
        f"  adapted Rand error: {result['are']:.4f}",
        f"    precision: {result['precision']:.4f}   (merges lower it)",
        f"    recall:    {result['recall']:.4f}   (splits lower it)",
    ]
    merges = result.get("false_merges", [])
    lines.append(f"  largest false merges ({len(merges)} shown):")
    if not merges:
        lines.append("    none")
    for m in merges:
        lines.append(
            f"    seg {m['seg_id']}: {m['voxels']:,} voxels, absorbs {m['absorbed_voxels']:,} "
            f"from non-dominant gt [{_parts_text(m['gt'], m['n_gt'], 'gt')}], merge term {m['vi_merge']:.4f}"
        )
    splits = result.get("false_splits", [])
    lines.append(f"  largest false splits ({len(splits)} shown):")
    if not splits:
        lines.append("    none")
    for s in splits:
        lines.append(
            f"    gt {s['gt_id']}: {s['voxels']:,} voxels, {s['split_voxels']:,} outside the "
            f"dominant seg [{_parts_text(s['seg'], s['n_seg'], 'seg')}], split term {s['vi_split']:.4f}"
        )
    return "\n".join(lines)
