"""The FFN network (``ConvStack3D``), weight import/export and device selection.

Tensor layout: inputs are ``(N, C, z, y, x)`` with ``C = 2`` channels in this order:
the normalised image and the seed logits. The network returns *logits*
``seed_logits + update`` with shape ``(N, 1, z, y, x)`` ("same" convolutions: the
prediction covers the whole FOV).

Model files are ``.npz`` archives holding the reference's TF-layout arrays
(``conv0_a/weights`` ``[kz, ky, kx, in, out]``, ``conv0_a/biases`` ...) plus a
``__meta__`` entry (UTF-8 JSON as uint8) with the architecture, geometry, inference
settings and the intensity statistics the model was trained with. The bundled FIB-25
model (google/ffn, Apache-2.0) ships in ``floodfilling/models/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import disk
from .boxes import ParameterError
from .config import FLOAT32_MAX, FLOAT32_TINY

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "fib25_convstack3d_depth12.npz"


class ModelError(ValueError):
    """An unusable model file (missing arrays, wrong shapes, unknown architecture)."""


class ConvStack3D(nn.Module):
    """The reference "convstack_3d" FFN.

    conv0_a (in->F, ReLU) -> conv0_b (F->F) -> (depth-1) x residual module
    ``x = x + conv_i_b(relu(conv_i_a(relu(x))))`` -> ReLU -> conv_lom 1x1x1 (F->1).
    The output is an additive update of the seed channel (``logits = seed + update``).
    """

    def __init__(self, depth: int = 12, features: int = 32, in_channels: int = 2):
        super().__init__()
        if depth < 1:
            raise ModelError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.features = features
        self.in_channels = in_channels
        self.conv0_a = nn.Conv3d(in_channels, features, 3, padding=1)
        self.conv0_b = nn.Conv3d(features, features, 3, padding=1)
        self.res_a = nn.ModuleList(nn.Conv3d(features, features, 3, padding=1) for _ in range(depth - 1))
        self.res_b = nn.ModuleList(nn.Conv3d(features, features, 3, padding=1) for _ in range(depth - 1))
        self.conv_lom = nn.Conv3d(features, 1, 1)

    def forward(self, image: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """``image``, ``seed``: (N, 1, z, y, x). Returns logits (N, 1, z, y, x)."""
        x = torch.cat([image, seed], dim=1)
        x = torch.relu(self.conv0_a(x))
        x = self.conv0_b(x)
        for ca, cb in zip(self.res_a, self.res_b):
            x = x + cb(torch.relu(ca(torch.relu(x))))
        x = torch.relu(x)
        return seed + self.conv_lom(x)

    # -- reference weight names ------------------------------------------------
    def _named_convs(self):
        yield "conv0_a", self.conv0_a
        yield "conv0_b", self.conv0_b
        for i, (ca, cb) in enumerate(zip(self.res_a, self.res_b), start=1):
            yield f"conv{i}_a", ca
            yield f"conv{i}_b", cb
        yield "conv_lom", self.conv_lom

    def load_reference_arrays(self, arrays: dict[str, np.ndarray], source: str = "<arrays>") -> None:
        """Loads TF-layout arrays ``name/weights`` [kz,ky,kx,in,out] and ``name/biases``."""
        expected = set()
        for name, conv in self._named_convs():
            wk, bk = f"{name}/weights", f"{name}/biases"
            expected |= {wk, bk}
            if wk not in arrays or bk not in arrays:
                raise ModelError(f"{source}: missing array {wk!r} or {bk!r} for a depth-{self.depth} model")
            w = np.asarray(arrays[wk], dtype=np.float32)
            want = tuple(conv.weight.shape[2:]) + (conv.in_channels, conv.out_channels)
            if w.shape != want:
                raise ModelError(f"{source}: {wk} has shape {w.shape}, expected {want}")
            b = np.asarray(arrays[bk], dtype=np.float32)
            if b.shape != (conv.out_channels,):
                raise ModelError(f"{source}: {bk} has shape {b.shape}, expected ({conv.out_channels},)")
            for key, arr in ((wk, w), (bk, b)):  # float32 as loaded: overflow to inf counts too
                if not np.isfinite(arr).all():
                    bad = ~np.isfinite(arr)
                    raise ModelError(f"{source}: array {key} holds {int(bad.sum())} NaN/inf value(s) (first bad "
                                     f"array); the model is unusable (diverged training?)")
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(4, 3, 0, 1, 2))))
                conv.bias.copy_(torch.from_numpy(b))
        extra = sorted(k for k in arrays if k not in expected and not k.startswith("__"))
        if extra:
            raise ModelError(f"{source}: unexpected arrays {extra[:4]} (is this a deeper model?)")

    def reference_arrays(self) -> dict[str, np.ndarray]:
        """The inverse of :meth:`load_reference_arrays`."""
        out = {}
        for name, conv in self._named_convs():
            w = conv.weight.detach().cpu().numpy()
            out[f"{name}/weights"] = np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))
            out[f"{name}/biases"] = conv.bias.detach().cpu().numpy().copy()
        return out


@dataclass
class ModelInfo:
    """Everything about a model file besides its weights (zyx order throughout)."""

    depth: int = 12
    features: int = 32
    fov_zyx: tuple[int, int, int] = (33, 33, 33)
    deltas_zyx: tuple[int, int, int] = (8, 8, 8)
    # Intensity statistics of the training data: the image is fed as (x - mean) / std.
    image_mean: float = 128.0
    image_std: float = 33.0
    # Quantiles of the training intensities (for histogram matching), or None.
    intensity_quantiles: list[float] | None = None
    # Whether image_mean/std were recorded in the file (False: reference fallback).
    stats_recorded: bool = True
    # Inference settings the model was trained for (probabilities, as in the reference).
    inference: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def bundled_model_path() -> Path:
    """Path of the bundled FIB-25 model (google/ffn weights, Apache-2.0)."""
    return Path(str(resources.files("floodfilling") / "models" / BUNDLED_MODEL_NAME))


def _parse_meta(raw: Any, source: str) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(np.asarray(raw, dtype=np.uint8)).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise ModelError(f"{source}: __meta__ is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{source}: __meta__ is a JSON {_json_kind(meta)}, expected an object (a table of fields)")
    return meta


# -- the schema of __meta__ ------------------------------------------------------------------------
# Every field a model file's metadata may hold: its type and range (lengths of lists), checked on
# load (check_meta) so that a malformed file is one ModelError naming the file and the field, never
# a traceback or a silently wrong model. Provenance fields (free text, the training record) are only
# typed; a field not listed is refused (a misspelt "fov_zxy" would silently give the default FOV).
MAX_DEPTH = 1024  # residual modules; each is two convolutions' weights in the file
MAX_FEATURES = 4096  # feature maps per convolution
MAX_FOV = 1023  # FOV voxels per axis (the bundled model's: 33)
_STD_RANGE = (FLOAT32_TINY, FLOAT32_MAX)  # float32: the network's precision
_MEAN_RANGE = (-FLOAT32_MAX, FLOAT32_MAX)


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "list"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    return "number"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Field:
    """One field of __meta__: ``check(value) -> None`` or the words of what it expects."""

    def __init__(self, expected: str, ok):
        self.expected, self.ok = expected, ok


def _int_in(lo: int, hi: int) -> _Field:
    return _Field(f"an integer in [{lo}, {hi}]", lambda v: _is_int(v) and lo <= v <= hi)


def _num_in(lo: float, hi: float, lo_open: bool = False, what: str = "a finite number") -> _Field:
    return _Field(f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}]",
                  lambda v: _is_num(v) and (lo < v if lo_open else lo <= v) and v <= hi)


def _ints3(lo: int, hi: int, odd: bool = False) -> _Field:
    words = f"3 {'odd ' if odd else ''}integers in [{lo}, {hi}]"
    return _Field(words, lambda v: isinstance(v, list) and len(v) == 3 and all(
        _is_int(x) and lo <= x <= hi and (not odd or x % 2 == 1) for x in v))


def _quantiles(v: Any) -> bool:
    from .normalise import N_QUANTILES

    return v is None or (isinstance(v, list) and len(v) == N_QUANTILES and all(_is_num(x) for x in v)
                         and all(a <= b for a, b in zip(v, v[1:])))


_ANY = _Field("any JSON value", lambda v: True)
_TEXT = _Field("a string", lambda v: isinstance(v, str))
_PROB = _num_in(0.0, 1.0, lo_open=True, what="a probability")
META_SCHEMA: dict[str, _Field] = {
    "model": _Field('"convstack_3d" (any other is an unsupported architecture)', lambda v: v == "convstack_3d"),
    "depth": _int_in(1, MAX_DEPTH),
    "features": _int_in(1, MAX_FEATURES),
    "fov_zyx": _ints3(3, MAX_FOV, odd=True),
    "fov_size_xyz": _ints3(3, MAX_FOV, odd=True),
    "deltas_zyx": _ints3(0, MAX_FOV // 2),
    "deltas_xyz": _ints3(0, MAX_FOV // 2),
    "intensity": _Field("an object {mean, std, quantiles}", lambda v: isinstance(v, dict)),
    "inference_settings": _Field("an object", lambda v: isinstance(v, dict)),
    # provenance (the reference's conversion and this package's training)
    "source": _TEXT, "trained_on": _TEXT, "weight_layout": _TEXT, "architecture": _TEXT,
    "global_step": _int_in(0, 2**63 - 1), "trained_steps": _int_in(0, 2**63 - 1),
    "input_channels": _Field("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "training": _Field("an object", lambda v: isinstance(v, dict)),
}
INTENSITY_SCHEMA: dict[str, _Field] = {
    "mean": _num_in(*_MEAN_RANGE),
    "std": _num_in(*_STD_RANGE),
    "quantiles": _Field("null or 101 non-decreasing finite numbers", _quantiles),
}
# inference_settings: a record of the reference's settings; those known are typed, others kept as they are
INFERENCE_SCHEMA: dict[str, _Field] = {
    "init_activation": _PROB, "pad_value": _PROB, "move_threshold": _PROB, "segment_threshold": _PROB,
    "min_segment_size": _int_in(0, 2**63 - 1), "min_boundary_dist_xyz": _ints3(0, 2**63 - 1),
    "image_mean": _num_in(*_MEAN_RANGE), "image_stddev": _num_in(*_STD_RANGE), "seed_policy": _TEXT,
}


def _shown(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: Any, source: str) -> dict[str, Any]:
    """``meta`` checked against :data:`META_SCHEMA` (and the ``intensity`` / ``inference_settings``
    objects against theirs); a :class:`ModelError` ``SOURCE: __meta__ field NAME=VALUE: expected
    ...`` naming the first bad field otherwise. FOV and deltas given both ways must agree, and the
    deltas fit in the FOV (a move stays inside it)."""
    if not isinstance(meta, dict):
        raise ModelError(f"{source}: __meta__ is a JSON {_json_kind(meta)}, expected an object (a table of fields)")

    def check(table: dict[str, _Field], d: dict, prefix: str, closed: bool) -> None:
        for k, v in d.items():
            f = table.get(k)
            if f is None:
                if closed:
                    raise ModelError(f"{source}: __meta__ has an unknown field {prefix}{k} (known: "
                                     f"{', '.join(table)})")
                continue
            if not f.ok(v):
                raise ModelError(f"{source}: __meta__ field {prefix}{k}={_shown(v)}: expected {f.expected}")

    check(META_SCHEMA, meta, "", closed=True)
    check(INTENSITY_SCHEMA, meta.get("intensity", {}), "intensity.", closed=True)
    check(INFERENCE_SCHEMA, meta.get("inference_settings", {}), "inference_settings.", closed=False)
    for zyx, xyz in (("fov_zyx", "fov_size_xyz"), ("deltas_zyx", "deltas_xyz")):
        if zyx in meta and xyz in meta and list(meta[zyx]) != list(reversed(meta[xyz])):
            raise ModelError(f"{source}: __meta__ fields {zyx}={_shown(meta[zyx])} and {xyz}={_shown(meta[xyz])} "
                             f"disagree (one is the other reversed)")
    return meta


def _xyz_to_zyx(v) -> tuple[int, int, int]:
    return tuple(int(x) for x in reversed(list(v)))  # type: ignore[return-value]


def info_from_meta(meta: dict[str, Any], source: str) -> ModelInfo:
    """Builds ModelInfo from a model file's metadata (reference keys are x, y, z), checked
    against the schema first (:func:`check_meta`)."""
    check_meta(meta, source)
    inf = dict(meta.get("inference_settings", {}))
    fov = meta.get("fov_zyx") or (_xyz_to_zyx(meta["fov_size_xyz"]) if "fov_size_xyz" in meta else (33, 33, 33))
    deltas = meta.get("deltas_zyx") or (_xyz_to_zyx(meta["deltas_xyz"]) if "deltas_xyz" in meta else (8, 8, 8))
    stats = meta.get("intensity", {})
    mean = stats.get("mean", inf.get("image_mean"))
    std = stats.get("std", inf.get("image_stddev"))
    recorded = mean is not None and std is not None
    if not recorded:
        log.warning("%s records no intensity statistics; using the reference's mean 128, std 33", source)
        mean, std = 128.0, 33.0
    info = ModelInfo(
        depth=int(meta.get("depth", 12)),
        features=int(meta.get("features", 32)),
        fov_zyx=tuple(int(v) for v in fov),  # type: ignore[arg-type]
        deltas_zyx=tuple(int(v) for v in deltas),  # type: ignore[arg-type]
        image_mean=float(mean),
        image_std=float(std),
        intensity_quantiles=stats.get("quantiles"),
        stats_recorded=recorded,
        inference=inf,
        source=source,
        meta=meta,
    )
    if any(d > f // 2 for d, f in zip(info.deltas_zyx, info.fov_zyx)):
        name = "deltas_zyx" if "deltas_zyx" in meta else "deltas_xyz"
        raise ModelError(f"{source}: __meta__ field {name}={_shown(meta[name])}: a move of more than half the FOV "
                         f"{list(info.fov_zyx)} (z, y, x; rounded down) leaves the FOV")
    return info


def check_arrays_match(info: ModelInfo, arrays: dict[str, np.ndarray], source: str) -> None:
    """The metadata's depth and features against the arrays the file holds, before a network of
    that size is built (a depth of 1000 in __meta__ of a depth-12 file: one line, no allocation)."""
    held = {k.split("/")[0] for k in arrays if k.endswith("/weights")}
    modules = sum(1 for k in held if k.startswith("conv") and k.endswith("_a") and k != "conv0_a")
    if "conv0_a" in held and modules + 1 != info.depth:
        raise ModelError(f"{source}: __meta__ field depth={info.depth} but the file holds the weights of a "
                         f"depth-{modules + 1} network")
    w = arrays.get("conv0_a/weights")
    if w is not None and np.ndim(w) == 5 and w.shape[-1] != info.features:
        raise ModelError(f"{source}: __meta__ field features={info.features} but conv0_a/weights has "
                         f"{w.shape[-1]} output features")


def model_file(path: str | os.PathLike | None = None) -> Path:
    """The file :func:`load_model` reads for ``path`` (``None``: the bundled model; a directory:
    its ``model.npz`` or ``checkpoint/model.npz``)."""
    p = bundled_model_path() if path is None else Path(path)
    if p.is_dir():
        cand = next((c for c in (p / "model.npz", p / "checkpoint" / "model.npz") if c.exists()), None)
        if cand is None:
            raise ModelError(f"{p}: directory holds no model.npz (nor checkpoint/model.npz of a training run)")
        p = cand
    if not p.exists():
        raise ModelError(f"model file {p} does not exist")
    return p


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[ConvStack3D, ModelInfo]:
    """Loads a model file (``.npz``), a directory holding ``model.npz``, or a training run's
    directory (its latest weights, ``checkpoint/model.npz``).

    ``path=None`` loads the bundled FIB-25 model. Returns the network in eval mode on
    ``device`` and its :class:`ModelInfo`.
    """
    p = model_file(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise ModelError(f"{p}: not a readable .npz model file ({exc.__class__.__name__}: {exc})") from None
    meta = _parse_meta(arrays.pop("__meta__"), str(p)) if "__meta__" in arrays else {}
    if not meta:
        log.warning("%s has no __meta__; assuming the reference FIB-25 geometry", p)
    info = info_from_meta(meta, str(p))
    check_arrays_match(info, arrays, str(p))
    net = ConvStack3D(depth=info.depth, features=info.features)
    net.load_reference_arrays(arrays, str(p))
    net.eval()
    net = net.to(select_device(device))
    return net, info


def save_model(path: str | os.PathLike, net: ConvStack3D, meta: dict[str, Any]) -> None:
    """Writes ``net`` in the reference layout with ``meta`` as ``__meta__`` (atomically)."""
    arrays = net.reference_arrays()
    meta = dict(meta, model="convstack_3d", depth=net.depth, features=net.features)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    disk.atomic_write_npz(Path(path), **arrays)  # a full disk: one line, nothing left behind


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then xpu, then cpu. An unavailable device is a
    :class:`~floodfilling.boxes.ParameterError` (a ValueError) naming ``device``."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _xpu_available():
            return torch.device("xpu")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", device, f"device={device}: this torch build has no usable CUDA device")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError("device", device,
                                 f"device={device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    if kind == "xpu":
        if not _xpu_available():
            raise ParameterError("device", device, f"device={device}: no Intel XPU device (torch.xpu) is available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.xpu.device_count():
            raise ParameterError("device", device,
                                 f"device={device}: only {torch.xpu.device_count()} XPU device(s) visible")
        return dev
    raise ParameterError("device", device, f"device={device!r}: expected auto, cpu, cuda[:N] or xpu[:N]")


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    try:  # Older torch: Intel Extension for PyTorch provides the device.
        import intel_extension_for_pytorch  # noqa: F401

        return bool(getattr(torch, "xpu", None) and torch.xpu.is_available())
    except ImportError:
        return False


def prepare_for_inference(net: ConvStack3D, device: torch.device) -> ConvStack3D:
    """Channels-last 3-D memory format (fastest for Conv3d on CPU and GPU)."""
    return net.to(device=device, memory_format=torch.channels_last_3d)
