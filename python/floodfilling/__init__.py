"""floodfilling: Flood-Filling Networks for connectomics.

Exact reference inference (google/ffn semantics), a multi-subvolume engine, training
and MPI scale-out. Arrays are indexed (z, y, x) everywhere.

The public API (each name is imported on first use, so ``import floodfilling`` stays light):

- :func:`segment` (``ffn segment``): a volume in one process, the exact flood, optionally refined;
- :func:`segment_array`: the same on an in-memory array;
- :func:`segment_blocks` (``ffn segment --block``): block by block, under ``mpiexec`` or not;
- :func:`refine`: the refinement of a flood's segmentation (rejoin, gap objects, watershed);
- :func:`evaluate` (``ffn evaluate``): VI split / merge and adapted Rand error against labels;
- :func:`train` (``ffn train``): train a network;
- the option classes :class:`InferenceConfig`, :class:`RefineConfig`, :class:`TrainOptions`
  (the ``[inference]`` and ``[refine]`` tables of a config file; ``ffn train``'s flags).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "segment": ("floodfilling.inference.segment", "segment"),
    "segment_array": ("floodfilling.inference.segment", "segment_array"),
    "segment_blocks": ("floodfilling.distributed.run", "segment_blocks"),
    "refine": ("floodfilling.inference.refine", "refine_array"),
    "evaluate": ("floodfilling.evaluation", "evaluate"),
    "train": ("floodfilling.training.train", "train"),
    "InferenceConfig": ("floodfilling.config", "InferenceConfig"),
    "RefineConfig": ("floodfilling.config", "RefineConfig"),
    "TrainOptions": ("floodfilling.training.options", "TrainOptions"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'floodfilling' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
