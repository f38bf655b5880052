"""Scale-out inference: overlapping blocks (:mod:`.blocks`), dynamic scheduling over MPI ranks
with resumable per-block results (:mod:`.run`), overlap reconciliation (:mod:`.reconcile`).

Entry point: :func:`floodfilling.distributed.run.segment_blocks` (``ffn segment --block``).
"""

from .blocks import Block, BlockError, BlockGrid, make_grid, parse_zyx
from .reconcile import MergeRule, match_overlap

__all__ = ["Block", "BlockError", "BlockGrid", "make_grid", "parse_zyx", "MergeRule", "match_overlap",
           "segment_blocks"]


def segment_blocks(*args, **kwargs):
    """See :func:`floodfilling.distributed.run.segment_blocks` (imported lazily: it pulls in torch)."""
    from .run import segment_blocks as _sb

    return _sb(*args, **kwargs)
