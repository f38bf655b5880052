"""Agglomeration by FFN resegmentation (``ffn agglomerate IMAGE SEG OUT``).

After a split consensus (or any oversegmentation) two touching objects may be pieces of one
neuron. As in the reference's resegmentation, the network itself decides: for each candidate
pair it floods once from inside each object, in a small box around their contact, on a fresh
canvas; if the two floods find the same shape, the pieces are one object.

1. **Candidates**: pairs of objects ``(a, b)`` with at least ``min_contact`` face-adjacent
   voxel pairs (6-connectivity). With ``within`` (e.g. the forward run that the consensus
   split), only pairs whose objects lie mostly in the same object of that segmentation: the
   splits the consensus made are re-examined, nothing else.
2. **Box**: ``box`` voxels (z, y, x) centred on the contact voxel nearest the contact's
   centroid, moved inside the volume.
3. **Seeds**: in the box, the voxel of ``a`` farthest from any other label (the maximum of
   the distance transform of ``seg == a``; ties: raster order), and the same for ``b``.
4. **Floods**: one object from each seed with the inference options (``min_segment_size``
   0: the flood is kept whatever its size), through the multi-subvolume engine (on a GPU the
   floods of ``inflight`` boxes share each network call).
5. **Decision**: merge when the two floods' masks have an IoU >= ``merge_iou``.
   Merges are closed transitively (union-find); each group takes its smallest id.

The output is ``seg`` relabelled, with ``<ds>_origins`` (``seg``'s, for the ids kept) and
``<ds>_agglomeration``: one row per candidate (a, b, contact voxels, IoU, merged).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import boxes, kernels, locks, outputs, results, volumes
from .config import InferenceConfig

log = logging.getLogger(__name__)

CANDIDATE_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8"), ("contact", "<i8"), ("iou", "<f8"), ("merged", "u1")])


class AgglomerationError(ValueError):
    """Bad input to the agglomeration (one-line message naming the culprit)."""


@dataclass
class AgglomerationOptions:
    box: tuple[int, int, int] = (49, 49, 49)  # subvolume (z, y, x) around each contact, >= the FOV
    min_contact: int = 10  # face-adjacent voxel pairs that make two objects a candidate
    merge_iou: float = 0.5  # merge when the two floods' masks have at least this IoU
    within: str | None = None  # only pairs inside one object of this segmentation (e.g. the forward run)


def contacts(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face contacts between different nonzero labels: ``(pairs (M, 2) uint64 with a < b,
    counts (M,), point (M, 3))`` where ``point`` is, for each pair, the voxel on the ``a``
    side of a contact nearest the contacts' centroid (ties: the first in (axis, raster) order)."""
    keys_l, pos_l = [], []
    s = seg.astype(np.uint64, copy=False)
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        u, v = s[tuple(lo)], s[tuple(hi)]
        m = (u != v) & (u > 0) & (v > 0)
        idx = np.flatnonzero(m)
        if not idx.size:
            continue
        uu, vv = u.reshape(-1)[idx], v.reshape(-1)[idx]
        a, b = np.minimum(uu, vv), np.maximum(uu, vv)
        p = np.stack(np.unravel_index(idx, u.shape), axis=1)
        other = p.copy()
        other[:, axis] += 1
        pos_l.append(np.where((uu == a)[:, None], p, other))  # the voxel that carries label a
        keys_l.append(np.stack([a, b], axis=1))
    if not keys_l:
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    keys, pos = np.concatenate(keys_l), np.concatenate(pos_l).astype(np.int64)
    pairs, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    centroid = np.stack([np.bincount(inv, weights=pos[:, d], minlength=len(pairs)) for d in range(3)], 1)
    centroid /= counts[:, None]
    d2 = ((pos - centroid[inv]) ** 2).sum(1)
    order = np.lexsort((np.arange(len(inv)), d2, inv))
    first = order[np.r_[True, inv[order][1:] != inv[order][:-1]]]
    return pairs, counts.astype(np.int64), pos[first]


def dominant(seg: np.ndarray, other: np.ndarray) -> dict[int, int]:
    """For each nonzero id of ``seg``, the nonzero id of ``other`` it overlaps most (0: none)."""
    from .consensus import largest_overlaps

    p, c = kernels.count_pairs(seg.astype(np.uint64, copy=False), other.astype(np.uint64, copy=False),
                               ignore_zero=True)
    return {int(p[i, 0]): int(p[i, 1]) for i in largest_overlaps(p, c)}


def place_box(centre, box, shape) -> boxes.BBox:
    start = [min(max(int(c) - b // 2, 0), max(s - b, 0)) for c, b, s in zip(centre, box, shape)]
    return boxes.BBox(tuple(start), tuple(min(a + b, s) for a, b, s in zip(start, box, shape)))


def interior_point(mask: np.ndarray, margin=(0, 0, 0)):
    """The voxel of ``mask`` at least ``margin`` from the box's faces (room for a FOV) that is
    farthest from the mask's outside; ties go to the one nearest the box's centre, then to
    raster order (a seed in a corner of the box could not move: the face argmaxes of a flat
    region lie at the FOV's corners). None when there is no such voxel."""
    inner = tuple(slice(m, s - m) for m, s in zip(margin, mask.shape))
    if not mask[inner].any():
        return None
    dt = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1][inner]
    grid = np.indices(dt.shape).reshape(3, -1).T + np.asarray(margin)
    centre = (np.asarray(mask.shape) - 1) / 2.0
    d2 = ((grid - centre) ** 2).sum(1)
    best = np.lexsort((np.arange(dt.size), d2, -dt.ravel()))[0]
    return tuple(int(v) for v in grid[best])


def check_options(opts: AgglomerationOptions) -> AgglomerationOptions:
    """``opts`` checked, its box as 3 integers (:class:`~floodfilling.boxes.ParameterError`
    naming the option otherwise)."""
    box = boxes.check_zyx(opts.box, "box", 1)
    if not 0 < opts.merge_iou <= 1:
        raise boxes.ParameterError("merge_iou", opts.merge_iou, f"merge_iou={opts.merge_iou}: must be in (0, 1]")
    if opts.min_contact < 1:
        raise boxes.ParameterError("min_contact", opts.min_contact, f"min_contact={opts.min_contact}: must be >= 1")
    return dataclasses.replace(opts, box=box)


def agglomerate_array(image: np.ndarray, seg: np.ndarray, net, info, config: InferenceConfig,
                      opts: AgglomerationOptions, within: np.ndarray | None = None, inflight: int | None = None):
    """``image``: normalised float32; ``seg``: the oversegmentation. Returns ``(new seg,
    candidates table)`` (see the module docstring)."""
    from .geometry import fov_margin, smaller_than_fov
    from .inference.engine import Job, inflight_on, make_predictor, run_jobs, subvolume_canvas
    from .model import select_device

    opts, fov = check_options(opts), tuple(int(f) for f in info.fov_zyx)
    box = opts.box
    if any(b < f for b, f in zip(box, fov)):
        raise boxes.ParameterError("box", box, f"box={','.join(map(str, box))}: must be at least the model's FOV "
                                     f"{fov}")
    if smaller_than_fov(seg.shape, fov):
        raise AgglomerationError(f"the volume {seg.shape} is smaller than the model's FOV {fov}")
    pairs, counts, points = contacts(seg)
    keep = counts >= opts.min_contact
    if within is not None:
        dom = dominant(seg, within)
        if len(pairs):
            keep &= np.array([dom.get(int(a), 0) == dom.get(int(b), 0) != 0 for a, b in pairs], bool)
    pairs, counts, points = pairs[keep], counts[keep], points[keep]
    table = np.zeros(len(pairs), CANDIDATE_DTYPE)
    table["a"], table["b"], table["contact"] = pairs[:, 0], pairs[:, 1], counts
    cfg = config.with_overrides(min_segment_size=0, seed_fill_passes=0).validate()
    margin = fov_margin(fov)
    masks: dict[tuple[int, int], np.ndarray] = {}
    jobs = []
    for i, (ab, pt) in enumerate(zip(pairs, points)):
        bb = place_box(pt, box, seg.shape)
        sub = seg[bb.slices]
        for side in (0, 1):
            p = interior_point(sub == ab[side], margin)
            if p is None:  # no voxel with room for a FOV around it: an empty flood
                masks[(i, side)] = np.zeros(sub.shape, bool)
                continue
            jobs.append(Job((i, side), (lambda bb=bb, p=p: subvolume_canvas(predictor, image[bb.slices], cfg, info,
                                                                            seeds=np.asarray([p], np.int64)))))
    dev = select_device(cfg.device)
    k = inflight_on(dev, inflight)
    predictor = make_predictor(net, fov, info.deltas_zyx, cfg, device=dev, threads=cfg.threads, inflight=k)

    def on_done(key, cv) -> None:
        masks[key] = cv.final_segmentation() > 0

    run_jobs(jobs, predictor, inflight=k, on_done=on_done)
    merge = []
    for i in range(len(pairs)):
        ma, mb = masks[(i, 0)], masks[(i, 1)]
        union = np.count_nonzero(ma | mb)
        iou = np.count_nonzero(ma & mb) / union if union else 0.0
        table["iou"][i] = iou
        if iou >= opts.merge_iou:
            table["merged"][i] = 1
            merge.append(pairs[i])
    out = np.ascontiguousarray(seg).copy()
    if merge:
        ids, roots = kernels.union_find(np.asarray(merge, np.uint64))
        lab = out if out.dtype in (np.uint32, np.uint64) else out.astype(np.uint64)
        kernels.relabel(lab, ids.astype(np.uint64), roots.astype(np.uint64))
        out = lab.astype(seg.dtype, copy=False)
    log.info("agglomerate: %d candidate pairs, %d merged", len(pairs), len(merge))
    return out, table


def agglomerate(image_spec: str, seg_spec: str, out_spec: str, *, model: str | None = None,
                config: InferenceConfig | None = None, opts: AgglomerationOptions | None = None,
                overwrite: bool = False, inflight: int | None = None) -> np.ndarray:
    """Reads the image and segmentation, agglomerates, writes ``out_spec`` atomically; returns
    the candidates table."""
    from .inference.engine import check_inflight

    cfg = (config or InferenceConfig()).validate()
    opts = check_options(opts or AgglomerationOptions())
    check_inflight(inflight)
    out = volumes.parse_volume_spec(out_spec)
    names = [str(out.dataset), f"{out.dataset}_agglomeration", f"{out.dataset}_origins"]
    out = outputs.check_output(out, overwrite, names=names, inputs=[image_spec, seg_spec, opts.within])  # before the floods
    with locks.output_lock(out, names):
        return _agglomerate_locked(image_spec, seg_spec, out, model, cfg, opts, overwrite, inflight)


def _agglomerate_locked(image_spec, seg_spec, out, model, cfg, opts, overwrite, inflight) -> np.ndarray:
    from .normalise import resolve_normalisation
    from .model import load_model

    net, info = load_model(model, "cpu")
    with volumes.open_volume(image_spec) as vi, volumes.open_volume(seg_spec) as vs:
        if tuple(vi.shape) != tuple(vs.shape):
            raise AgglomerationError(f"{seg_spec}: shape {tuple(vs.shape)} does not match the image {image_spec}'s "
                                     f"{tuple(vi.shape)}")
        raw, seg = vi.read(), vs.read()
        volumes.check_labels(seg, seg_spec, error=AgglomerationError)
        norm = resolve_normalisation(cfg, info, raw, image_spec)
        source_attrs = dict(vs.attrs)
    within = None
    if opts.within:
        with volumes.open_volume(opts.within) as vw:
            if tuple(vw.shape) != seg.shape:
                raise AgglomerationError(f"within={opts.within}: shape {tuple(vw.shape)} does not match {seg.shape}")
            within = vw.read()
            volumes.check_labels(within, f"within={opts.within}", error=AgglomerationError)
    image = norm.apply(raw, image_spec)
    new, table = agglomerate_array(image, seg, net, info, cfg, opts, within, inflight)
    ds = out.dataset
    origins = results.read_origins(seg_spec)
    if origins is not None:
        origins = origins[np.isin(origins["id"], np.unique(new))]
    attrs = results.derived_attrs(source_attrs, agglomerated_from=seg_spec, box_zyx=list(opts.box),
                                  min_contact=int(opts.min_contact), merge_iou=float(opts.merge_iou),
                                  within=opts.within or "", model=info.source)
    results.write_result(out.path, ds, new, origins, attrs, overwrite, extra={f"{ds}_agglomeration": table})
    return table
