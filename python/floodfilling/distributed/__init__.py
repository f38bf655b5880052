"""Scale-out inference: ``[mpiexec -n N] ffn segment IMAGE OUT --block z,y,x`` (:func:`segment_blocks`).

Modules, one concern each, and what each may import from this package (at run time; a
module may name a higher one's types under ``TYPE_CHECKING``). The block grid itself is
geometry, below both runners (:mod:`floodfilling.geometry`); the result format and its one
writer are :mod:`floodfilling.results`'.

- :mod:`.mpi`: rank/size and the few collectives (mpi4py under ``mpiexec``, else one process). Nothing.
- :mod:`.reconcile`: overlap matching, union-find, global relabelling. Nothing.
- :mod:`.split`: ``split_components`` across blocks (core components, face joins). Nothing.
- :mod:`.blockstore`: the format of the per-block result file (write, read region, metadata,
  status summary). Nothing.
- :mod:`.bookkeeper`: the workdir: every path in it (:class:`~.bookkeeper.Layout`), and the
  claim / done / cleanup of work items (:class:`~.bookkeeper.Stage`: the blocks and each
  refinement stage, claimed dynamically). ``blockstore``.
- :mod:`.output`: which blocks' cores go where in the output, through the result writer
  (create on rank 0, cores from every rank, commit, discard on error). ``blockstore``, ``split``,
  ``reconcile``.
- :mod:`.workdir`: the :class:`~.workdir.Plan` and what ties the workdir to it (manifest with the
  image digest, workdir lock ``run.json``). ``bookkeeper``, ``output``, ``reconcile``.
- :mod:`.prefetch`: items claimed in order and prepared ahead by background threads (generic:
  a claim and a prepare function). Nothing.
- :mod:`.worker`: blocks claimed (bookkeeper), prepared ahead (read, normalise, seeds) and run
  through the engine on each rank. ``blockstore``, ``mpi``, ``prefetch``, ``workdir``.
- :mod:`.labels`: the reconcile phase (pairs over ranks, union-find, split components) from
  block results to the :class:`~.labels.FinalLabels` the output is written from. ``blockstore``,
  ``mpi``, ``reconcile``, ``split``, ``workdir``.
- :mod:`.refine`: ``--refine`` on the reconciled flood, the blocks as tiles (tables on rank 0;
  cores, gap floods and tiles as the bookkeeper's stages). ``blockstore``, ``bookkeeper``,
  ``mpi``, ``reconcile``, ``split``.
- :mod:`.learned`: ``--refine --refine-model`` on the reconciled flood, the blocks as tiles
  (gap cores, base and contact statistics per tile as the bookkeeper's stages; the merges on
  rank 0). ``bookkeeper``, ``mpi``, ``refine``, ``split``.
- :mod:`.run`: :func:`~.run.segment_blocks`, the four phases plan, blocks, reconcile, write
  (with ``--refine``, refine between reconcile and write). Any.
- :mod:`.status`: ``ffn status WORKDIR`` (reads the workdir through the bookkeeper only).
  ``blockstore``, ``bookkeeper``, ``workdir``.

The data path of ``ffn segment --block`` (``DIR`` = ``--workdir``, default ``OUT.blocks``)::

    IMAGE --plan (rank 0)--> Plan + DIR/manifest.json, DIR/run.json, output lock
          --worker (every rank: claim DIR/claims/<name> (bookkeeper), prefetch threads: read, normalise,
            seeds; engine)--> DIR/blocks/<name>.h5
          --labels (pairs over ranks; union-find on rank 0)--> Reconciled --> FinalLabels
          --output (create on rank 0; cores from every rank)--> OUT.tmp-<run id> --rename--> OUT
"""

from ..geometry import Block, BlockError, BlockGrid, make_grid
from .reconcile import MergeRule, match_overlap

__all__ = ["Block", "BlockError", "BlockGrid", "make_grid", "MergeRule", "match_overlap",
           "segment_blocks"]


def segment_blocks(*args, **kwargs):
    """See :func:`floodfilling.distributed.run.segment_blocks` (imported lazily: it pulls in torch)."""
    from .run import segment_blocks as _sb

    return _sb(*args, **kwargs)
