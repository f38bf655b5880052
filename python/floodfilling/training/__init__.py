"""Training, one concern per module (each imports only those listed before it, and layers 1-2
of the package, see ARCHITECTURE.md):

- :mod:`.partitions`: partition volumes and balanced coordinates (``ffn prepare``).
- :mod:`.examples`: FOV-moving training examples (the reference's 0.95 / 0.05 / 0.9 from config).
- :mod:`.options`: :class:`TrainOptions`, :class:`TrainVolume` and their checks (messages name the flags).
- :mod:`.volumes`: the training volumes read, checked, normalised each by its own statistics, and
  the examples drawn from several of them (:class:`~.volumes.VolumeMix`).
- :mod:`.checkpoints`: ``checkpoint/state.pt`` and ``model.npz``, atomically; the resume key.
- :mod:`.metrics`: ``metrics.csv``, ``metrics.png``, TensorBoard.
- :mod:`.distributed`: DDP set-up and teardown under ``mpiexec``.
- :mod:`.train`: the resumable loop, validation. :mod:`.cli`: the ``ffn prepare`` / ``ffn train`` flags.

The names below are imported lazily, so that building the ``ffn`` parser does not import torch.
The training function is ``floodfilling.training.train.train`` (``floodfilling.training.train``
is its module).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExampleSource": "examples", "ExampleStream": "examples", "Geometry": "examples",
    "move_offsets": "examples", "run_sequences": "examples",
    "DEFAULT_THRESHOLDS": "partitions", "build_coordinates": "partitions", "compute_partitions": "partitions",
    "prepare": "partitions",
    "TrainError": "options", "TrainOptions": "options", "TrainVolume": "options", "TrainResult": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
