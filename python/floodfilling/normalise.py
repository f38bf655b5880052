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
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ndtri

log = logging.getLogger(__name__)

METHODS = ("standardise", "histogram", "fixed")
N_QUANTILES = 101


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
        img = np.asarray(raw)
        if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
            raise NormalisationError(f"{source}: contains NaN or infinite values")
        if self.method == "histogram":
            out = np.interp(img.astype(np.float32), np.asarray(self.source_quantiles, np.float64),
                            np.asarray(self.target_quantiles, np.float64)).astype(np.float32)
        else:
            out = img.astype(np.float32)
        out -= np.float32(self.mean)
        out /= np.float32(self.std)
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


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
    mean, std = float(s.mean()), float(s.std())
    if not std > 1e-6 * max(1.0, abs(mean)):
        raise NormalisationError(f"{source}: constant intensity {mean:g} (std 0): nothing to segment; "
                                 "use option normalise='fixed' with image_mean/image_std to force it")
    return mean, std, np.quantile(s, np.linspace(0, 1, N_QUANTILES))


def gaussian_quantiles(mean: float, std: float, n: int = N_QUANTILES) -> np.ndarray:
    p = np.linspace(0, 1, n)
    p = np.clip(p, 0.5 / 1000, 1 - 0.5 / 1000)  # finite tails
    return mean + std * ndtri(p)


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
    # np.interp needs increasing x: nudge flat runs (integer data) apart by a tiny amount
    src = src + np.arange(src.size) * 1e-9 * max(1.0, float(np.abs(src).max()))
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
