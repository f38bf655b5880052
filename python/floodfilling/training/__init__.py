"""Training: partition volumes and balanced coordinates (:mod:`.partitions`), FOV-moving
examples (:mod:`.examples`), the resumable / distributed training loop (:mod:`.train`,
:mod:`.distributed`) and the ``ffn prepare`` / ``ffn train`` commands (:mod:`.cli`)."""

from .examples import ExampleSource, ExampleStream, Geometry, move_offsets, run_sequences
from .partitions import DEFAULT_THRESHOLDS, build_coordinates, compute_partitions, prepare
from .train import TrainError, TrainOptions, TrainResult, train

__all__ = ["DEFAULT_THRESHOLDS", "ExampleSource", "ExampleStream", "Geometry", "TrainError", "TrainOptions",
           "TrainResult", "build_coordinates", "compute_partitions", "move_offsets", "prepare", "run_sequences",
           "train"]
