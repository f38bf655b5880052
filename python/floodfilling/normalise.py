"""Intensity normalisation that travels between datasets.

A model sees ``(x - mean_model) / std_model`` of its training images. A new volume of the
same tissue whose contrast differs (FIB-SEM from another session: std 54 instead of 33, say)
fed through the model's fixed values looks like nothing the model was trained on, and the
bundled FIB-25 model then floods everything from the first seed. So by default the volume is
mapped onto the model's statistics:

- ``standardise`` (default): estimate the volume's mean and std robustly (a strided sample of
  at most ~4 M voxels, ignoring saturated padding: the dtype's extreme values for integer data,
  the sample's exact min/max where they make up >= 1 % of it) and feed ``(x - mean_v) / std_v``,
  i.e. map the volume's statistics onto the model's;
- ``histogram``: match the volume's intensity quantiles to the model's recorded ones (or, for a
  model without recorded quantiles, to a Gaussian with the model's mean and std), then apply the
  model's ``(x - mean) / std``;
- ``fixed``: the reference's behaviour: ``(x - image_mean) / image_std`` with fixed values
  (default: the model's, 128 / 33 for the bundled FIB-25 model).

Block inference computes the values once for the whole volume (:func:`estimate_stats` on the
volume handle), never per block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import ndtri

if TYPE_CHECKING:  # types only: the options and a model's recorded statistics
    from .config import InferenceConfig
    from .model import ModelInfo

log = logging.getLogger(__name__)

METHODS = ("standardise", "histogram", "fixed")
N_QUANTILES = 101
# A sample in which fewer than this fraction of the voxels (padding aside) differ from the most
# common intensity is "nearly constant": normalised, that one value is all the network sees.
NEARLY_CONSTANT = 0.01


class NormalisationError(ValueError):
    """The image cannot be normalised (constant, NaN/inf, ...); the message names it."""


@dataclass
class Normalisation:
    """How raw intensities become network input: ``(f(x) - mean) / std`` with
    ``f`` = identity, or a piecewise-linear quantile map for ``histogram``."""

    method: str
    mean: float
    std: float
    # volume statistics that were estimated (standardise / histogram), for the record
    volume_mean: float | None = None
    volume_std: float | None = None
    # histogram matching: x -> interp(x, source_quantiles, target_quantiles)
    source_quantiles: list[float] | None = None
    target_quantiles: list[float] | None = None

    def apply(self, raw: np.ndarray, source: str = "image") -> np.ndarray:
        """``(f(raw) - mean) / std`` as float32 (the reference's float32 arithmetic); a float image
        beyond float32's range is normalised in float64 first. A
        :class:`NormalisationError` naming ``source`` when a normalised value is not finite (the
        network would see inf/NaN and flood nothing)."""
        img = np.asarray(raw)
        if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
            raise NormalisationError(f"{source}: contains NaN or infinite values")
        # a float64 image beyond float32's range (values, or its mean/std: 1e300, 1e-300) is normalised in
        # float64 first; histogram matching maps onto the model's mean/std, which float32 holds
        wide = self.method != "histogram" and _is_wide(img) and (
            _beyond_float32(img) or not _fits_float32(self.mean, self.std))
        mean, std = (np.float32(0), np.float32(1)) if wide else _float32_stats(self.mean, self.std, source)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            if self.method == "histogram":
                out = np.interp(img.astype(np.float64 if _beyond_float32(img) else np.float32),
                                np.asarray(self.source_quantiles, np.float64),
                                np.asarray(self.target_quantiles, np.float64)).astype(np.float32)
            elif wide:  # float32 would make these values inf before they are normalised
                out = ((img.astype(np.float64) - self.mean) / self.std).astype(np.float32)
            else:
                out = img.astype(np.float32)
            out -= mean
            out /= std
        if not np.isfinite(out).all():
            raise NormalisationError(
                f"{source}: normalised intensities are not finite: (x - {self.mean:g}) / {self.std:g} overflows "
                f"float32 for intensities {_extent(img)} ({self.method} normalisation); "
                + ("use other image_mean/image_std" if self.method == "fixed" else "rescale the image"))
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_wide(img: np.ndarray) -> bool:
    """A float image of more precision and range than float32 (float64)."""
    return img.dtype.kind == "f" and img.dtype.itemsize > 4


def _beyond_float32(img: np.ndarray) -> bool:
    """Whether a float image holds values that float32 cannot represent (magnitude > its max)."""
    if not _is_wide(img) or img.size == 0:
        return False
    return bool(np.abs(img).max() > np.finfo(np.float32).max)


def _fits_float32(mean: float, std: float) -> bool:
    with np.errstate(over="ignore", under="ignore"):
        m, s = np.float32(mean), np.float32(std)
    return bool(np.isfinite(m) and np.isfinite(s) and s >= np.finfo(np.float32).tiny)


def _float32_stats(mean: float, std: float, source: str) -> tuple[np.float32, np.float32]:
    """``mean`` and ``std`` as the float32 numbers the reference's arithmetic uses; a
    :class:`NormalisationError` when float32 cannot hold them (inf, or a std of 0)."""
    if not _fits_float32(mean, std):
        raise NormalisationError(f"{source}: intensity mean {mean:g} / std {std:g} are beyond float32 (the network's "
                                 f"precision: |mean| <= 3.4e38, std in [1.2e-38, 3.4e38]); rescale the image or "
                                 f"choose other image_mean/image_std")
    return np.float32(mean), np.float32(std)


def _extent(img: np.ndarray) -> str:
    """``[min, max]`` of an image, for messages."""
    return f"[{float(np.min(img)):g}, {float(np.max(img)):g}]" if img.size else "[]"


def _sample(vol, max_voxels: int = 4_000_000) -> np.ndarray:
    """A strided sample of a volume (array or handle with .shape and [] / .read)."""
    shape = tuple(vol.shape)
    n = int(np.prod(shape))
    stride = max(1, int(np.ceil((n / max_voxels) ** (1 / 3))))
    sl = tuple(slice(0, s, stride) for s in shape)
    data = vol[sl] if hasattr(vol, "__getitem__") else vol.read()[sl]
    return np.asarray(data).ravel()


def _drop_padding(sample: np.ndarray) -> np.ndarray:
    keep = np.ones(sample.shape, bool)
    if sample.dtype.kind in "ui":
        info = np.iinfo(sample.dtype)
        keep &= (sample != info.min) & (sample != info.max)
    if sample.size:
        for v in (sample.min(), sample.max()):
            hit = sample == v
            if hit.mean() >= 0.01:
                keep &= ~hit
    out = sample[keep]
    return out if out.size >= 0.05 * sample.size else sample  # mostly padding: keep all


def estimate_stats(vol, source: str = "image") -> tuple[float, float, np.ndarray]:
    """Robust (mean, std, quantiles) of a volume's intensities (padding ignored)."""
    s = _sample(vol)
    if s.size == 0:
        raise NormalisationError(f"{source}: empty volume")
    if s.dtype.kind == "f" and not np.all(np.isfinite(s)):
        raise NormalisationError(f"{source}: contains NaN or infinite values")
    s = _drop_padding(s).astype(np.float64)
    lo, hi = float(s.min()), float(s.max())
    if lo == hi:  # exactly one value: constancy is equality, whatever the values' scale
        raise NormalisationError(f"{source}: constant intensity {lo:g} (std 0): nothing to segment; "
                                 "use option normalise='fixed' with image_mean/image_std to force it")
    mean, std = _moments(s)
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise NormalisationError(f"{source}: intensities in [{lo:g}, {hi:g}] have no usable mean/std in float64 "
                                 f"(mean {mean:g}, std {std:g}); rescale the image")
    q = np.quantile(s, np.linspace(0, 1, N_QUANTILES))
    median = q[N_QUANTILES // 2]  # a value taking over half of the sample is its median
    differ = int(s.size - np.count_nonzero(s == median))
    if differ < NEARLY_CONSTANT * s.size:
        log.warning("%s: nearly constant: only %d of %d sampled voxels (of %d in the volume) differ from the "
                    "intensity %g; expect an (almost) empty segmentation", source, differ, s.size,
                    int(np.prod(tuple(vol.shape))), float(median))
    return mean, std, q


def _moments(s: np.ndarray) -> tuple[float, float]:
    """(mean, std) of float64 values, computed on the values scaled by their largest magnitude so
    that neither the sum nor the squares overflow (values near 1e308) or underflow (near 1e-308)."""
    scale = float(np.abs(s).max())
    t = s / scale
    return float(t.mean()) * scale, float(t.std()) * scale


def gaussian_quantiles(mean: float, std: float, n: int = N_QUANTILES) -> np.ndarray:
    p = np.linspace(0, 1, n)
    p = np.clip(p, 0.5 / 1000, 1 - 0.5 / 1000)  # finite tails
    return mean + std * ndtri(p)


def resolve_normalisation(cfg: "InferenceConfig", info: "ModelInfo", vol, source: str = "image") -> Normalisation:
    """The normalisation the inference options ``cfg`` ask for, for the model ``info`` (its
    recorded intensity statistics), with statistics of ``vol`` (array or volume handle)."""
    return resolve(cfg.normalise, vol, info.image_mean, info.image_std, info.intensity_quantiles,
                   cfg.image_mean, cfg.image_std, source)


def resolve(method: str, vol, model_mean: float, model_std: float, model_quantiles=None,
            image_mean: float | None = None, image_std: float | None = None, source: str = "image") -> Normalisation:
    """Chooses the normalisation of ``vol`` for a model with the given statistics."""
    if method not in METHODS:
        raise NormalisationError(f"option normalise={method!r}: expected one of {', '.join(METHODS)}")
    if method == "fixed":
        mean = model_mean if image_mean is None else float(image_mean)
        std = model_std if image_std is None else float(image_std)
        if not std > 0:
            raise NormalisationError(f"option image_std={std!r}: must be > 0")
        return Normalisation("fixed", mean, std)
    vmean, vstd, vq = estimate_stats(vol, source)
    if method == "standardise":
        log.info("%s: intensity mean %.2f std %.2f mapped onto the model's %.2f / %.2f", source, vmean, vstd,
                 model_mean, model_std)
        return Normalisation("standardise", vmean, vstd, volume_mean=vmean, volume_std=vstd)
    if model_quantiles is None:
        log.warning("the model records no intensity quantiles; matching %s to a Gaussian with the model's "
                    "mean %.1f and std %.1f", source, model_mean, model_std)
        target = gaussian_quantiles(model_mean, model_std)
    else:
        target = np.asarray(model_quantiles, np.float64)
        if target.shape != (N_QUANTILES,) or np.any(np.diff(target) < 0):
            raise NormalisationError(f"model intensity quantiles must be {N_QUANTILES} non-decreasing values")
    src = np.maximum.accumulate(vq)
    # np.interp needs increasing x: nudge flat runs (integer data) apart by a tiny amount relative
    # to the data (an absolute floor would swamp data of small magnitude: [0, 2.5e-10]), then by
    # at least one float64 step where the values are too large for that amount to register
    src = src + np.arange(src.size) * 1e-9 * float(np.abs(src).max())
    for i in range(1, src.size):
        if not src[i] > src[i - 1]:
            src[i] = np.nextafter(src[i - 1], np.inf)
    return Normalisation("histogram", model_mean, model_std, volume_mean=vmean, volume_std=vstd,
                         source_quantiles=src.tolist(), target_quantiles=target.tolist())


def check_dominant_object(seg: np.ndarray, norm: Normalisation, where: str = "subvolume") -> str | None:
    """Warns (and returns the message) when one object takes more than half of ``seg``:
    the usual sign of intensities the model was not trained on."""
    if seg.size == 0:
        return None
    ids, counts = np.unique(seg[seg > 0], return_counts=True)
    if ids.size == 0 or counts.max() <= seg.size / 2:
        return None
    frac = counts.max() / seg.size
    msg = (f"object {int(ids[counts.argmax()])} covers {frac:.0%} of the {where}: a merged flood like this usually "
           f"means the image intensities do not match the model's training data (normalisation used: "
           f"{norm.method}, mean {norm.mean:.1f}, std {norm.std:.1f}); try option normalise='standardise' or "
           f"'histogram', or set image_mean/image_std")
    log.warning(msg)
    return msg
