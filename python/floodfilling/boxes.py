"""Boxes of voxels and typed parameters: :class:`BBox`, the half-open box ``[start, stop)``
of a (z, y, x) volume, with its text form ``"z0,y0,x0:z1,y1,x1"``; :func:`box_in` (a box
checked against a volume's shape) and :func:`check_zyx` (3 integers z, y, x); and
:class:`ParameterError`, the error of a bad library parameter, with the convention every
library message follows to name a parameter (``name=value``).

Geometry, everywhere in the package: arrays are indexed (z, y, x); a box includes ``start``
and excludes ``stop`` on each axis, as Python slices do (``shape = stop - start``). Text such
as ``"8,8,8"`` or ``"0,0,0:64,128,128"`` is parsed by the command line (:mod:`floodfilling.cli`)
and :meth:`BBox.parse`; the library takes typed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import VolumeError

__all__ = ["BBox", "ParameterError", "box_in", "check_zyx"]


def _int3(value: Any, what: str) -> tuple[int, int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}")
    out = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what} must be 3 integers (z, y, x), got {value!r}")
        out.append(int(v))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class BBox:
    """A half-open box ``[start, stop)`` of voxels, coordinates (z, y, x).

    ``start`` is the first voxel inside, ``stop`` the first voxel past the end on each axis, as
    in Python slices; ``shape = stop - start``::

        index:    0   1   2   3   4   5
                +---+---+---+---+---+---+
                |   | # | # | # |   |   |    start=1, stop=4: voxels 1, 2, 3
                +---+---+---+---+---+---+    shape = 4 - 1 = 3
                    ^           ^
                  start        stop (not included)

    Text form (``parse``/``str``): ``"z0,y0,x0:z1,y1,x1"``, e.g. ``"0,0,0:64,128,128"``.
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _int3(self.start, "BBox start"))
        object.__setattr__(self, "stop", _int3(self.stop, "BBox stop"))

    @classmethod
    def parse(cls, text: str) -> "BBox":
        """Parse ``"z0,y0,x0:z1,y1,x1"`` (whitespace allowed)."""
        parts = str(text).split(":")
        if len(parts) != 2:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'")
        try:
            start = [int(v) for v in parts[0].split(",")]
            stop = [int(v) for v in parts[1].split(",")]
        except ValueError:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'") from None
        if len(start) != 3 or len(stop) != 3:
            raise ValueError(f"bbox '{text}' must look like 'z0,y0,x0:z1,y1,x1'")
        return cls(tuple(start), tuple(stop))

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> "BBox":
        """The box covering a whole volume of ``shape``."""
        return cls((0, 0, 0), _int3(shape, "shape"))

    def __str__(self) -> str:
        return "{},{},{}:{},{},{}".format(*self.start, *self.stop)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``stop - start`` per axis (may be <= 0 for an invalid box)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        """Number of voxels (0 when empty)."""
        z, y, x = self.shape
        return max(z, 0) * max(y, 0) * max(x, 0)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """``(slice(z0, z1), slice(y0, y1), slice(x0, x1))`` for indexing a (z, y, x) array."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def validate(self, shape: Sequence[int]) -> "BBox":
        """Return ``self`` if it is non-empty and inside a volume of ``shape``, else raise
        ``ValueError`` naming the box and the volume shape."""
        vshape = _int3(shape, "volume shape")
        if self.empty:
            raise ValueError(f"bbox {self} is empty (shape {self.shape}); volume shape {vshape}")
        if any(a < 0 for a in self.start) or any(b > s for b, s in zip(self.stop, vshape)):
            raise ValueError(f"bbox {self} is outside the volume of shape {vshape}")
        return self

    def clip(self, shape: Sequence[int]) -> "BBox":
        """The part of the box inside a volume of ``shape``; ``ValueError`` (naming the box and
        the volume shape) if nothing is left."""
        vshape = _int3(shape, "volume shape")
        start = tuple(max(a, 0) for a in self.start)
        stop = tuple(min(b, s) for b, s in zip(self.stop, vshape))
        out = BBox(start, stop)  # type: ignore[arg-type]
        if out.empty:
            raise ValueError(
                f"bbox {self} does not overlap the volume of shape {vshape} (or is empty)"
            )
        return out


class ParameterError(VolumeError):
    """A bad value ``value`` of the library parameter ``param``.

    How errors name parameters, here and in every library error message (whatever its class):
    in keyword form, as a caller of the library writes them, ``name=value`` (a placeholder in
    capitals where there is no value: ``workdir=DIR``), and a switch to set as ``name=True``. A
    ParameterError's message starts with its parameter (``block=8,48,48: z size 8 is smaller
    than ...``); a hint reads ``pass overwrite=True``; text that only describes a value does not
    use ``=`` (``the model has depth 1``). Options of
    :class:`floodfilling.config.InferenceConfig` are ``option name=value`` (set by TOML or
    ``--set`` alike). The command line, the one place that knows flags, shows each ``name=`` of
    a parameter it has a flag for as the flag (``--block 8,48,48: ...``, ``pass --overwrite``)
    through its tables of flags (:func:`floodfilling.cli.with_flags`); no message names a flag.
    """

    def __init__(self, param: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.param, self.value = param, value


def box_in(bbox: BBox | None, shape: Sequence[int], param: str = "bbox") -> BBox:
    """``bbox`` checked against a volume of ``shape`` (the whole volume when None);
    :class:`ParameterError` naming ``param`` when it is empty or reaches outside."""
    if bbox is None:
        return BBox.from_shape(shape)
    if not isinstance(bbox, BBox):
        raise ParameterError(param, bbox, f"{param}={bbox!r}: expected a BBox (parse text with BBox.parse)")
    try:
        return bbox.validate(shape)
    except ValueError as exc:
        raise ParameterError(param, bbox, f"{param}={bbox}: {exc}") from None


def check_zyx(value: Any, param: str, minimum: int = 0) -> tuple[int, int, int]:
    """``value`` as 3 integers (z, y, x) >= ``minimum``; :class:`ParameterError` naming ``param``
    otherwise (text such as ``"8,8,8"`` is the command line's to parse)."""
    try:
        zyx = _int3(value, param)
    except ValueError:
        zyx = None
    if zyx is None or min(zyx) < minimum:
        shown = ",".join(map(str, zyx)) if zyx else repr(value)
        raise ParameterError(param, value, f"{param}={shown}: expected 3 integers >= {minimum} (z, y, x)")
    return zyx
