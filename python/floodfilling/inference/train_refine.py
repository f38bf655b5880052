"""Training the learned refinement's merge classifier (``ffn train-refine``).

For each labelled volume: the flood of the FFN model in use, the base segmentation of the
refine model (:data:`floodfilling.inference.learned.BASES`), its contact graph, and a label per
pair of touching objects: *merge* when both objects' majority body (the ground-truth id that
holds most of its voxels, gt 0 left out: 0 is boundary or unlabelled) is the same; pairs with an
object that holds no labelled voxel are left out. Training is two rounds, as gala does: a
classifier on the base's pairs, then the merges the labels allow walked in that classifier's
order (``gate`` of :func:`~floodfilling.inference.agglomeration.agglomerate`; threshold 0), the
pairs scored along the way (objects grown by earlier merges, as the refinement will see them)
added to the examples, and a second classifier on all of them. LightGBM on one thread with
fixed options (:data:`~floodfilling.inference.learned.LGBM_PARAMS`): the same inputs give the
same model file, byte for byte.

Before the pairs, a boundary map (:mod:`floodfilling.inference.boundary`) is fitted on all the
volumes' voxels; the model file carries it and the base's watershed runs on it. Each training
volume's own base is made with a map that never saw its labels (the other volumes' classifier,
or with one volume, each half's from the other half: :func:`~.boundary.held_out_maps`), so the
pairs are those a new volume will show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import RefineConfig
from .agglomeration import agglomerate
from .contacts import FEATURES, contact_graph
from .learned import BASE_OPTIONS, LGBM_PARAMS, ROUNDS, RefineModel, base_segmentation, import_lightgbm

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # merge probability a pair needs (the classifier's own calibration)
# the base's gap cores of a learned model unless the [refine] options say otherwise: finer than the hand
# step's (3 / 100), since the classifier, not the network, decides what each core's object is
LEARNED_BASE = {"gap_core_radius": 2.0, "gap_min_core": 30}


@dataclass
class TrainUnit:
    """One labelled volume: the normalised image, the flood, the labels, the flood's overlaps."""

    name: str
    image: np.ndarray  # float32, normalised as for the flood
    flood: np.ndarray  # the flood's segmentation
    labels: np.ndarray  # ground truth, 0 = boundary / unlabelled
    overlaps: dict | None = None
    record: dict[str, Any] = field(default_factory=dict)  # what the model file records of it
    painted: tuple | None = None  # base "gap_cores": learned.paint_gap_objects of the flood


@dataclass
class Examples:
    """Features, labels (1: merge) and where each example came from (unit index)."""

    x: np.ndarray
    y: np.ndarray
    unit: np.ndarray

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        if not parts:
            return Examples(np.zeros((0, len(FEATURES))), np.zeros(0, np.int8), np.zeros(0, np.int64))
        return Examples(*(np.concatenate([getattr(p, n) for p in parts]) for n in ("x", "y", "unit")))


def body_counts(seg: np.ndarray, labels: np.ndarray) -> dict[int, dict[int, int]]:
    """Per object of ``seg`` (> 0): its labelled voxels per gt body (gt 0 left out)."""
    s, g = np.asarray(seg).ravel().astype(np.int64), np.asarray(labels).ravel().astype(np.int64)
    m = (s > 0) & (g > 0)
    pairs, counts = np.unique(np.stack([s[m], g[m]]), axis=1, return_counts=True)
    out: dict[int, dict[int, int]] = {}
    for (a, b), c in zip(pairs.T, counts):
        out.setdefault(int(a), {})[int(b)] = int(c)
    return out


def majority(counts: dict[int, int] | None) -> int:
    """The body holding most voxels (ties: the lowest id); 0 when none."""
    if not counts:
        return 0
    best = max(counts.values())
    return min(b for b, c in counts.items() if c == best)


def unit_examples(unit: TrainUnit, index: int, made: tuple,
                  scorer: Callable[[np.ndarray], np.ndarray] | None = None) -> Examples:
    """The examples of one unit from its (base, contact graph) ``made`` (:func:`unit_base`): the
    base's pairs (``scorer`` None), or the pairs scored while the merges the labels allow are
    walked in ``scorer``'s order."""
    b, graph = made
    counts = body_counts(b.segmentation, unit.labels)
    xs, ys = [], []

    def label(pairs: np.ndarray) -> np.ndarray:
        ma = np.asarray([majority(counts.get(int(a))) for a in pairs[:, 0]])
        mb = np.asarray([majority(counts.get(int(c))) for c in pairs[:, 1]])
        return np.where((ma == 0) | (mb == 0), -1, (ma == mb).astype(np.int64))

    def seen(pairs: np.ndarray, x: np.ndarray) -> None:
        y = label(pairs)
        keep = y >= 0
        xs.append(x[keep])
        ys.append(y[keep])

    if scorer is None:
        from .contacts import features

        idx = graph.node_index()
        ia = [idx[int(a)] for a in graph.pairs[:, 0]]
        ib = [idx[int(c)] for c in graph.pairs[:, 1]]
        seen(graph.pairs, features(graph.edge_stats, graph.node_stats[ia], graph.node_stats[ib]))
    else:
        def gate(a: int, c: int) -> bool:
            ma, mb = majority(counts.get(a)), majority(counts.get(c))
            return ma > 0 and ma == mb

        def merged(a: int, c: int) -> None:
            into = counts.setdefault(a, {})
            for k, v in counts.pop(c, {}).items():
                into[k] = into.get(k, 0) + v

        agglomerate(graph, scorer, 0.0, gate=gate, on_score=seen, on_merge=merged)
    x = np.concatenate(xs) if xs else np.zeros((0, len(FEATURES)))
    y = np.concatenate(ys).astype(np.int8) if ys else np.zeros(0, np.int8)
    return Examples(x, y, np.full(len(y), index, np.int64))


def unit_base(unit: TrainUnit, base: str, cfg: RefineConfig, boundary=None) -> tuple:
    """(the base, its contact graph) of one unit: made once, read by both training rounds (the
    merges copy the graph's statistics, never change them). ``boundary``: the map the base's
    watershed runs on (a :class:`~floodfilling.inference.boundary.HeldOutMap`; None: the image)."""
    from .refine import membranes_low

    b = base_segmentation(unit.image, unit.flood, base, cfg, unit.painted[:2] if unit.painted is not None else None,
                          boundary)
    return b, contact_graph(b.segmentation, membranes_low(unit.image, cfg, 0.0), unit.overlaps, flooded=b.flooded)


def fit(ex: Examples, rounds: int = ROUNDS) -> str:
    """LightGBM's text model of a classifier fitted on ``ex`` (deterministic)."""
    lgb = import_lightgbm()
    if len(ex.y) == 0 or len(np.unique(ex.y)) < 2:
        raise ValueError(f"training needs pairs of both kinds (merge and not): got {int(ex.y.sum())} merge and "
                         f"{int(len(ex.y) - ex.y.sum())} other pairs; label more objects")
    data = lgb.Dataset(ex.x, label=ex.y.astype(np.float64), feature_name=list(FEATURES),
                       params={"verbose": -1, "min_data_in_bin": 1, "max_bin": 63}, free_raw_data=False)
    booster = lgb.train(dict(LGBM_PARAMS), data, num_boost_round=rounds)
    return booster.model_to_string()


def train_model(units: list[TrainUnit], base: str = "cores", cfg: RefineConfig | None = None,
                threshold: float = DEFAULT_THRESHOLD, rounds: int = ROUNDS, sequence: bool = True,
                progress: Callable[[str], None] | None = None, settings: dict | None = None,
                boundary: bool = True) -> RefineModel:
    """A :class:`RefineModel` trained on ``units`` (see the module docstring; ``sequence``
    False: the first round only; ``boundary`` False: no boundary map, the base's watershed runs
    on the image)."""
    from . import boundary as bmap

    cfg = (cfg or RefineConfig()).validate()
    say = progress or (lambda s: None)
    held: list = [None] * len(units)
    boundary_text = ""
    if boundary:
        say("boundary map, and the held-out maps of the training volumes")
        boundary_text, held = bmap.train_boundary([(u.image, u.labels) for u in units])
    flat, made = [], []
    for i, u in enumerate(units):
        say(f"pairs of {u.name}")
        made.append(unit_base(u, base, cfg, held[i]))
        flat.append(unit_examples(u, i, made[i]))
    ex = Examples.concat(flat)
    say(f"fitting on {len(ex.y)} pairs ({int(ex.y.sum())} merge)")
    text = fit(ex, rounds)
    if sequence:
        first = RefineModel(text, base, threshold)
        seq = []
        for i, u in enumerate(units):
            say(f"merge sequence of {u.name}")
            seq.append(unit_examples(u, i, made[i], first.predict))
        ex = Examples.concat([ex] + seq)
        say(f"fitting on {len(ex.y)} pairs ({int(ex.y.sum())} merge)")
        text = fit(ex, rounds)
    training = {"volumes": [u.record or {"name": u.name} for u in units], "base": base, "rounds": rounds,
                "sequence": sequence, "examples": int(len(ex.y)), "merge_examples": int(ex.y.sum()),
                "lightgbm": dict(LGBM_PARAMS), "refine": {k: v for k, v in cfg.to_dict().items()
                                                          if k in BASE_OPTIONS},
                "boundary": ({"filters": list(bmap.FILTERS), "samples_per_volume": bmap.SAMPLES,
                              "rounds": bmap.ROUNDS, "lightgbm": dict(bmap.PARAMS)} if boundary else None),
                **(settings or {})}
    return RefineModel(text, base, float(threshold), FEATURES, training, "", boundary_text)


# -- ffn train-refine ----------------------------------------------------------------------------

class TrainRefineError(ValueError):
    """Bad input to ``ffn train-refine`` (message names the file or parameter)."""


def read_unit(image_spec: str, labels_spec: str, flood_model, flood_cfg, progress: bool = False,
              base: str = "cores", refine: RefineConfig | None = None) -> TrainUnit:
    """A :class:`TrainUnit` of one labelled volume: its image and labels read and checked, the
    flood of ``flood_model`` = (net, info) with ``flood_cfg`` (normalised as ``ffn segment``
    normalises it); base "gap_cores": the gap objects painted in with ``refine``'s options."""
    from .. import volumes
    from ..results import file_digest, image_digest
    from ..normalise import resolve_normalisation
    from .segment import segment_array

    net, info = flood_model
    with volumes.open_volume(image_spec) as img, volumes.open_volume(labels_spec) as lab:
        if tuple(img.shape) != tuple(lab.shape):
            raise TrainRefineError(f"{labels_spec}: labels of shape {tuple(lab.shape)} do not match the image "
                                   f"{image_spec} of shape {tuple(img.shape)}")
        if lab.dtype.kind not in "iu":
            raise TrainRefineError(f"{labels_spec}: dtype {lab.dtype} is not a label (integer) type")
        raw, labels = img.read(), lab.read()
    volumes.check_labels(labels, labels_spec, error=TrainRefineError)
    norm = resolve_normalisation(flood_cfg, info, raw, image_spec)
    flood = segment_array(raw, config=flood_cfg, net_and_info=(net, info), normalisation=norm,
                          source=image_spec, progress=progress)
    record = {"image": image_spec, "labels": labels_spec, "shape": list(raw.shape), "image_digest": image_digest(raw),
              "labels_digest": image_digest(labels), "labelled_fraction": round(float(np.mean(labels > 0)), 4),
              "flood_objects": int(len(flood.origins)), "flood_model": str(info.source),
              "flood_model_digest": file_digest(info.source)}
    image = norm.apply(raw, image_spec)
    painted = None
    if base == "gap_cores":
        from .learned import paint_gap_objects
        from .refine import FloodNetwork

        painted = paint_gap_objects(image, flood.segmentation, refine or RefineConfig(),
                                    FloodNetwork(net, info, flood_cfg),
                                    flood.overlaps)
    return TrainUnit(image_spec, image, flood.segmentation, labels, flood.overlaps, record, painted)


def train_refine(pairs: list[tuple[str, str]], out: str, *, model: str | None = None, config=None,
                 refine: RefineConfig | None = None, base: str = "cores", threshold: float = DEFAULT_THRESHOLD,
                 overwrite: bool = False, progress: bool = False,
                 report: Callable[[str], None] | None = None, boundary: bool = True) -> RefineModel:
    """``ffn train-refine``: the flood of ``model`` (default: bundled) on each (image, labels)
    of ``pairs``, the features of their base segmentations, the classifier; written to ``out``
    (a new file unless ``overwrite``; never one of the inputs). ``refine``: the base's options
    (default: :data:`LEARNED_BASE`); ``boundary`` False: no boundary map (the base's watershed
    runs on the image). ``progress``: the floods' progress
    bars; ``report(text)``: each phase as it starts."""
    import os

    from ..config import InferenceConfig
    from ..model import load_model
    from ..outputs import same_path
    from .learned import BASES, import_lightgbm, save_refine_model

    if not pairs:
        raise TrainRefineError("train-refine needs at least one IMAGE LABELS pair")
    if base not in BASES:
        raise TrainRefineError(f"base={base!r}: expected one of {', '.join(BASES)}")
    if not 0 <= threshold <= 1:
        raise TrainRefineError(f"threshold={threshold}: expected a probability in [0, 1]")
    if os.path.exists(out) and not overwrite:
        raise TrainRefineError(f"{out} exists: give overwrite=True to replace it")
    if os.path.isdir(out):
        raise TrainRefineError(f"{out} is a directory: give a file name for the refine model")
    from .. import volumes

    for spec in (s for p in pairs for s in p):
        if same_path(volumes.parse_volume_spec(spec).path, out):
            raise TrainRefineError(f"{out} is an input ({spec}): the refine model goes to another file")
    import_lightgbm()  # before any flood
    try:
        import skimage.segmentation  # noqa: F401
    except ImportError:
        raise TrainRefineError("train-refine needs scikit-image: pip install 'floodfilling[refine]'") from None
    cfg = (config or InferenceConfig()).validate()
    refine = (refine or RefineConfig(**LEARNED_BASE)).validate()
    net, info = load_model(model, "cpu")

    def say(text: str) -> None:
        log.info("train-refine: %s", text)
        if report is not None:
            report(text)

    units = []
    for k, (image_spec, labels_spec) in enumerate(pairs):
        say(f"flood of {image_spec} ({k + 1} of {len(pairs)})")
        units.append(read_unit(image_spec, labels_spec, (net, info), cfg, progress, base, refine))
    m = train_model(units, base, refine, threshold, progress=say,
                    settings={"flood_config": cfg.options_of("flood", "postprocess")}, boundary=boundary)
    save_refine_model(m, out, overwrite=overwrite)
    m.source = str(out)
    return m
