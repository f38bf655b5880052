"""The workdir's bookkeeper (floodfilling.distributed.bookkeeper): dynamic claims of work items
(each item to exactly one claimant, done items skipped, a slow claimant takes fewer), what
``ffn status`` reads of them, and the cleanup of a failing or killed run's claims."""

from __future__ import annotations

import os
import threading
import time

from floodfilling.distributed import bookkeeper
from floodfilling.geometry import make_grid


def stage(tmp_path, n=10, name="floods"):
    res, claims = tmp_path / name, tmp_path / "claims" / name
    return bookkeeper.Stage(name, res, claims, n, lambda i: res / f"{i}.h5")


def test_every_item_is_claimed_once_done_items_skipped(tmp_path):
    st = stage(tmp_path)
    st.results.mkdir(parents=True)
    for i in (2, 7):
        st.result(i).write_bytes(b"done")
    a, b = st.claimer("run1", 0, 2), st.claimer("run1", 1, 2)
    got = {"a": [], "b": []}
    while True:
        x, y = a.next(), b.next()
        if x is not None:
            got["a"].append(x)
        if y is not None:
            got["b"].append(y)
        if x is None and y is None:
            break
    assert sorted(got["a"] + got["b"]) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert got["a"][0] == 0 and got["b"][0] == 5  # rank r starts at item r * n / size
    assert st.n_done() == 2
    assert sorted(p.name for p in st.claims.iterdir()) == [str(i) for i in (0, 1, 3, 4, 5, 6, 8, 9)]


def test_preferred_items_first(tmp_path):
    """A rank takes first the items whose inputs it holds (the tiles whose windows it read)."""
    st = stage(tmp_path, n=6)
    st.results.mkdir(parents=True)
    st.result(4).write_bytes(b"done")
    assert list(st.claimed("r", 0, 2, prefer=[4, 5, 2, 9])) == [5, 2, 0, 1, 3]


def test_a_slow_claimant_takes_fewer(tmp_path):
    """Dynamic claims: a rank slow on its first item does not hold up the others (static
    striding would leave it half of the items)."""
    st = stage(tmp_path, n=12)
    taken = {0: [], 1: []}

    def rank(r, seconds):
        for i in st.claimed("run", r, 2):
            taken[r].append(i)
            time.sleep(seconds)
            st.result(i).write_bytes(b"x")

    slow = threading.Thread(target=rank, args=(0, 0.5))
    fast = threading.Thread(target=rank, args=(1, 0.01))
    slow.start()
    fast.start()
    slow.join()
    fast.join()
    assert sorted(taken[0] + taken[1]) == list(range(12))
    assert len(taken[0]) <= 2 and len(taken[1]) >= 10


def test_running_claims_and_cleanup(tmp_path):
    layout = bookkeeper.Layout(tmp_path, (0, 0, 0))
    grid = make_grid((8, 16, 16), (4, 8, 8), (1, 1, 1), (3, 3, 3))
    blocks = bookkeeper.blocks_stage(layout, grid)
    rdir = layout.refine_dir("0123456789abcdef0123")
    stages = bookkeeper.refine_stages(layout, rdir, grid, n_floods=3)
    mine = blocks.claimer("mine", 0, 1)
    assert mine.next() == 0
    other = stages.tiles.claimer("other", 0, 1)
    assert other.next() == 0
    flood = stages.floods.claimer("mine", 0, 1)
    assert flood.next() == 0
    run = blocks.running()
    assert [(c.item, c.run_id, c.pid, c.rank) for c in run] == [(layout.block_name(grid[0]), "mine", str(os.getpid()),
                                                                 "0")]
    assert stages.tiles.running()[0].run_id == "other"
    # a failing run gives back its own claims only, in every stage
    bookkeeper.remove_claims(layout, "mine")
    assert blocks.running() == [] and stages.floods.running() == []
    assert len(stages.tiles.running()) == 1
    # the next run (holding the workdir lock) removes a killed run's claims and keeps its refinement
    bookkeeper.clean_stale(layout, keep_refine=rdir)
    assert stages.tiles.running() == [] and rdir.is_dir()
    bookkeeper.clean_stale(layout, keep_refine=None)  # (another output's refinement goes)
    assert not rdir.exists()
    assert blocks.result(1) == layout.blocks_dir / f"{grid[1].name((0, 0, 0))}.h5"
