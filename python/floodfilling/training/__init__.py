"""Training: partition volumes and balanced coordinates (:mod:`.partitions`), FOV-moving
examples (:mod:`.examples`), the resumable / distributed training loop (:mod:`.train`,
:mod:`.distributed`) and the ``ffn prepare`` / ``ffn train`` commands (:mod:`.cli`).

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
    "TrainError": "train", "TrainOptions": "train", "TrainResult": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
