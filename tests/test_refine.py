"""Refinement after the flood (floodfilling.refine, ``ffn segment --refine``): hand-built
volumes whose right answer is known, polarity, the exact flood kept, and the command line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from floodfilling.config import ConfigError, RefineConfig
from floodfilling.refine import RefineError, gap_cores, refine_array

pytest.importorskip("skimage")


def cells(shape=(20, 20, 40), wall_x=(19, 20)):
    """Two bright boxes split by a dark membrane (x in ``wall_x``), normalised values: cells
    +1, membrane -2. Returns (image, the true labels 1 | 2, membrane voxels -> 0)."""
    image = np.ones(shape, np.float32)
    truth = np.ones(shape, np.uint32)
    truth[..., wall_x[1]:] = 2
    image[..., wall_x[0]:wall_x[1] + 1] = -2.0
    truth[..., wall_x[0]:wall_x[1] + 1] = 0
    return image, truth


def test_watershed_stops_at_the_membrane():
    image, truth = cells()
    seg = np.zeros(image.shape, np.uint32)
    seg[10, 10, 5] = 7  # one flood object on each side, a voxel each
    seg[10, 10, 30] = 9
    out = refine_array(image, seg, RefineConfig(steps=("watershed",), watershed_sigma=0.0)).segmentation
    assert out.dtype == seg.dtype
    assert (out[truth == 1] == 7).all() and (out[truth == 2] == 9).all()
    assert set(np.unique(out[truth == 0])) <= {7, 9}  # the membrane is shared out, nothing left at 0


def test_gap_object_for_a_cell_no_flood_reached():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)  # the flood found cell 1 only
    cfg = RefineConfig(steps=("gap_objects", "watershed"), interior_sigma=0.5, gap_core_radius=3.0, gap_min_core=10,
                       watershed_sigma=0.0)
    cores, centres = gap_cores(image, seg, cfg)
    assert cores.max() == 1 and len(centres) == 1
    z, y, x = centres[0]  # the deepest voxel of the free cell (20 x 20 x 19 box at x 21..39)
    assert x > 20 and seg[z, y, x] == 0 and cores[z, y, x] == 1
    r = refine_array(image, seg, cfg)
    assert list(r.new_origins) == [6] and r.new_origins[6].seed_zyx == centres[0] and r.new_origins[6].steps == 0
    assert (r.segmentation[truth == 1] == 5).all() and (r.segmentation[truth == 2] == 6).all()
    assert r.counters["gap_objects"] == 1
    # without gap objects the watershed hands the free cell to the flood's object: one merge
    only_ws = refine_array(image, seg, RefineConfig(steps=("watershed",), watershed_sigma=0.0)).segmentation
    assert (only_ws[truth > 0] == 5).all()


def test_small_gaps_make_no_object():
    image, truth = cells()
    seg = np.where(truth > 0, 5, 0).astype(np.uint32)
    seg[:, :, 30:34] = 0  # a gap 4 voxels wide inside object 5: no voxel 3 from its faces
    cores, centres = gap_cores(image, seg, RefineConfig(gap_core_radius=3.0, interior_sigma=0.5, gap_min_core=1))
    assert cores.max() == 0 and centres == []
    seg[:, :, 30:36] = 0  # 6 wide: the central voxels are 3 from both faces
    cores, centres = gap_cores(image, seg, RefineConfig(gap_core_radius=3.0, interior_sigma=0.5, gap_min_core=1))
    assert cores.max() == 1 and set(np.unique(np.nonzero(cores)[2])) == {32, 33}


def test_bright_membranes_are_the_mirror_image():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)
    dark = refine_array(image, seg, RefineConfig(gap_min_core=10))
    bright = refine_array(-image, seg, RefineConfig(gap_min_core=10, membranes="bright"))
    np.testing.assert_array_equal(dark.segmentation, bright.segmentation)


def test_steps_are_checked():
    with pytest.raises(ConfigError, match="steps"):
        RefineConfig(steps=("watershed", "magic")).validate()
    with pytest.raises(ConfigError, match="gap_core_radius"):
        RefineConfig(gap_core_radius=-1.0).validate()
    with pytest.raises(RefineError, match="shape"):
        refine_array(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint32), RefineConfig())


def test_no_steps_returns_the_flood():
    image, truth = cells()
    seg = np.where(truth == 1, 5, 0).astype(np.uint32)
    np.testing.assert_array_equal(refine_array(image, seg, RefineConfig(steps=())).segmentation, seg)
