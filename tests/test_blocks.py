"""Block geometry: cores tile the box, outer = core + halo clipped, neighbour pairs and overlaps
against brute force, option validation."""

import argparse
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floodfilling.cli import zyx_arg
from floodfilling.geometry import BlockError, BlockGrid, axis_bounds, make_grid
from floodfilling.boxes import ParameterError, check_zyx

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_block_and_halo_are_checked_integers():
    assert check_zyx([1, 2, 3], "block", 1) == (1, 2, 3)
    for bad in ("1,2,3", (1, 2), (1.5, 2, 3), (True, 2, 3), None):  # text is the command line's to parse
        with pytest.raises(ParameterError, match="^block=") as e:
            check_zyx(bad, "block", 1)
        assert e.value.param == "block"
    with pytest.raises(ParameterError, match=r"^block=0,4,4: expected 3 integers >= 1"):
        make_grid((48, 96, 96), (0, 4, 4), (6, 6, 6), (9, 9, 9))
    with pytest.raises(ParameterError, match=r"^halo=-1,4,4: expected 3 integers >= 0"):
        make_grid((48, 96, 96), (24, 48, 48), (-1, 4, 4), (9, 9, 9))


def test_zyx_text_is_parsed_by_the_command_line():
    assert zyx_arg("128,256,256") == (128, 256, 256)
    assert zyx_arg(" 8, 9 ,10") == (8, 9, 10)
    assert zyx_arg("32") == (32, 32, 32)
    for bad in ("1,2", "a,b,c", "1,2,3,4", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="Z,Y,X"):
            zyx_arg(bad)


def test_axis_bounds_merges_short_remainder():
    assert axis_bounds(100, 40) == [0, 40, 80, 100]
    assert axis_bounds(100, 40, min_last=33) == [0, 40, 100]  # 20 < 33 joins the previous core
    assert axis_bounds(30, 40) == [0, 30]
    assert axis_bounds(80, 40, min_last=33) == [0, 40, 80]


def test_small_example():
    g = BlockGrid((10, 20, 20), (10, 10, 10), (2, 3, 3))
    assert g.grid_shape == (1, 2, 2) and len(g) == 4
    b = g[1]  # grid (0, 0, 1)
    assert b.grid == (0, 0, 1)
    assert b.core_start == (0, 0, 10) and b.core_stop == (10, 10, 20)
    assert b.outer_start == (0, 0, 7) and b.outer_stop == (10, 13, 20)
    assert b.core_in_outer == (slice(0, 10), slice(0, 10), slice(3, 13))
    assert g.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert g.overlap(0, 3) == ((0, 7, 7), (10, 13, 13))
    assert b.name((5, 0, 0)) == "seg_5-0-10_15-10-20"


@settings(**SETTINGS)
@given(shape=st.tuples(*[st.integers(1, 30)] * 3), block=st.tuples(*[st.integers(3, 15)] * 3),
       halo=st.tuples(*[st.integers(0, 12)] * 3), min_core=st.integers(1, 6))
def test_grid_against_brute_force(shape, block, halo, min_core):
    g = BlockGrid(shape, block, halo, min_core=(min_core,) * 3)
    owner = np.full(shape, -1, np.int64)
    outer_masks = []
    for b in g:
        core = tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop))
        assert np.all(owner[core] == -1)  # cores do not overlap
        owner[core] = b.index
        for a in range(3):  # outer = core +- halo, clipped
            assert b.outer_start[a] == max(b.core_start[a] - halo[a], 0)
            assert b.outer_stop[a] == min(b.core_stop[a] + halo[a], shape[a])
            # core length: the block size, except a last one (at most block + min_core - 1)
            n = b.core_shape[a]
            last = b.core_stop[a] == shape[a]
            assert n == block[a] or (last and n < block[a] + min_core and (n >= min_core or b.core_start[a] == 0))
        m = np.zeros(shape, bool)
        m[tuple(slice(a, e) for a, e in zip(b.outer_start, b.outer_stop))] = True
        outer_masks.append(m)
    assert np.all(owner >= 0)  # cores tile the box
    assert list(range(len(g))) == [b.index for b in g]
    grids = [b.grid for b in g]
    assert grids == sorted(grids)  # C order
    brute = [(i, j) for i, j in itertools.combinations(range(len(g)), 2) if np.any(outer_masks[i] & outer_masks[j])]
    assert g.pairs() == brute
    for i, j in brute:
        s, e = g.overlap(i, j)
        m = np.zeros(shape, bool)
        m[tuple(slice(a, b) for a, b in zip(s, e))] = True
        assert np.array_equal(m, outer_masks[i] & outer_masks[j])
    outer = sum(int(m.sum()) for m in outer_masks)
    assert g.halo_overhead() == pytest.approx(outer / owner.size - 1)


def test_make_grid_validation():
    fov = (9, 9, 9)
    g = make_grid((48, 96, 96), (24, 48, 48), (6, 6, 6), fov)
    assert g.grid_shape == (2, 2, 2)
    # a block larger than the box is clipped to it
    g = make_grid((20, 30, 30), (128, 256, 256), (6, 6, 6), fov)
    assert len(g) == 1 and g[0].core_shape == (20, 30, 30)
    with pytest.raises(ParameterError, match=r"block=8,48,48: z size 8 is smaller than the model's FOV 9,9,9"):
        make_grid((48, 96, 96), (8, 48, 48), (6, 6, 6), fov)
    with pytest.raises(ParameterError, match=r"halo=6,3,6: y halo 3 is smaller than the FOV radius 4,4,4"):
        make_grid((48, 96, 96), (24, 48, 48), (6, 3, 6), fov)
    with pytest.raises(ParameterError, match=r"halo=30,6,6: z halo 30 is larger than the block"):
        make_grid((48, 96, 96), (24, 48, 48), (30, 6, 6), fov)
    with pytest.raises(BlockError, match="smaller than the model's FOV"):
        make_grid((8, 96, 96), (24, 48, 48), (6, 6, 6), fov)
    # a remainder shorter than the FOV joins the previous core: every outer box holds a FOV
    g = make_grid((52, 96, 96), (24, 48, 48), (4, 4, 4), fov)
    assert g.bounds[0] == [0, 24, 52]
    assert all(min(b.outer_shape) >= 9 for b in g)
