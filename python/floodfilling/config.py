"""Typed options for inference, loadable from and dumpable to TOML.

Every field has a one-line comment saying what it changes. Defaults reproduce the
reference (google/ffn) run of the bundled FIB-25 model unless a comment says otherwise.
Probabilities are given as probabilities (0..1) as in the reference's configs; the code
converts them to float32 logits once.
"""

from __future__ import annotations

import dataclasses
import sys
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


@dataclass
class InferenceConfig:
    # Seed probability placed at the seed voxel of every new object.
    init_activation: float = 0.95
    # Probability fed to the network where the canvas was never predicted.
    pad_value: float = 0.05
    # The FOV moves only to voxels with at least this probability; the seed must stay above it.
    move_threshold: float = 0.9
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
    # Network precision: fp32 (exact mode, matches the reference) or bf16 (faster, changes results).
    precision: str = "fp32"
    # Seconds between resumable-state saves of a running segmentation (0: never).
    checkpoint_interval_s: float = 60.0
    # Post-processing: split each object into its 6-connected components and renumber 1..N
    # (off: the reference's output; with --block, joined across block faces).
    split_components: bool = False
    # Post-processing: objects smaller than this many voxels are removed, ids renumbered (0: keep all).
    dust_size: int = 0
    # Block inference: merge two blocks' objects that share this fraction of the smaller one's overlap voxels.
    merge_min_fraction: float = 0.5
    # Block inference: ... and at least this many voxels of the overlap.
    merge_min_voxels: int = 10
    # Block inference: ... and at least this IoU in the overlap (0: off; 0.5 makes matches one-to-one).
    merge_min_iou: float = 0.0

    def validate(self) -> "InferenceConfig":
        for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
            v = getattr(self, name)
            if not (0.0 < float(v) < 1.0):
                raise ConfigError(f"option {name}={v!r}: must be a probability strictly between 0 and 1")
        if self.min_segment_size < 0:
            raise ConfigError(f"option min_segment_size={self.min_segment_size!r}: must be >= 0")
        if len(tuple(self.min_boundary_dist_zyx)) != 3 or any(int(v) < 0 for v in self.min_boundary_dist_zyx):
            raise ConfigError(f"option min_boundary_dist_zyx={self.min_boundary_dist_zyx!r}: need 3 values >= 0")
        self.min_boundary_dist_zyx = tuple(int(v) for v in self.min_boundary_dist_zyx)  # type: ignore[assignment]
        if self.seed_policy not in ("peaks", "grid", "invert_origins"):
            raise ConfigError(f"option seed_policy={self.seed_policy!r}: expected 'peaks', 'grid' or 'invert_origins'")
        if self.seed_policy == "invert_origins" and not str(self.seed_origins).strip():
            raise ConfigError("option seed_policy='invert_origins' needs seed_origins=FILE.h5:SEG (a previous run's "
                              "output, whose _origins table gives the seeds)")
        if int(self.seed_fill_passes) < 0 or not float(self.seed_fill_min_radius) > 0:
            raise ConfigError(f"options seed_fill_passes={self.seed_fill_passes!r} (>= 0) / seed_fill_min_radius="
                              f"{self.seed_fill_min_radius!r} (> 0) out of range")
        if self.seed_min_distance < 1 or self.seed_grid_step < 1:
            raise ConfigError("options seed_min_distance and seed_grid_step must be >= 1")
        if self.normalise not in ("standardise", "histogram", "fixed"):
            raise ConfigError(f"option normalise={self.normalise!r}: expected 'standardise', 'histogram' or 'fixed'")
        if self.image_std is not None and not float(self.image_std) > 0:
            raise ConfigError(f"option image_std={self.image_std!r}: must be > 0")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"option compile={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.resident not in ("auto", "on", "off"):
            raise ConfigError(f"option resident={self.resident!r}: expected 'auto', 'on' or 'off'")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"option precision={self.precision!r}: expected 'fp32' or 'bf16'")
        if self.dust_size < 0:
            raise ConfigError(f"option dust_size={self.dust_size!r}: must be >= 0")
        if self.threads < 0:
            raise ConfigError(f"option threads={self.threads!r}: must be >= 0")
        if self.checkpoint_interval_s < 0:
            raise ConfigError(f"option checkpoint_interval_s={self.checkpoint_interval_s!r}: must be >= 0")
        if not (0.0 < float(self.merge_min_fraction) <= 1.0) or not (0.0 <= float(self.merge_min_iou) <= 1.0):
            raise ConfigError(f"options merge_min_fraction={self.merge_min_fraction!r} / merge_min_iou="
                              f"{self.merge_min_iou!r}: must be in (0, 1] / [0, 1]")
        if int(self.merge_min_voxels) < 1:
            raise ConfigError(f"option merge_min_voxels={self.merge_min_voxels!r}: must be >= 1")
        return self

    # -- TOML ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "InferenceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
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
    def from_toml(cls, path: str | Path) -> "InferenceConfig":
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: invalid TOML ({exc})") from None
        data = data.get("inference", data)
        return cls.from_dict(data, str(p))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """TOML text with each option's comment (``None`` values are left commented out)."""
        comments = _field_comments(type(self))
        lines = ["[inference]"]
        for f in fields(self):
            v = getattr(self, f.name)
            if comments.get(f.name):
                lines.append(f"# {comments[f.name]}")
            lines.append(("# " if v is None else "") + f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def with_overrides(self, **kw: Any) -> "InferenceConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        return dataclasses.replace(self, **kw).validate()


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

