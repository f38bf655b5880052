"""The options of ``ffn train`` (:class:`TrainOptions`, its volumes :class:`TrainVolume`), checked
in one place (types and ranges through :func:`floodfilling.config.check_type`; messages name the
option, ``name=value``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import FLOAT32_MAX, FLOAT32_TINY, MAX_THREADS
from ..model import MAX_DEPTH, MAX_FEATURES, MAX_FOV
from .partitions import DEFAULT_THRESHOLDS, check_thresholds

MAX_BATCH = 4096  # move sequences per step and rank: 4096 33^3 FOVs of 32 features are ~70 GB of activations


class TrainError(ValueError):
    """A user-facing problem with the training inputs or options (one-line message)."""


@dataclass(frozen=True)
class TrainVolume:
    """One training volume. Its image is normalised by its own intensity mean/std (measured,
    unless given); its examples are drawn in proportion to ``weight`` (all volumes have one) or
    else to its number of training coordinates."""

    image: str  # training image, file.h5:dataset
    labels: str  # its labels, file.h5:dataset (same shape)
    coords: str | None = None  # `ffn prepare` output for these labels; None: computed from them
    weight: float | None = None  # relative share of the examples (None: by number of coordinates)
    image_mean: float | None = None  # override the measured intensity mean of this image
    image_std: float | None = None  # override the measured intensity standard deviation of this image


@dataclass
class TrainOptions:
    image: str | None = None  # training image, file.h5:dataset (one volume; several: volumes)
    labels: str | None = None  # training labels, file.h5:dataset (same shape)
    out: str = ""  # run directory (metrics, checkpoint/)
    coords: str | None = None  # `ffn prepare` output (file.h5[:coords]); None: computed from the labels
    depth: int | None = None  # residual modules (None: 12, or init's)
    features: int | None = None  # feature maps per convolution (None: 32, or init's)
    fov: tuple[int, int, int] | None = None  # FOV (z, y, x) (None: 33^3, or init's)
    deltas: tuple[int, int, int] | None = None  # FOV move (z, y, x) (None: 8^3, or init's)
    batch: int = 4  # independent move sequences per step (per rank)
    max_steps: int = 10000  # total training steps (batches) to reach
    optimizer: str = "sgd"  # sgd (reference: plain gradient descent) or adam
    lr: float = 0.001  # learning rate (per rank before lr_scaling)
    momentum: float = 0.0  # SGD momentum
    clip: float = 0.7  # clip every gradient entry to +-clip (reference 0.7; 0: off)
    seed: int = 0  # seeds weights, coordinates, augmentation
    device: str = "auto"  # auto, cpu, cuda[:N], xpu[:N]
    threads: int = 0  # CPU threads (0: torch default; under MPI on CPU: cores / ranks per node)
    min_size: int = 10000  # objects smaller than this are background (on-the-fly partitions)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # partition thresholds (on-the-fly)
    image_mean: float | None = None  # override the measured intensity mean
    image_std: float | None = None  # override the measured intensity standard deviation
    augment: bool = True  # random flips (z, y, x) and y/x transposition
    lr_scaling: str = "sqrt"  # learning rate x world size (linear), x sqrt(world) (sqrt) or x1 (none)
    warmup_steps: int = 0  # ramp the learning rate from lr to the scaled one over this many steps
    checkpoint_every: int = 1000  # steps between checkpoints (0: only time-based and final)
    checkpoint_secs: float = 600.0  # seconds between checkpoints (0: off)
    keep_every: int = 0  # also keep the weights every this many steps as out/models/model-STEP.npz (0: latest only)
    log_every: int = 100  # steps between metrics rows
    resume: bool = False  # continue the checkpoint in out/checkpoint
    init: str | None = None  # fine-tune this model (.npz, directory, or "bundled"): its geometry is the run's
    progress: bool = False  # tqdm progress bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events when available
    val_image: str | None = None  # held-out image for validation (None: no validation); normalised by its own stats
    val_labels: str | None = None  # its labels (same shape)
    val_every: int = 1000  # steps between validations (0: only at the end)
    val_sequences: int = 200  # held-out move sequences per validation: the same ones every time, whatever the ranks
    val_min_size: int = 1000  # held-out objects smaller than this are background
    volumes: tuple[TrainVolume, ...] = ()  # several training volumes (instead of image/labels/coords/image_*)


# The options that describe the one training volume when ``volumes`` is not given.
SINGLE_VOLUME = ("image", "labels", "coords", "image_mean", "image_std")


# Range of each numeric option (see floodfilling.config.check_type): (low, low_inclusive, high, high_inclusive).
# Resource options have an upper bound (threads: config.MAX_THREADS; the network's size: the model
# file's limits, model.MAX_*), integers never beyond int64 (config.check_type).
_OPTION_BOUNDS: dict[str, tuple] = {
    "depth": (1, True, MAX_DEPTH, True), "features": (1, True, MAX_FEATURES, True), "fov": (1, True, MAX_FOV, True),
    "deltas": (0, True, MAX_FOV // 2, True), "batch": (1, True, MAX_BATCH, True), "max_steps": (0, True, None, False),
    "lr": (0, False, None, False), "momentum": (0, True, 1, False), "clip": (0, True, None, False),
    "seed": (0, True, 2**32 - 1, True), "threads": (0, True, MAX_THREADS, True), "min_size": (1, True, None, False),
    "thresholds": (0, False, 1, True), "image_std": (FLOAT32_TINY, True, FLOAT32_MAX, True),
    "warmup_steps": (0, True, None, False),
    "checkpoint_every": (0, True, None, False), "checkpoint_secs": (0, True, None, False),
    "keep_every": (0, True, None, False),
    "log_every": (0, True, None, False), "val_every": (0, True, None, False), "val_sequences": (1, True, None, False),
    "val_min_size": (1, True, None, False),
}


def option_bounds() -> dict[str, tuple]:
    """The range of each numeric option (the flags of ``ffn train`` are checked against it before
    any work, :func:`floodfilling.cli.check_numbers`)."""
    return dict(_OPTION_BOUNDS)


def check_options(opts: TrainOptions) -> TrainOptions:
    """``opts`` with every option type- and range-checked (floats finite), normalised (lists ->
    tuples, 1 -> 1.0); a :class:`TrainError` naming the option otherwise. Touches nothing on disk."""
    import typing

    from ..config import ConfigError, check_type

    hints = typing.get_type_hints(TrainOptions)
    vals = {}
    for f in fields(TrainOptions):
        if f.name == "volumes":
            continue
        v = getattr(opts, f.name)
        try:
            vals[f.name] = check_type(f.name, v, hints[f.name], _OPTION_BOUNDS.get(f.name), f"{f.name}={fmt_value(v)}")
        except ConfigError as exc:
            raise TrainError(str(exc)) from None
    if vals["optimizer"] not in ("sgd", "adam"):
        raise TrainError(f"optimizer={vals['optimizer']!r}: expected sgd or adam")
    if vals["lr_scaling"] not in ("linear", "sqrt", "none"):
        raise TrainError(f"lr_scaling={vals['lr_scaling']!r}: expected linear, sqrt or none")
    if not vals["out"].strip():
        raise TrainError(f"out={vals['out']!r}: empty")
    try:
        check_thresholds(vals["thresholds"])
    except ValueError as exc:
        raise TrainError(f"thresholds={fmt_value(vals['thresholds'])}: {exc}") from None
    vols = tuple(opts.volumes or ())
    if vols:
        given = [k for k in SINGLE_VOLUME if vals[k] is not None]
        if given:
            raise TrainError(f"{given[0]}={fmt_value(vals[given[0]])}: give the training data either as "
                             f"{'/'.join(SINGLE_VOLUME)} (one volume) or as volumes, not both")
    else:
        for name in ("image", "labels"):
            if vals[name] is None or not vals[name].strip():
                raise TrainError(f"{name}={vals[name]!r}: a training {name} is required (or volumes=[...])")
        vols = (TrainVolume(vals["image"], vals["labels"], vals["coords"], None, vals["image_mean"],
                            vals["image_std"]),)
    vals.update({k: None for k in SINGLE_VOLUME})
    vals["volumes"] = check_volumes(vols)
    return TrainOptions(**vals)


def check_volumes(vols) -> tuple[TrainVolume, ...]:
    """The volumes type- and range-checked; messages name the option and the volume (1-based, with
    its image); weights are given for every volume or none."""
    import typing

    from ..config import ConfigError, check_type

    hints = typing.get_type_hints(TrainVolume)
    bounds = {"weight": (0, False, None, False), "image_std": _OPTION_BOUNDS["image_std"]}
    out = []
    for i, v in enumerate(vols, start=1):
        if not isinstance(v, TrainVolume):
            raise TrainError(f"volumes: item {i} is a {type(v).__name__}, expected a TrainVolume")
        where = f"(volume {i} of {len(vols)}, image={v.image})"
        vals = {}
        for f in fields(TrainVolume):
            x = getattr(v, f.name)
            name = "volume_weights" if f.name == "weight" else f.name
            try:
                vals[f.name] = check_type(f.name, x, hints[f.name], bounds.get(f.name), f"{name}={fmt_value(x)}")
            except ConfigError as exc:
                raise TrainError(f"{exc} {where}") from None
        for name in ("image", "labels"):
            if not vals[name].strip():
                raise TrainError(f"{name}={vals[name]!r}: empty {where}")
        out.append(replace(v, **vals))
    if not out:
        raise TrainError("volumes: no training volume")
    n_weights = sum(v.weight is not None for v in out)
    if 0 < n_weights < len(out):
        raise TrainError(f"volume_weights={fmt_value([v.weight for v in out])}: give every volume a weight, "
                         f"or none (examples in proportion to the volumes' coordinates)")
    if n_weights and not math.isfinite(sum(v.weight for v in out)):  # type: ignore[misc]
        raise TrainError(f"volume_weights={fmt_value([v.weight for v in out])}: too large")
    return tuple(out)


def fmt_value(v: Any) -> str:
    """An option's value as a message shows it: a tuple as ``a,b,c``, a string quoted."""
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return repr(v) if isinstance(v, str) else str(v)
