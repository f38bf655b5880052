"""Typed options for inference, loadable from and dumpable to TOML.

Every field has a one-line comment saying what it changes. Defaults reproduce the
reference (google/ffn) run of the bundled FIB-25 model unless a comment says otherwise.
Probabilities are given as probabilities (0..1) as in the reference's configs; the code
converts them to float32 logits once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad option value or an unreadable config file."""


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
PRECISIONS = ("fp32", "bf16")
# The values a string option may take (checked by InferenceConfig.validate and check_choice).
CHOICES: dict[str, tuple[str, ...]] = {
    "seed_policy": ("peaks", "grid", "invert_origins"),
    "normalise": ("standardise", "histogram", "fixed"),
    "resident": ("auto", "on", "off"),
    "compile": COMPILE_MODES,
    "precision": PRECISIONS,
    "membranes": ("dark", "bright"),
    "kernels": ("openmp", "sycl"),
}
# Upper bounds of the options that size a resource (each a cap no sane run reaches; beyond it
# torch / OpenMP / the allocator fail hard: 100000 threads is a segfault, not an error). Fixed,
# not relative to this machine's cores, so that a config file means the same on every machine.
MAX_THREADS = 1024  # CPU threads: twice the largest nodes' hardware threads (512); oversubscribing is slow, never wrong
MAX_INFLIGHT = 1024  # canvases in flight (K): each holds a block's canvas; 16 keeps a GPU busy
MAX_PREFETCH = 64  # blocks read ahead, one background thread and one block in memory each
INT64_MAX = 2**63 - 1  # no integer option goes beyond numpy's / HDF5's int64
FLOAT32_MAX = 3.4028234663852886e38  # the network sees float32: an intensity mean beyond this is inf
FLOAT32_TINY = 1.1754943508222875e-38  # ... and an intensity std below this divides by 0
# The reference's canvas probabilities (google/ffn), shared by inference defaults and training.
SEED_INIT = 0.95  # probability placed at a new object's seed voxel
SEED_PAD = 0.05  # probability where the canvas was never predicted
MOVE_THRESHOLD = 0.9  # the FOV moves only to positions with at least this probability

# What each option changes, for resume manifests and digests (test: every option has a stage):
#   "flood": the floods themselves; "postprocess": applied to the finished segmentation;
#   "blocks": reconciliation of block runs; "runtime": how fast or where, never what.
OPTION_STAGES: dict[str, str] = {
    "init_activation": "flood", "pad_value": "flood", "move_threshold": "flood", "segment_threshold": "flood",
    "min_segment_size": "flood", "min_boundary_dist_zyx": "flood", "disco_seed_threshold": "flood",
    "seed_policy": "flood", "seed_origins": "flood", "seed_min_distance": "flood", "seed_fill_passes": "flood",
    "seed_fill_min_radius": "flood", "seed_grid_step": "flood", "normalise": "flood", "image_mean": "flood",
    "image_std": "flood", "resident": "flood", "compile": "flood", "precision": "flood",
    "device": "runtime", "threads": "runtime", "kernels": "runtime", "checkpoint_interval_s": "runtime", "prefetch": "runtime",
    "split_components": "postprocess", "dust_size": "postprocess",
    "merge_min_fraction": "blocks", "merge_min_voxels": "blocks", "merge_min_iou": "blocks",
}


def check_choice(name: str, value: Any, label: str | None = None) -> str:
    """``value`` if it is one of :data:`CHOICES` of option ``name``; :class:`ConfigError` naming
    the option (or ``label``, a flag) and the value otherwise."""
    choices = CHOICES[name]
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ConfigError(f"{label or 'option ' + name}={value!r}: expected {listed}")
    return value


class Options:
    """Typed options of one TOML table (``TABLE``): each field's type and range are checked
    (:func:`check_type`, :data:`_BOUNDS`, :data:`CHOICES`), its one-line comment is its help."""

    TABLE = ""  # the TOML table holding these options

    def validate(self):
        """Checks every option's type and range (and normalises it: 1 -> 1.0 for a float option,
        a list -> a tuple); raises :class:`ConfigError` naming the option and its value."""
        hints = _type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), hints[f.name], _BOUNDS.get(f.name)))
            if f.name in CHOICES:
                check_choice(f.name, getattr(self, f.name))
        return self

    # -- TOML ----------------------------------------------------------------------
    @classmethod
    def check_option(cls, name: str, value: Any, label: str | None = None) -> Any:
        """One option's value, type- and range-checked as :meth:`validate` does (``label``
        replaces "option NAME=VALUE" in the message, e.g. with the command-line flag)."""
        hints = _type_hints(cls)
        if name not in hints:
            raise ConfigError(f"unknown option {name}")
        return check_type(name, value, hints[name], _BOUNDS.get(name), label)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>"):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a table of options, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        vals = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                vals[f.name] = v
        try:
            return cls(**vals).validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | Path):
        """The ``[TABLE]`` of a TOML file; ``[inference]`` options may also stand at the top level."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory, not a TOML file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p}: not a text (UTF-8) file, cannot be TOML (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: invalid TOML ({exc})") from None
        if cls.TABLE in data:
            table = data[cls.TABLE]
        elif cls.TABLE == "inference":  # a file of bare inference options (other tables aside)
            table = {k: v for k, v in data.items() if k not in TABLES}
        else:
            table = {}
        return cls.from_dict(table, str(p) if cls.TABLE == "inference" else f"{p} [{cls.TABLE}]")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """TOML text with each option's comment (``## ...``) and its line (``None`` values are left
        commented out as ``# name = ""``, which reads back as unset): removing the first ``# `` of
        every line gives a config file that loads, as it stands, to these options."""
        comments = _field_comments(type(self))
        lines = [f"[{self.TABLE}]"]
        for f in fields(self):
            v = getattr(self, f.name)
            if comments.get(f.name):
                lines.append(f"## {comments[f.name]}")
            lines.append(("# " if v is None else "") + f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def with_overrides(self, **kw: Any):
        """A copy with the options in ``kw`` replaced (``None`` values are skipped), validated."""
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = sorted(set(kw) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **kw).validate()


@dataclass
class InferenceConfig(Options):
    TABLE = "inference"

    # Seed probability placed at the seed voxel of every new object.
    init_activation: float = SEED_INIT
    # Probability fed to the network where the canvas was never predicted.
    pad_value: float = SEED_PAD
    # The FOV moves only to voxels with at least this probability; the seed must stay above it.
    move_threshold: float = MOVE_THRESHOLD
    # Voxels with at least this probability become part of the object.
    segment_threshold: float = 0.6
    # Objects with fewer new voxels are rejected (their seed is marked and never retried).
    min_segment_size: int = 1000
    # A seed closer than this (z, y, x) to an existing object is rejected.
    min_boundary_dist_zyx: tuple[int, int, int] = (1, 1, 1)
    # Disconnection rule: once more than this fraction of an FOV is >= move_threshold,
    # voxels already below 0.5 cannot rise again (-1 disables the rule).
    disco_seed_threshold: float = 0.0
    # Seed policy: "peaks" (reference: distance-transform maxima away from edges), "grid", or
    # "invert_origins" (a previous run's object origins, last id first: the second run of a consensus).
    seed_policy: str = "peaks"
    # invert_origins: the previous run's segmentation (file.h5:seg or dir.zarr/seg); its <ds>_origins are the seeds.
    seed_origins: str = ""
    # Minimum spacing (voxels) between "peaks" seeds.
    seed_min_distance: int = 3
    # Extra seeding passes after the policy's seeds (0: none, the reference): each seeds the local
    # maxima of the distance to the nearest object in the space no object took, largest gap first.
    seed_fill_passes: int = 0
    # Fill passes seed only where the gap is at least this many voxels from any object or the border.
    seed_fill_min_radius: float = 4.0
    # Grid spacing (voxels) for the "grid" seed policy (the reference's PolicyGrid3d: interleaved
    # passes at offsets 0, 8, 4, 12, 2, 10, 14 of this grid, coarse to fine).
    seed_grid_step: int = 16
    # Image normalisation: "standardise" maps the volume's robust mean/std onto the model's
    # (default; travels between datasets), "histogram" matches intensity quantiles to the
    # model's, "fixed" uses (x - image_mean) / image_std like the reference.
    normalise: str = "standardise"
    # Intensity mean for normalise="fixed" (None: the model's recorded mean, 128 for FIB-25).
    image_mean: float | None = None
    # Intensity standard deviation for normalise="fixed" (None: the model's, 33 for FIB-25).
    image_std: float | None = None
    # Torch device: auto, cpu, cuda[:N] or xpu[:N].
    device: str = "auto"
    # Keep the image and canvas logits on the torch device, one device->host copy of a few
    # numbers per step: "auto" (on for cuda/xpu, off for cpu), "on" (any device), "off".
    resident: str = "auto"
    # torch.compile the network: "off" (default), "default", "reduce-overhead" (CUDA graphs on
    # cuda) or "max-autotune"; batches are padded to powers of two (few recompilations).
    # Compiling takes tens of seconds per batch size; on this project's CPU it did not pay.
    compile: str = "off"
    # CPU threads for the network (0: torch's default, all cores).
    threads: int = 0
    # Launcher of the native kernels (FOV update, seeds, reconciliation): "openmp" (CPU threads) or
    # "sycl" (the SYCL backend on $FFN_SYCL_DEVICE; pip install "floodfilling[sycl]"); same results.
    kernels: str = "openmp"
    # Network precision: fp32 (exact mode, matches the reference) or bf16 (faster, changes results).
    precision: str = "fp32"
    # Seconds between resumable-state saves of a running segmentation (0: never).
    checkpoint_interval_s: float = 60.0
    # Post-processing: split each object into its 6-connected components and renumber 1..N
    # (off: the reference's output; with block inference, joined across block faces).
    split_components: bool = False
    # Post-processing: objects smaller than this many voxels are removed, ids renumbered (0: keep all).
    dust_size: int = 0
    # Block inference: blocks read, normalised and seeded ahead of the engine, each by a background
    # thread, while the device works (None: 4 on cuda/xpu, 0 on cpu; 0: when a slot frees, in the loop).
    prefetch: int | None = None
    # Block inference: merge two blocks' objects that share this fraction of the smaller one's overlap voxels.
    merge_min_fraction: float = 0.5
    # Block inference: ... and at least this many voxels of the overlap.
    merge_min_voxels: int = 10
    # Block inference: ... and at least this IoU in the overlap (0: off; 0.5 makes matches one-to-one).
    merge_min_iou: float = 0.0

    def validate(self) -> "InferenceConfig":
        """Checks every option's type and range (and normalises it: 1 -> 1.0 for a float option,
        a list -> a tuple); raises :class:`ConfigError` naming the option and its value."""
        super().validate()
        if self.seed_policy == "invert_origins" and not str(self.seed_origins).strip():
            raise ConfigError("option seed_policy='invert_origins' needs seed_origins=FILE.h5:SEG (a previous run's "
                              "output, whose _origins table gives the seeds)")
        return self

    def options_of(self, *stages: str) -> dict[str, Any]:
        """The options of the given :data:`OPTION_STAGES` (e.g. ``"flood", "postprocess"``: what
        changes a segmentation, for resume manifests), as :meth:`to_dict` gives them."""
        unknown = sorted(set(stages) - set(OPTION_STAGES.values()))
        if unknown:
            raise ValueError(f"stages {unknown}: expected some of {sorted(set(OPTION_STAGES.values()))}")
        return {k: v for k, v in self.to_dict().items() if OPTION_STAGES[k] in stages}


REFINE_STEPS = ("rejoin", "gap_objects", "watershed")  # in the order they run (floodfilling.inference.refine)
HAND = "hand"  # refine.model = "hand": the hand steps decide
LEARNED_OPTIONS = ("model", "tile", "halo")  # the [refine] options a learned refinement uses (the rest: hand steps)


@dataclass
class RefineConfig(Options):
    """``[refine]``: the steps after the exact flood of ``ffn segment --refine``
    (:mod:`floodfilling.inference.refine`). Thresholds are in units of the normalised image (the
    volume's standard deviations for the default normalisation) and were chosen on the dev
    volume (README, "Refinement")."""

    TABLE = "refine"

    # Steps to run, of "rejoin" (flood objects that their own flood found to be pieces of an earlier
    # object join it), "gap_objects" (new objects in the space no flood took) and "watershed" (fill
    # every voxel from the objects along the image's membranes).
    steps: tuple[str, ...] = REFINE_STEPS
    # Polarity of membranes in the image: "dark" (EM with stained membranes) or "bright".
    membranes: str = "dark"
    # Gaussian sigma (voxels) of the image used to find cell interiors for gap objects.
    interior_sigma: float = 1.0
    # Rejoin: an object whose own flood ran this fraction of its voxels into one earlier object joins it.
    rejoin_fraction: float = 0.5
    # Gap objects: free voxels brighter than this (smoothed, normalised) are cell interior.
    interior_threshold: float = 0.0
    # Gap objects: a core is interior voxels at least this many voxels from membranes and objects.
    gap_core_radius: float = 3.0
    # Gap objects: cores with fewer voxels make no object.
    gap_min_core: int = 100
    # Gap objects: a core's flood that runs this fraction of its voxels into one object joins it.
    gap_join_fraction: float = 0.1
    # Watershed: Gaussian sigma (voxels) of the relief (0: the normalised intensity itself).
    watershed_sigma: float = 0.0
    # Gap objects: each core's flood runs in a box of this size (z,y,x) around its seed, on its own.
    gap_box: tuple[int, int, int] = (128, 128, 128)
    # Cores and watershed work tile by tile (z,y,x; 0: the whole axis); block inference uses its blocks.
    tile: tuple[int, int, int] = (0, 0, 0)
    # Context (z,y,x voxels) each tile reads beyond its faces for cores and watershed.
    halo: tuple[int, int, int] = (32, 32, 32)
    # Who decides: "bundled" (the learned refinement's model shipped with the package), a model file of
    # `ffn train-refine`, or "hand" (the hand steps above; "" too). A learned model replaces the hand steps.
    model: str = "bundled"

    @property
    def learned_model(self) -> str | None:
        """The learned refinement's model (a file, or "bundled"); None: the hand steps."""
        return None if self.model.strip() in ("", HAND) else self.model

    def hand_options_set(self) -> list[str]:
        """The options of the hand steps given another value than the default (a learned model
        runs none of them, and makes its base with the options it was trained with)."""
        default = RefineConfig()
        return [k for k in self.to_dict() if k not in LEARNED_OPTIONS and getattr(self, k) != getattr(default, k)]

    def validate(self) -> "RefineConfig":
        super().validate()
        bad = [s for s in self.steps if s not in REFINE_STEPS]
        if bad:
            raise ConfigError(f"option steps={list(self.steps)!r}: {bad[0]!r} is not a step; expected some of "
                              f"{', '.join(repr(s) for s in REFINE_STEPS)}")
        self.steps = tuple(s for s in REFINE_STEPS if s in self.steps)
        return self


TABLES = (InferenceConfig.TABLE, RefineConfig.TABLE)  # the tables of a config file


# -- typed checks --------------------------------------------------------------------
# Range of a numeric option (each value of a tuple option): (low, low_inclusive, high, high_inclusive),
# None for an open end. Options not listed only need the type (finite for floats).
Bounds = tuple  # (float | None, bool, float | None, bool)
_PROBABILITY: Bounds = (0, False, 1, False)
_AT_LEAST_0: Bounds = (0, True, None, False)
_AT_LEAST_1: Bounds = (1, True, None, False)
_POSITIVE: Bounds = (0, False, None, False)
_BOUNDS: dict[str, Bounds] = {
    "init_activation": _PROBABILITY, "pad_value": _PROBABILITY, "move_threshold": _PROBABILITY,
    "segment_threshold": _PROBABILITY, "min_segment_size": _AT_LEAST_0, "min_boundary_dist_zyx": _AT_LEAST_0,
    "seed_min_distance": _AT_LEAST_1, "seed_fill_passes": _AT_LEAST_0, "seed_fill_min_radius": _POSITIVE,
    "seed_grid_step": _AT_LEAST_1, "image_std": (FLOAT32_TINY, True, FLOAT32_MAX, True),
    "threads": (0, True, MAX_THREADS, True),
    "checkpoint_interval_s": _AT_LEAST_0, "dust_size": _AT_LEAST_0, "merge_min_fraction": (0, False, 1, True),
    "prefetch": (0, True, MAX_PREFETCH, True), "merge_min_voxels": _AT_LEAST_1, "merge_min_iou": (0, True, 1, True),
    "interior_sigma": _AT_LEAST_0, "gap_core_radius": _POSITIVE, "gap_min_core": _AT_LEAST_1,
    "gap_join_fraction": (0, False, 1, True), "rejoin_fraction": (0, False, 1, True),
    "watershed_sigma": _AT_LEAST_0, "gap_box": _AT_LEAST_1, "tile": _AT_LEAST_0, "halo": _AT_LEAST_0,
}

_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.6g}"


def _range_text(b: Bounds | None) -> str:
    if b is None:
        return ""
    lo, lo_in, hi, hi_in = b
    if hi is None:
        return f" {'>=' if lo_in else '>'} {_num(lo)}"
    if lo is None:
        return f" {'<=' if hi_in else '<'} {_num(hi)}"
    if not lo_in and not hi_in:
        return f" strictly between {_num(lo)} and {_num(hi)}"
    return f" in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"


def _in_range(v: float, b: Bounds | None) -> bool:
    if b is None:
        return True
    lo, lo_in, hi, hi_in = b
    if lo is not None and not (v >= lo if lo_in else v > lo):
        return False
    return hi is None or (v <= hi if hi_in else v < hi)


def _int_bounds(b: Bounds | None) -> Bounds:
    """An integer option's range: ``b`` with open ends closed at int64's (numpy and HDF5 take
    nothing wider; a larger value would be a raw OverflowError, or an object array, later)."""
    lo, lo_in, hi, hi_in = b if b is not None else (None, False, None, False)
    if lo is None:
        lo, lo_in = -INT64_MAX - 1, True
    if hi is None:
        hi, hi_in = INT64_MAX, True
    return (lo, lo_in, hi, hi_in)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def _is_bool(v: Any) -> bool:
    t = type(v)
    return isinstance(v, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))  # numpy's too


def _expected(annotation: Any, b: Bounds | None) -> str:
    """What an option of this type and range takes, in words ("an integer >= 0")."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _expected(rest[0], b) if len(rest) == 1 else str(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _range_text(b)
    if annotation is float:
        return "a probability" + _range_text(b) if b == _PROBABILITY else "a finite number" + _range_text(b)
    if annotation is str:
        return "a string"
    if typing.get_origin(annotation) is tuple:
        item = "integers" if args and args[0] is int else "finite numbers"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {item}{_range_text(b)}"
        zyx = " (z, y, x)" if len(args) == 3 else ""
        return f"{len(args)} {item}{_range_text(b)}{zyx}"
    return str(annotation)


def check_type(name: str, value: Any, annotation: Any, bounds: Bounds | None = None, label: str | None = None):
    """``value`` checked against the type ``annotation`` (bool, int, float, str, tuple[...] or
    X | None) and ``bounds`` (see :data:`_BOUNDS`), returned normalised (an int for a float
    option -> float, a list -> tuple, a path -> str). Floats must be finite; booleans are not
    integers and only true/false are booleans. Raises :class:`ConfigError`
    "``label``: expected ..." (default label: ``option NAME=VALUE``)."""

    def bad():
        wide = any(_is_int(v) and not -INT64_MAX - 1 <= v <= INT64_MAX
                   for v in (value if isinstance(value, (tuple, list)) else (value,)))
        beyond = f" (no integer beyond int64: {INT64_MAX})" if wide else ""
        return ConfigError(f"{label or f'option {name}={value!r}'}: expected {_expected(annotation, bounds)}{beyond}")

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if value == "" and type(None) in args and str not in rest and not _is_bool(value):
            return None  # TOML has no null: "" leaves an optional number unset (as `ffn config` prints it)
        if len(rest) != 1:
            raise TypeError(f"{name}: no type check for {annotation}")
        try:
            return check_type(name, value, rest[0], bounds, label)
        except ConfigError:
            raise bad() from None
    if annotation is bool:
        if not _is_bool(value):
            raise bad()
        return bool(value)
    if annotation is int:
        if _is_bool(value) or not isinstance(value, numbers.Integral) or not _in_range(int(value), _int_bounds(bounds)):
            raise bad()
        return int(value)
    if annotation is float:
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise bad()
        v = float(value)
        if not math.isfinite(v) or not _in_range(v, bounds):
            raise bad()
        return v
    if annotation is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, (str, bytes, dict)):
            raise bad()
        try:
            items = tuple(value)
        except TypeError:
            raise bad() from None
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = (args[0],) * len(items)
        elif len(items) == len(args):
            item_types = args
        else:
            raise bad()
        try:
            return tuple(check_type(name, v, t, bounds) for v, t in zip(items, item_types))
        except ConfigError:
            raise bad() from None
    raise TypeError(f"{name}: no type check for {annotation}")


def _toml_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _field_comments(cls) -> dict[str, str]:
    """Reads the ``# comment`` line above each field from the source (one source of truth)."""
    import inspect

    out: dict[str, str] = {}
    try:
        src = inspect.getsource(cls).splitlines()
    except OSError:  # pragma: no cover - no source available
        return out
    pending: list[str] = []
    for line in src:
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("# ").strip())
            continue
        if ":" in s and not s.startswith(("def ", "@", "class ")) and pending:
            out[s.split(":")[0].strip()] = " ".join(pending)
        pending = []
    return out


def field_help(cls=InferenceConfig) -> dict[str, str]:
    """One-line help for each option (used by the CLI)."""
    return _field_comments(cls)

