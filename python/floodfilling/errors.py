"""The error every volume, box and write of the package raises: :class:`VolumeError`, a
``ValueError`` whose message is one line naming the file and dataset (or the parameter), so a
command line can print it as is. Defined here, below :mod:`floodfilling.boxes` (whose
:class:`~floodfilling.boxes.ParameterError` is one), :mod:`floodfilling.volumes`,
:mod:`floodfilling.disk` and :mod:`floodfilling.storage`, which all raise it.
"""

from __future__ import annotations

__all__ = ["VolumeError"]


class VolumeError(ValueError):
    """A volume cannot be addressed, opened, read or written as asked (one-line message)."""
