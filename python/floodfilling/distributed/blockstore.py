"""The per-block result file ``DIR/blocks/<name>.h5`` of block inference.

One file per finished block, written atomically (temp + fsync + rename, so a file that exists is
complete) by the rank that segmented it, read by reconciliation, the output writers and
``ffn status``. Its format::

    seg           (outer box) segmentation, block-local ids 1..max_id (gzip)
    origins       ORIGIN_DTYPE table of the block's objects (outer-box coordinates)
    overlaps      OVERLAP_DTYPE table: voxels each object's flood ran into earlier objects
                  (local ids; read by the rejoin step of ``--refine``)
    core_ids      uint32, sorted local ids present in the core
    core_counts   int64, their voxels in the core
    attrs         core_start, core_stop, outer_start, outer_stop (box coordinates),
                  box_start, max_id, counters (JSON), seconds, manifest (digest), rank, host

This module knows the format only: where a block's file is and what the run means by it is
:mod:`.workdir`'s business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import storage
from ..geometry import Block, BlockError

SUFFIX = ".h5"


def block_file(blocks_dir: str | Path, name: str) -> Path:
    """The result file of the block called ``name`` (:meth:`.blocks.Block.name`)."""
    return Path(blocks_dir) / f"{name}{SUFFIX}"


def count_results(blocks_dir: str | Path) -> int:
    """Finished blocks in ``blocks_dir`` (any run's ranks)."""
    return sum(1 for p in Path(blocks_dir).iterdir() if p.name.endswith(SUFFIX))


def is_temporary(name: str) -> bool:
    """A block file being written (or left by a killed writer)."""
    return ".tmp-" in name


@dataclass
class BlockMeta:
    """What reconciliation needs of a block besides its segmentation."""

    max_id: int
    core_ids: np.ndarray  # sorted local ids present in the core
    core_counts: np.ndarray  # their voxels in the core
    origins: np.ndarray  # ORIGIN_DTYPE, outer-box coordinates
    counters: dict
    seconds: float
    outer_start: tuple[int, int, int]


@dataclass
class BlockSummary:
    """What ``ffn status`` shows of a finished block."""

    seconds: float
    counters: dict
    host: str
    rank: int


def write_block(path: Path, block: Block, box_start: Sequence[int], seg: np.ndarray, origins: np.ndarray,
                max_id: int, counters: dict[str, float], seconds: float, manifest_digest: str, rank: int,
                host: str, overlaps: np.ndarray) -> None:
    """Writes a block's result file (``seg``: its outer box; ``overlaps``: OVERLAP_DTYPE)."""
    core_ids, core_counts = np.unique(seg[block.core_in_outer], return_counts=True)
    core_ids, core_counts = core_ids[core_ids > 0], core_counts[core_ids > 0]
    storage.write_hdf5_atomic(
        path,
        {"seg": seg, "origins": origins, "core_ids": core_ids.astype(np.uint32),
         "core_counts": core_counts.astype(np.int64), "overlaps": overlaps},
        file_attrs={"core_start": list(block.core_start), "core_stop": list(block.core_stop),
                    "outer_start": list(block.outer_start), "outer_stop": list(block.outer_stop),
                    "box_start": list(box_start), "max_id": int(max_id),
                    "counters": json.dumps(counters), "seconds": seconds, "manifest": manifest_digest,
                    "rank": rank, "host": host},
        overwrite=True, compression="gzip")


def _unreadable(path: Path, exc: Exception) -> BlockError:
    return BlockError(f"{path}: unreadable block result ({exc}); delete it and rerun")


def read_region(path: Path, start, stop) -> np.ndarray:
    """The segmentation of the box ``start:stop`` (box coordinates, inside the outer box)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            outer_start = f.attrs["outer_start"]
            sl = tuple(slice(int(a) - int(o), int(b) - int(o)) for a, b, o in zip(start, stop, outer_start))
            return np.ascontiguousarray(f["seg"][sl])
    except (OSError, KeyError) as exc:
        raise _unreadable(path, exc) from None


def read_meta(path: Path) -> BlockMeta:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return BlockMeta(max_id=int(f.attrs["max_id"]), core_ids=f["core_ids"][:],
                             core_counts=f["core_counts"][:], origins=f["origins"][:],
                             counters=json.loads(f.attrs["counters"]), seconds=float(f.attrs["seconds"]),
                             outer_start=tuple(int(v) for v in f.attrs["outer_start"]))
    except (OSError, KeyError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def read_overlaps(path: Path) -> np.ndarray:
    """The block's overlaps table (OVERLAP_DTYPE, local ids)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f["overlaps"][:]
    except (OSError, KeyError) as exc:
        raise _unreadable(path, exc) from None


def read_summary(path: Path) -> BlockSummary:
    """Tolerant of missing attributes; OSError or ValueError when the file cannot be read (being
    renamed into place, or damaged)."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = f.attrs
        return BlockSummary(seconds=float(attrs.get("seconds", 0.0)),
                            counters=json.loads(attrs.get("counters", "{}")),
                            host=attrs.get("host", "?"), rank=int(attrs.get("rank", -1)))
