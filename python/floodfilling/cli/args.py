"""Argument parsing shared by every command of ``ffn`` (this package is the only place that knows
flag names and parses text): the parser whose errors are one line, ``z,y,x`` and ``--bbox``
values, the library parameters' flags (:func:`with_flags`), and the ranges of numeric flags
checked before any work (:func:`check_numbers`)."""

from __future__ import annotations

import argparse
import re


class _Parser(argparse.ArgumentParser):
    """Argument errors (``--threads abc``, a missing argument) as one line ``ffn: error: ...``
    and exit status 2, like every other error the user can fix (no usage block)."""

    def error(self, message: str):
        msg = " ".join(str(message).split())
        self.exit(2, f"ffn: error: {msg}\n")


# Library parameters and the flags that set them (training's: cli.train.flags); see
# boxes.ParameterError for how messages name parameters.
_FLAGS = {"bbox": "--bbox", "block": "--block", "halo": "--halo", "workdir": "--workdir", "inflight": "--inflight",
          "overwrite": "--overwrite", "device": "--device", "box": "--box", "min_contact": "--min-contact",
          "merge_iou": "--merge-iou", "within": "--within", "min_size": "--min-size", "levels": "--levels",
          "layer_type": "--type", "resolution_zyx": "--resolution",
          "parallel": "--parallel", "join": "--join"}
# A parameter in keyword form, ``name=`` (``name=True``: a switch), not inside a path or a word, and
# not an ``option name=`` of the inference config (set by --set).
_KEYWORD = re.compile(r"(?<![\w.:/-])(?<!option )([a-z][a-z0-9_]*)=(True\b)?")


def with_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each library parameter it names in keyword form that ``flags`` has a flag
    for written as that flag: ``block=8,8,8: ...`` -> ``--block 8,8,8: ...``, ``pass
    overwrite=True`` -> ``pass --overwrite`` (the convention: :class:`floodfilling.boxes.ParameterError`)."""

    def flag(m: re.Match) -> str:
        name = flags.get(m.group(1))
        if name is None:
            return m.group(0)
        return name if m.group(2) else name + " "

    return _KEYWORD.sub(flag, message)


def zyx_arg(text: str) -> tuple[int, int, int]:
    """An argparse type: ``"z,y,x"`` (or one integer for every axis) as 3 integers (the library
    checks their range)."""
    try:
        vals = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers (or one integer), got {text!r}") from None
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers (or one integer), got {text!r}")
    return vals[0], vals[1], vals[2]


def _bbox(text: str | None):
    """``--bbox z0,y0,x0:z1,y1,x1`` as a BBox (None: the whole volume)."""
    from ..boxes import BBox

    if text is None:
        return None
    try:
        return BBox.parse(text)
    except ValueError as exc:
        raise ValueError(f"--bbox {text}: {exc}") from None


# Range of each numeric flag (by its argparse dest, every command), checked before any work (see
# check_numbers); flags not listed are only kept within int64 (integers) or finite (floats), their
# other limits are the library's (sizes, boxes: named by with_flags). The resource caps are
# config's (MAX_THREADS ...: fixed, so that a command means the same on every machine).
def _flag_bounds() -> dict[str, tuple]:
    from ..config import MAX_INFLIGHT, MAX_THREADS

    return {"threads": (0, True, MAX_THREADS, True),
            "inflight": (None, False, MAX_INFLIGHT, True),  # >= 1: the library's check (engine.check_inflight)
            "seed": (0, True, 2**32 - 1, True),  # numpy's seeds
            "port": (0, True, 65535, True), "levels": (0, True, 32, True),
            "parallel": (0, True, 1024, True), "skeleton_dust": (0, True, None, False),  # 2^32-fold downsampling is one voxel
            "checkpoint_interval": (0, True, None, False), "checkpoint_secs": (0, True, None, False)}


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag of ``args`` (ints, floats, z,y,x tuples, repeated flags) within its range
    (:func:`_flag_bounds`; integers within int64, floats finite): a ValueError ``--flag VALUE:
    expected ...`` otherwise, before any work (nothing out of range reaches numpy, h5py or torch)."""
    from ..config import ConfigError, check_type

    bounds = _flag_bounds()
    if getattr(args, "command", None) == "train":  # training's own ranges (its library checks them too)
        from ..training.options import option_bounds

        bounds.update(option_bounds())
    for dest, value in vars(args).items():
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
                kind, shown = tuple[int, ...], ",".join(map(str, v))
            elif isinstance(v, int):
                kind, shown = int, str(v)
            elif isinstance(v, float):
                kind, shown = float, str(v)
            elif isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
                kind, shown = tuple[float, ...], ",".join(map(str, v))
            else:
                continue
            if dest == "verbose":
                continue
            try:
                check_type(dest, v, kind, bounds.get(dest), label=f"--{dest.replace('_', '-')} {shown}")
            except ConfigError as exc:
                raise ValueError(str(exc).replace("a list of ", "")) from None
