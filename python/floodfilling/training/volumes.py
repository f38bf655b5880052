"""Training data: the training volumes read, checked and normalised, and the examples drawn from
several of them.

Each volume (:class:`~.options.TrainVolume`) keeps its own labels, coordinates (its ``ffn
prepare`` file, or partitions computed on the fly) and normalisation: its image becomes
``(x - mean) / std`` with its own mean and std (measured, unless given), as inference's default
``standardise`` does for a new volume.

Which volume an example comes from (:class:`VolumeMix`) is, like everything in the example
stream, a function of ``(seed, draw number)``: draw ``g`` (example ``k`` of rank ``r`` of ``W``
is draw ``g = k * W + r``) picks volume ``v`` with probability ``p[v]`` (the volumes' weights, or
their numbers of coordinates, normalised) from uniforms drawn in blocks of :data:`BLOCK` by
``np.random.default_rng((seed, SALT, block))``, and uses that volume's coordinate number ``j`` =
how many earlier draws picked ``v`` (modulo its number of coordinates). So the ranks share every
volume's coordinate list without overlap, the order of each list is kept (``ffn prepare``
balanced and shuffled it), a resumed run needs no state beyond the stream's example number, and
with one volume draw ``g`` is coordinate ``g``, exactly as :class:`~.examples.ExampleSource`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import volumes
from ..normalise import Normalisation, NormalisationError
from .examples import ExampleSource, Geometry
from .options import TrainError, TrainOptions, TrainVolume
from .partitions import build_coordinates, compute_partitions, labels_digest, read_attrs

log = logging.getLogger(__name__)

BLOCK = 4096  # draws whose volumes are drawn at once (and cached)
SALT = 0x766F6C  # separates the volume draws from the augmentation draws (seed, g)


def intensity_stats(raw: np.ndarray) -> tuple[float, float, list[float]]:
    """Mean, standard deviation and the 101 quantiles (0, 1, ..., 100 %) of ``raw``."""
    a = np.asarray(raw)
    if a.dtype == np.uint8:  # exact, fast: from the histogram
        hist = np.bincount(a.ravel(), minlength=256).astype(np.float64)
        v = np.arange(256, dtype=np.float64)
        n = hist.sum()
        mean = float((hist * v).sum() / n)
        std = float(np.sqrt((hist * (v - mean) ** 2).sum() / n))
    else:
        mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
    q = np.quantile(a, np.linspace(0.0, 1.0, 101)).astype(np.float64)
    return mean, std, [float(x) for x in q]


def read_volume(spec: str) -> tuple[np.ndarray, str]:
    """(the whole volume, its spec as text)."""
    with volumes.open_volume(spec) as v:
        return v.read(), str(v.spec)


def load_coordinates(spec: str, shape, labels: np.ndarray | None = None,
                     labels_src: str = "the training labels") -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates (N, 3) zyx from an ``ffn prepare`` file (``file.h5`` or ``file.h5:dataset``).

    With ``labels``, the digest ``ffn prepare`` recorded of the labels it read (attribute
    ``labels_digest``) must be theirs: coordinates of another label volume of the same shape
    are refused; a file without the attribute (older ``ffn prepare``) is accepted with a warning."""
    import h5py

    try:
        path, ds = volumes.parse_volume_spec(spec, default_dataset="coords")
    except ValueError as exc:
        raise TrainError(f"coords={spec}: {exc}") from None
    if not os.path.isfile(path):
        raise TrainError(f"coords={spec}: no such file")
    try:
        with h5py.File(path, "r") as f:
            if ds not in f:
                raise TrainError(f"coords={spec}: no dataset {ds!r} (is it an `ffn prepare` output?)")
            d = f[ds]
            coords = d[...]
            attrs = read_attrs(d)
    except OSError as exc:
        raise TrainError(f"coords={spec}: cannot read HDF5 file ({exc})") from None
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.dtype.kind not in "iu":
        raise TrainError(f"coords={spec}: expected an (N, 3) integer array, got {coords.shape} {coords.dtype}")
    vshape = attrs.get("volume_shape")
    if vshape is not None and tuple(vshape) != tuple(shape):
        raise TrainError(f"coords={spec} was prepared for a volume of shape {tuple(vshape)}, "
                         f"the labels have shape {tuple(shape)}")
    if labels is not None:
        recorded = attrs.get("labels_digest")
        if recorded is None:
            log.warning("coords=%s records no labels_digest (written by an older ffn prepare): cannot check that "
                        "it was prepared from %s", spec, labels_src)
        else:
            have = labels_digest(labels)
            if str(recorded) != have:
                raise TrainError(f"coords={spec} was prepared from labels {attrs.get('source_labels', '?')} "
                                 f"(labels_digest {recorded}), not from the training labels {labels_src} "
                                 f"(labels_digest {have}); rerun ffn prepare on {labels_src}")
    return coords.astype(np.int64), attrs


def read_pair(image_spec: str, labels_spec: str, geometry: Geometry, names=("image", "labels"), where: str = ""):
    """(raw, labels, image source, labels source), checked to fit together and the FOV;
    ``names`` are the options naming the two (messages), ``where`` says which volume."""
    raw, image_src = read_volume(image_spec)
    labels, labels_src = read_volume(labels_spec)
    if raw.shape != labels.shape:
        raise TrainError(f"{names[0]}={image_src} has shape {raw.shape} but {names[1]}={labels_src} have shape "
                         f"{labels.shape}{where}")
    if labels.dtype.kind not in "iu":
        raise TrainError(f"{names[1]}={labels_src}: expected integer ids, got dtype {labels.dtype}{where}")
    try:
        geometry.check_fits(raw.shape, f"volume {image_src}")
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return raw, labels, image_src, labels_src


@dataclass
class LoadedVolume:
    """One training volume in memory: its normalised image, labels and usable coordinates."""

    image: np.ndarray  # float32, (x - mean) / std
    labels: np.ndarray
    coords: np.ndarray  # (N, 3) int64, z, y, x, all at least the margin from the border
    mean: float
    std: float
    quantiles: list[float]
    info: dict[str, Any] = field(default_factory=dict)  # what the run records of it (model meta)


def load_volume(vol: TrainVolume, opts: TrainOptions, geometry: Geometry, where: str = "") -> LoadedVolume:
    """Reads one volume with every check the user can act on (messages name the option and,
    with several volumes, ``where`` which one)."""
    raw, labels, image_src, labels_src = read_pair(vol.image, vol.labels, geometry, where=where)
    info: dict[str, Any] = {"image": vol.image, "labels": vol.labels}
    if vol.coords:
        coords, attrs = load_coordinates(vol.coords, labels.shape, labels, labels_src)
        info["coords"] = {"source": vol.coords, **{k: attrs[k] for k in ("radius_zyx", "margin_zyx", "min_size")
                                                   if k in attrs}}
    else:
        parts = compute_partitions(labels, geometry.margin, opts.thresholds, opts.min_size, source=labels_src)
        coords = build_coordinates(parts, geometry.margin, seed=opts.seed, source=labels_src)
        info["coords"] = {"source": "computed", "radius_zyx": list(geometry.margin), "min_size": opts.min_size}
    m = np.array(geometry.margin)
    mt = tuple(int(x) for x in m)
    ok = np.all((coords >= m) & (coords < np.array(labels.shape) - m), axis=1)
    if not ok.any():
        raise TrainError(f"no training coordinate of labels {labels_src} is at least {mt} from the border (fov + "
                         f"2*deltas = {geometry.patch}); rerun `ffn prepare` with margin_zyx={','.join(map(str, m))}"
                         f"{where}")
    if not ok.all():
        log.warning("dropping %d of %d coordinates of %s closer than %s to the border", int((~ok).sum()),
                    len(coords), labels_src, mt)
        coords = coords[ok]
    mean, std, quantiles = intensity_stats(raw)
    if vol.image_mean is not None:
        mean = float(vol.image_mean)
    if vol.image_std is not None:
        std = float(vol.image_std)
    if not std > 0:
        raise TrainError(f"image={vol.image}: intensity standard deviation is {std}; cannot normalise{where}")
    try:  # the inference's float32 arithmetic, refusing values that would not be finite (normalise.py)
        image = Normalisation("fixed", float(mean), float(std)).apply(raw, f"image={vol.image}")
    except NormalisationError as exc:
        raise TrainError(f"{exc}{where}") from None
    info.update({"coordinates": int(len(coords)), "weight": vol.weight, "mean": mean, "std": std})
    return LoadedVolume(image, labels, coords, mean, std, quantiles, info)


def load_volumes(opts: TrainOptions) -> list[LoadedVolume]:
    """Every volume of ``opts`` (checked options: ``opts.volumes`` holds them all); their
    ``info`` records the probability of each (see :func:`probabilities`)."""
    geometry = Geometry(opts.fov, opts.deltas)  # type: ignore[arg-type]
    n = len(opts.volumes)
    out = [load_volume(v, opts, geometry, f" (volume {i} of {n})" if n > 1 else "")
           for i, v in enumerate(opts.volumes, start=1)]
    p = probabilities(out)
    for lv, pv in zip(out, p):
        lv.info["probability"] = float(pv)
    return out


def probabilities(loaded: list[LoadedVolume]) -> np.ndarray:
    """Each volume's share of the examples: its weight (when the volumes have weights) or its
    number of coordinates, over the sum."""
    w = [lv.info.get("weight") for lv in loaded]
    if all(x is not None for x in w):
        a = np.array(w, dtype=np.float64)
    else:
        a = np.array([len(lv.coords) for lv in loaded], dtype=np.float64)
    return a / a.sum()


class VolumeMix:
    """The volume and its coordinate number of every draw ``g`` (see the module docstring)."""

    def __init__(self, probabilities, seed: int = 0):
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise ValueError(f"probabilities must be > 0, got {p.tolist()}")
        self.p = p / p.sum()
        self.cum = np.cumsum(self.p)
        self.seed = int(seed)
        self._starts = [np.zeros(len(p), dtype=np.int64)]  # draws of each volume before block b
        self._block: tuple[int, np.ndarray] | None = None  # (b, volumes of its draws)

    def choices(self, b: int) -> np.ndarray:
        """The volumes of draws ``b * BLOCK`` to ``(b + 1) * BLOCK - 1``."""
        u = np.random.default_rng((self.seed, SALT, int(b))).random(BLOCK)
        return np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.p) - 1)

    def draw(self, g: int) -> tuple[int, int]:
        """(volume, that volume's draw number) of draw ``g``."""
        g = int(g)
        if len(self.p) == 1:
            return 0, g
        b, i = divmod(g, BLOCK)
        while len(self._starts) <= b:  # cumulative counts up to block b (kept: a resume recomputes them once)
            c = self.choices(len(self._starts) - 1)
            self._starts.append(self._starts[-1] + np.bincount(c, minlength=len(self.p)))
        if self._block is None or self._block[0] != b:
            self._block = (b, self.choices(b))
        c = self._block[1]
        v = int(c[i])
        return v, int(self._starts[b][v] + np.count_nonzero(c[:i] == v))


class MixedSource:
    """Example patches from several volumes (one :class:`ExampleSource` each, same geometry,
    seed and augmentation), draw by draw as :class:`VolumeMix` decides; the interface of
    :class:`ExampleSource` for :class:`~.examples.ExampleStream`."""

    def __init__(self, sources: list[ExampleSource], probabilities, seed: int = 0, rank: int = 0, world: int = 1):
        if not sources or len(sources) != len(probabilities):
            raise ValueError(f"{len(sources)} sources, {len(probabilities)} probabilities")
        self.sources = sources
        self.geometry = sources[0].geometry
        if any(s.geometry != self.geometry for s in sources):
            raise ValueError("the volumes' example sources have different geometries")
        self.mix = VolumeMix(probabilities, seed)
        self.rank, self.world = int(rank), int(world)

    def volume_index(self, k: int) -> tuple[int, int]:
        """(volume, coordinate index in it) of this rank's example number ``k``."""
        v, j = self.mix.draw(k * self.world + self.rank)
        return v, j % len(self.sources[v].coords)

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image patch, target patch) of this rank's example number ``k``."""
        v, j = self.volume_index(k)
        return self.sources[v].patch(j, k * self.world + self.rank)


def mixed_source(loaded: list[LoadedVolume], geometry: Geometry, seed: int, rank: int, world: int,
                 augment: bool) -> MixedSource:
    """The training examples of ``loaded`` volumes (see :func:`load_volumes`)."""
    sources = [ExampleSource(lv.image, lv.labels, lv.coords, geometry, seed=seed, augment=augment) for lv in loaded]
    return MixedSource(sources, probabilities(loaded), seed=seed, rank=rank, world=world)
