"""Scale-out inference: ``[mpiexec -n N] ffn segment IMAGE OUT --block z,y,x`` (:func:`segment_blocks`).

Modules, one concern each, and what each may import from this package (at run time; a
module may name a higher one's types under ``TYPE_CHECKING``):

- :mod:`.blocks`: the block grid (cores, halos, outer boxes, overlapping pairs). Nothing.
- :mod:`.mpi`: rank/size and the few collectives (mpi4py under ``mpiexec``, else one process). Nothing.
- :mod:`.reconcile`: overlap matching, union-find, global relabelling. ``blocks``.
- :mod:`.split`: ``split_components`` across blocks (core components, face joins). ``blocks``.
- :mod:`.blockstore`: the per-block result file ``DIR/blocks/<name>.h5`` (write, read region,
  metadata, status summary). ``blocks``.
- :mod:`.output`: the HDF5/zarr output (create, write cores serially / pwrite in parallel /
  zarr, commit = rename, discard on error). ``blockstore``, ``split``, ``reconcile``.
- :mod:`.workdir`: the :class:`~.workdir.Plan`, manifest, workdir lock ``run.json``, cleanup of
  what a killed run left, ``reconcile.json``. ``blocks``, ``blockstore``, ``output``, ``reconcile``.
- :mod:`.prefetch`: items claimed in order and prepared ahead by background threads (generic:
  a claim and a prepare function). Nothing.
- :mod:`.worker`: claims, blocks prepared ahead (read, normalise, seeds) and run through the
  engine on each rank. ``blocks``, ``blockstore``, ``mpi``, ``prefetch``, ``workdir``.
- :mod:`.labels`: the reconcile phase (pairs over ranks, union-find, split components) from
  block results to the :class:`~.labels.FinalLabels` the output is written from. ``blockstore``,
  ``mpi``, ``reconcile``, ``split``, ``workdir``.
- :mod:`.refine`: ``--refine`` on the reconciled flood, the blocks as tiles (tables on rank 0;
  cores, gap floods and tiles over ranks, saved in ``DIR/refine-<digest>/``). ``blockstore``,
  ``mpi``, ``reconcile``, ``split``.
- :mod:`.run`: :func:`~.run.segment_blocks`, the four phases plan, blocks, reconcile, write
  (with ``--refine``, refine between reconcile and write). Any.
- :mod:`.status`: ``ffn status WORKDIR`` (reads the workdir only). ``blocks``, ``blockstore``, ``workdir``.

The data path of ``ffn segment --block`` (``DIR`` = ``--workdir``, default ``OUT.blocks``)::

    IMAGE --plan (rank 0)--> Plan + DIR/manifest.json, DIR/run.json, output lock
          --worker (every rank: claim DIR/claims/<name>, prefetch threads: read, normalise,
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
