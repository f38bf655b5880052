"""The learned refinement (``ffn segment --refine --refine-model M``, ``ffn train-refine``).

A classifier (gradient-boosted trees: trained by LightGBM, extra ``refine``; evaluated with NumPy by
:mod:`floodfilling.inference.trees`, bit for bit LightGBM's figures) decides whether two touching
objects belong to one neuron, from the features of their contact
(:mod:`floodfilling.inference.contacts`); objects merge in order of its confidence
(:mod:`floodfilling.inference.agglomeration`), the merged object's pairs scored again after
each merge. It works on a *base* segmentation made from the flood (recorded in the model file,
:data:`BASES`):

- ``"watershed"``: the plain seeded watershed of the normalised image from the flood's objects
  (the floor every refinement must beat);
- ``"cores"``: the same watershed from the flood's objects *and every gap core* (the cores of
  cells in the space the flood left, :func:`floodfilling.inference.refine.gap_cores`, each its
  own marker, no network flood). The classifier then decides for each core's object whether it
  is a piece of an object it touches or its own neuron: the gap-object decision, learned;
- ``"gap_cores"``: the hand step's gap objects first (each core's own network flood, joined or
  kept by ``gap_join_fraction``, :mod:`floodfilling.inference.refine`), then every gap core left
  in the space still free as its own marker, then the watershed.

The base's watershed runs on the model's *boundary map* when it has one (format version 2,
``ffn train-refine``'s default: :mod:`floodfilling.inference.boundary`, a voxel classifier
trained on the same labels), else on the image, membranes low (version 1 files, and
``--no-boundary-map``).

Tile by tile (``refine.tile``, as the hand steps; 0,0,0, the default: one tile, the whole
volume): each tile's gap cores are found in its core (numbered after the flood's ids in tile
order, then in the tile's core order), the base is the watershed of each tile's window from the
markers and every core reaching it, and the contact statistics are each tile's share (its
core's voxels, the faces whose lower voxel is in its core) summed in tile order; the merges are
decided on the whole graph. Block inference (:mod:`floodfilling.distributed.learned`) computes
the same per block, so it gives the in-memory result with ``tile`` = the block size.

The model file is JSON (never a pickle): format name and version, the feature names, the base,
the merge threshold, LightGBM's own text model, the boundary map's (or null), and what it was
trained on (volumes, options).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..config import RefineConfig
from ..results import Origin
from .agglomeration import Agglomeration, agglomerate, apply_lut
from .contacts import FEATURES, contact_graph
from .trees import TreeModelError, parse_lightgbm

log = logging.getLogger(__name__)

FORMAT = "floodfilling-refine-model"
FORMAT_VERSION = 2  # 2: the boundary map (version 1 files, without it, are read too)
READS_VERSIONS = (1, 2)
BASES = ("watershed", "cores", "gap_cores")  # what the learned merging starts from (module docstring)

# the [refine] options that make the base (recorded in the model file, used in its place)
BASE_OPTIONS = ("membranes", "interior_sigma", "interior_threshold", "gap_core_radius", "gap_min_core",
                "watershed_sigma")
# LightGBM options of every training: small trees, one thread, deterministic (same file twice)
LGBM_PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 10,
               "feature_fraction": 1.0, "bagging_fraction": 1.0, "lambda_l2": 1.0, "num_threads": 1,
               "deterministic": True, "force_row_wise": True, "seed": 0, "verbose": -1}
ROUNDS = 200  # boosting rounds


class RefineModelError(ValueError):
    """A refine model file that cannot be used (message names the file and what is wrong)."""


def import_lightgbm():
    try:
        import lightgbm
    except ImportError:
        raise RefineModelError("the learned refinement needs LightGBM: pip install 'floodfilling[refine]'") from None
    return lightgbm


@dataclass
class RefineModel:
    """A trained merge classifier and what it needs to be used and reproduced."""

    booster: str  # LightGBM's text model
    base: str  # of BASES
    threshold: float  # pairs merge while their probability is at least this
    features: tuple[str, ...] = FEATURES
    training: dict[str, Any] = field(default_factory=dict)  # volumes (files, digests, shapes), options
    source: str = ""  # the file it was read from ("" when made in memory)
    boundary: str = ""  # LightGBM text model of the boundary map the base's watershed runs on ("": the image)
    _trees: Any = field(default=None, repr=False, compare=False)
    _boundary: Any = field(default=None, repr=False, compare=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Merge probabilities of the pairs with features ``x`` (k, len(FEATURES)): LightGBM's
        own figures, evaluated with NumPy (:mod:`.trees`; LightGBM is needed to train only)."""
        if self._trees is None:
            self._trees = parse_lightgbm(self.booster, len(self.features))
        if len(x) == 0:
            return np.zeros(0)
        return self._trees.predict(x)

    def boundary_map(self):
        """The :class:`~floodfilling.inference.boundary.BoundaryMap` the base's watershed runs
        on, or None (the model was trained without one: the watershed runs on the image)."""
        if not self.boundary:
            return None
        if self._boundary is None:
            from .boundary import BoundaryMap

            self._boundary = BoundaryMap(self.boundary)
        return self._boundary

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "features": list(self.features),
                           "base": self.base, "threshold": self.threshold, "training": self.training,
                           "lightgbm": self.booster, "boundary": self.boundary or None},
                          indent=1, sort_keys=True) + "\n"

    def base_config(self, cfg: RefineConfig) -> RefineConfig:
        """``cfg`` with the base's options (cores, watershed) the model was trained with: a model
        decides on the objects it learned from."""
        given = {k: v for k, v in (self.training.get("refine") or {}).items() if k in BASE_OPTIONS}
        return RefineConfig.from_dict({**cfg.to_dict(), **given}, f"{self.source or 'refine model'} training.refine")

    def describe(self) -> dict[str, Any]:
        """What a result's attributes record of the model: its file, base, threshold, training."""
        return {"file": self.source, "base": self.base, "threshold": self.threshold, "training": self.training}


def model_from_json(text: str, source: str) -> RefineModel:
    """A :class:`RefineModel` from a model file's text; :class:`RefineModelError` naming
    ``source`` when it is not one this version can use."""
    try:
        d = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RefineModelError(f"{source}: not a refine model file (not JSON: {exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise RefineModelError(f"{source}: not a refine model file (no \"format\": \"{FORMAT}\"; "
                               "make one with ffn train-refine)")
    if d.get("format_version") not in READS_VERSIONS:
        raise RefineModelError(f"{source}: refine model format version {d.get('format_version')!r}; this version "
                               f"reads {' and '.join(map(str, READS_VERSIONS))} (retrain with ffn train-refine)")
    if d.get("features") != list(FEATURES):
        raise RefineModelError(f"{source}: refine model made for other features ({len(d.get('features') or [])} "
                               f"named, this version computes {len(FEATURES)}); retrain with ffn train-refine")
    if d.get("base") not in BASES:
        raise RefineModelError(f"{source}: refine model base {d.get('base')!r}: expected one of {', '.join(BASES)}")
    thr = d.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
        raise RefineModelError(f"{source}: refine model threshold {thr!r}: expected a number in [0, 1]")
    if not isinstance(d.get("lightgbm"), str) or not isinstance(d.get("training", {}), dict):
        raise RefineModelError(f"{source}: refine model without its LightGBM text model")
    boundary = d.get("boundary") or ""
    if not isinstance(boundary, str):
        raise RefineModelError(f"{source}: refine model boundary map {type(boundary).__name__}: expected "
                               "LightGBM's text model or null")
    m = RefineModel(d["lightgbm"], d["base"], float(thr), FEATURES, d.get("training", {}), source, boundary)
    try:
        m._trees = parse_lightgbm(m.booster, len(FEATURES))
        m.boundary_map()
    except TreeModelError as exc:
        raise RefineModelError(f"{source}: unusable LightGBM model ({exc}); retrain with ffn train-refine") from None
    return m


BUNDLED = "bundled"  # refine.model = "bundled": the model shipped with the package
BUNDLED_FILE = "refine_cores_fib25_medulla.json"  # its file in floodfilling/models (what it was trained on: inside)


def bundled_refine_model_path() -> str:
    from importlib import resources

    return str(resources.files("floodfilling") / "models" / BUNDLED_FILE)


def load_refine_model(path: str) -> RefineModel:
    """Reads a refine model file (``"bundled"``: the package's; :class:`RefineModelError`
    naming it when unusable)."""
    if path == BUNDLED:
        path = bundled_refine_model_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise RefineModelError(f"refine model {path}: {exc.strerror or exc}") from None
    return model_from_json(raw.decode("utf-8", errors="replace"), str(path))


def check_learned_options(cfg: RefineConfig) -> None:
    """A learned refinement (``cfg.model`` not "hand") runs none of the hand steps and makes its
    base with the options its model was trained with: any other hand-step option given is an
    error naming it (never silently ignored)."""
    given = cfg.hand_options_set()
    if given:
        k = given[0]
        raise RefineModelError(f"option refine.{k}={getattr(cfg, k)!r}: an option of the hand steps, which the learned "
                               f"refinement (refine.model={cfg.model!r}) does not run (it makes its base with the "
                               "options its model was trained with); set refine.model=hand to run the hand steps")


def check_refine_options(cfg: RefineConfig, flood) -> None:
    """The checks of the [refine] options ``cfg`` before any work, for the flood's options
    ``flood``: those of the hand steps (``refine.model`` "hand",
    :func:`~floodfilling.inference.refine.check_flood_options`) or of a learned refinement
    (:func:`check_learned_options`)."""
    from .refine import check_flood_options

    if cfg.learned_model is None:
        check_flood_options(cfg, flood)
    else:
        check_learned_options(cfg)


def save_refine_model(model: RefineModel, path: str, overwrite: bool = False) -> None:
    from ..disk import atomic_write_bytes

    atomic_write_bytes(path, model.to_json().encode(), overwrite=overwrite)


# -- base segmentations --------------------------------------------------------------------------

@dataclass
class Base:
    """A base segmentation: every voxel an object's, the flood's objects keeping their ids,
    each core object (base "cores") an id above the flood's with its origin (the core's deepest
    voxel, 0 steps)."""

    segmentation: np.ndarray
    first_new: int  # ids above this are core objects
    origins: dict[int, Origin]
    flooded: np.ndarray  # bool: the voxels the flood segmented


def _base_markers(seg: np.ndarray, base: str, painted) -> tuple[int, np.ndarray, dict[int, Origin], np.ndarray]:
    """The flood's largest id, the base's markers before any core (the flood, or with base
    "gap_cores" the flood with the gap objects ``painted`` in), their origins, the flooded voxels."""
    if base not in BASES:
        raise RefineModelError(f"refine model base {base!r}: expected one of {', '.join(BASES)}")
    markers = np.asarray(seg).astype(np.int64)
    origins: dict[int, Origin] = {}
    if base == "gap_cores":
        if painted is None:
            raise RefineModelError("refine model base 'gap_cores' needs the gap objects (painted=...)")
        markers = np.asarray(painted[0]).astype(np.int64)
        origins = dict(painted[1])
    return int(np.max(seg, initial=0)), markers, origins, markers > 0  # (the flood's voxels and the gap floods')


def watershed_landscape(image: np.ndarray, markers: np.ndarray, cfg: RefineConfig, boundary=None) -> np.ndarray:
    """What the base's watershed floods (low first): the probability of ``boundary`` (a
    :class:`~floodfilling.inference.boundary.BoundaryMap`, or in training a
    :class:`~floodfilling.inference.boundary.HeldOutMap`) at the voxels no marker holds and at
    the marker voxels beside them (0 elsewhere); without one, the image, membranes low, negated.

    Why those: skimage's watershed labels a free voxel from the first of its face neighbours to
    leave the queue, in order of their values, so a marker voxel's value decides the free voxels
    it claims; a marker voxel with no free neighbour claims none, and its value changes nothing
    but the order among equal values (tests/test_boundary_map.py: the same base as the map
    evaluated everywhere, on a volume without such ties)."""
    from .refine import membranes_low

    if boundary is not None:
        free = markers == 0
        return boundary.probability(image, ndimage.binary_dilation(free) if free.any() else free)
    return -membranes_low(image, cfg, cfg.watershed_sigma)


def base_segmentation(image: np.ndarray, seg: np.ndarray, base: str, cfg: RefineConfig,
                      painted: tuple[np.ndarray, dict[int, Origin]] | None = None, boundary=None) -> Base:
    """The ``base`` (:data:`BASES`) of the flood ``seg`` on the normalised ``image`` (one tile);
    base "gap_cores" needs ``painted``: the flood with the gap objects painted in and their
    origins (:func:`paint_gap_objects`). The watershed runs on the map of ``boundary``
    (:func:`watershed_landscape`)."""
    from skimage.segmentation import watershed

    from .refine import gap_cores

    first, markers, origins, flooded = _base_markers(seg, base, painted)
    if base in ("cores", "gap_cores"):
        top = int(markers.max(initial=0))
        cores, centres = gap_cores(image, markers, cfg)
        put = cores > 0
        markers[put] = cores[put].astype(np.int64) + top
        origins.update({top + 1 + k: Origin(tuple(int(v) for v in c), 0, 0.0) for k, c in enumerate(centres)})
    if markers.any():
        markers = watershed(watershed_landscape(image, markers, cfg, boundary), markers=markers)
    return Base(markers, first, origins, flooded)


# -- tile by tile (``refine.tile``; block inference: its blocks) ----------------------------------

def tile_cores(image, markers, tile, cfg: RefineConfig) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The gap cores of ``tile``'s core (readers of the normalised image and of the markers:
    the flood, or the flood with the gap objects painted): (labels 1..N int32 of the core box,
    each core's deepest voxel in volume coordinates), numbered as
    :func:`~floodfilling.inference.refine.gap_cores` numbers them."""
    from .refine import gap_cores

    w0, w1 = tile.window_start, tile.window_stop
    cores, centres = gap_cores(image(w0, w1), np.asarray(markers(w0, w1)), cfg, tile.core_in_window)
    return cores, [tuple(int(c) + w for c, w in zip(centre, w0)) for centre in centres]


def core_offsets(counts, top: int) -> list[int]:
    """Each tile's first core id less one: the cores of all tiles are numbered after ``top``
    (the flood's largest id) in tile order, then in each tile's core order."""
    return [int(top) + int(v) for v in np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))[:-1]])] \
        if len(counts) else []


def base_tile(image, markers, cores, tile, cfg: RefineConfig, boundary=None) -> np.ndarray:
    """The base's core of ``tile`` (int64): the window's markers (``markers``: the flood or the
    painted flood) with every core that reaches the window (``cores``: a reader of all tiles'
    core labels in their final ids, 0 elsewhere), then the seeded watershed of the window (on
    the map of ``boundary``, made from the window's image, when given)."""
    from skimage.segmentation import watershed

    w0, w1 = tile.window_start, tile.window_stop
    m = np.array(markers(w0, w1), dtype=np.int64)
    c = np.asarray(cores(w0, w1))
    put = c > 0
    m[put] = c[put].astype(np.int64)
    if m.any():
        m = watershed(watershed_landscape(image(w0, w1), m, cfg, boundary), markers=m)
    return np.ascontiguousarray(m[tile.core_in_window])


def tile_contacts(image, base, flooded, tile, shape, cfg: RefineConfig):
    """``tile``'s share of the base's :class:`~floodfilling.inference.contacts.ContactGraph`
    (readers of the normalised image, of the assembled base and of the flood's voxels, bool):
    its core's voxels and the faces whose lower voxel lies in its core (the base is read over
    the core and one voxel beyond its upper faces, the image over the window, which the
    smoothing sees). The tiles' graphs add up to the volume's (:func:`~.contacts.sum_graphs`);
    the overlap statistic is the volume's, added there."""
    from .contacts import contact_graph
    from .refine import membranes_low

    w0 = tile.window_start
    e1 = tuple(min(b + 1, int(n)) for b, n in zip(tile.core_stop, shape))  # the core and the plane above it
    w1 = tuple(max(a, b) for a, b in zip(tile.window_stop, e1))
    seg = np.zeros(tuple(b - a for a, b in zip(w0, w1)), np.int64)
    fl = np.zeros(seg.shape, bool)
    put = tuple(slice(a - w, b - w) for a, b, w in zip(tile.core_start, e1, w0))
    seg[put] = base(tile.core_start, e1)
    fl[put] = flooded(tile.core_start, e1)
    return contact_graph(seg, membranes_low(image(w0, w1), cfg, 0.0), None, flooded=fl, core=tile.core_in_window)


def tiled_base(image: np.ndarray, seg: np.ndarray, base: str, cfg: RefineConfig, tiles,
               painted: tuple[np.ndarray, dict[int, Origin]] | None = None, boundary=None) -> Base:
    """:func:`base_segmentation` made tile by tile (``tiles``:
    :func:`~floodfilling.inference.refine.tiles_of`): each tile's gap cores in its core, numbered
    in tile order (:func:`core_offsets`), and each tile's watershed in its window from the
    markers and every core reaching it (:func:`base_tile`). One tile: the same as
    :func:`base_segmentation`."""
    from .refine import array_reader

    first, markers, origins, flooded = _base_markers(seg, base, painted)
    cores = np.zeros(markers.shape, np.int64)
    if base in ("cores", "gap_cores"):
        found = [tile_cores(array_reader(image), array_reader(markers), t, cfg) for t in tiles]
        for t, (lab, centres), off in zip(tiles, found, core_offsets([len(c) for _, c in found],
                                                                     int(markers.max(initial=0)))):
            cores[t.core] = np.where(lab > 0, lab.astype(np.int64) + off, 0)
            origins.update({off + 1 + k: Origin(c, 0, 0.0) for k, c in enumerate(centres)})
    out = np.zeros(markers.shape, np.int64)
    for t in tiles:
        out[t.core] = base_tile(array_reader(image), array_reader(markers), array_reader(cores), t, cfg, boundary)
    return Base(out, first, origins, flooded)


def tiled_graph(image: np.ndarray, b: Base, cfg: RefineConfig, tiles, overlaps: dict | None = None):
    """The contact graph of the base ``b``: its tiles' (:func:`tile_contacts`) summed in tile order."""
    from .contacts import sum_graphs
    from .refine import array_reader

    return sum_graphs([tile_contacts(array_reader(image), array_reader(b.segmentation), array_reader(b.flooded), t,
                                     b.segmentation.shape, cfg) for t in tiles], overlaps)


def paint_gap_objects(image: np.ndarray, seg: np.ndarray, cfg: RefineConfig, network,
                      overlaps: dict | None = None) -> tuple[np.ndarray, dict[int, Origin], dict[str, float]]:
    """The flood ``seg`` with the hand step's gap objects painted in (no watershed), their
    origins and the step's counters (base "gap_cores"; ``network``: a
    :class:`~floodfilling.inference.refine.FloodNetwork`)."""
    import dataclasses

    from .refine import RefineError, check_gap_box, refine_array

    if network is None:
        raise RefineError("refine model base 'gap_cores' needs the network (network=FloodNetwork(...))")
    check_gap_box(cfg, network.info.fov_zyx)
    r = refine_array(image, seg, dataclasses.replace(cfg, steps=("gap_objects",), model=""), network, overlaps)
    return r.segmentation, r.new_origins, r.counters


def agglomerate_base(image: np.ndarray, base: Base, model: RefineModel, cfg: RefineConfig,
                     overlaps: dict | None = None) -> Agglomeration:
    """The learned merges of ``base`` (the flood's ``overlaps`` feed the overlap feature)."""
    from .refine import membranes_low

    graph = contact_graph(base.segmentation, membranes_low(image, cfg, 0.0), overlaps, flooded=base.flooded)
    return agglomerate(graph, model.predict, model.threshold)


def learned_refine(image: np.ndarray, seg: np.ndarray, model: RefineModel, cfg: RefineConfig,
                   overlaps: dict | None = None, network=None, painted=None, tile=None):
    """``seg`` (the flood of the normalised ``image``) refined by ``model``: its base, then the
    learned merges. Returns a :class:`~floodfilling.inference.refine.Refined` whose ``joined``
    lists the flood objects that joined another, ``new_origins`` the core objects kept. Base
    "gap_cores" runs the gap floods with ``network`` (or takes ``painted``, what
    :func:`paint_gap_objects` returned). ``tile`` (default ``cfg.tile``): the base and the
    contact statistics are made tile by tile (:func:`tiled_base`, :func:`tiled_graph`), as
    block inference makes them on its blocks (:mod:`floodfilling.distributed.learned`: the same
    result with ``tile`` = the block size); the merges are decided on the whole graph."""
    from .refine import Refined, check_inputs, tiles_of

    check_inputs(image, seg)
    t0 = time.perf_counter()
    cfg = model.base_config(cfg)
    if tile is not None:  # (the gap objects of base "gap_cores" too)
        import dataclasses

        cfg = dataclasses.replace(cfg, tile=tuple(int(v) for v in tile))
    gap_counters: dict[str, float] = {}
    if model.base == "gap_cores" and painted is None:
        painted = paint_gap_objects(image, seg, cfg, network, overlaps)
    if painted is not None:
        gap_counters = {k: v for k, v in (painted[2] if len(painted) > 2 else {}).items()
                        if k in ("gap_floods", "gap_steps", "gap_joined")}
    tiles = tiles_of(np.shape(seg), cfg.tile, cfg.halo)
    b = tiled_base(image, seg, model.base, cfg, tiles, painted[:2] if painted is not None else None,
                   model.boundary_map())
    agg = agglomerate(tiled_graph(image, b, cfg, tiles, overlaps), model.predict, model.threshold)
    out = apply_lut(b.segmentation, agg.lut)
    dtype = seg.dtype if int(out.max(initial=0)) <= np.iinfo(seg.dtype).max else np.uint64
    joined = {k: v for k, v in agg.lut.items() if k <= b.first_new}
    origins = {k: o for k, o in b.origins.items() if k not in agg.lut}
    counters = {"learned_merges": len(agg.merges), "learned_base_objects": int(len(np.unique(b.segmentation)) -
                                                                             (0 in b.segmentation)),
                "rejoined": len(joined), "gap_objects": len(origins), "gap_cores": len(b.origins),
                "voxels_filled": int(np.count_nonzero(out)) - int(np.count_nonzero(seg)),
                "seconds": time.perf_counter() - t0, **gap_counters}
    log.info("learned refine (%s base): %d merges, %d core objects kept", model.base, len(agg.merges), len(origins))
    return Refined(out.astype(dtype), origins, counters, joined)
