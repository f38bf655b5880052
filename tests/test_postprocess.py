import numpy as np
from scipy import ndimage

from floodfilling.results import Origin
from floodfilling.postprocess import make_contiguous, postprocess, remove_dust, split_disconnected


def test_split_disconnected_against_per_object_labelling():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, size=(12, 12, 12)).astype(np.uint32)
    out, parts = split_disconnected(seg)
    # every new component is connected and lies inside one old object
    for new in np.unique(out[out > 0]):
        m = out == new
        assert ndimage.label(m)[1] == 1
        assert len(np.unique(seg[m])) == 1
    # and the number of components per old object is what scipy finds
    for old in (1, 2, 3):
        assert len(parts[old]) == ndimage.label(seg == old)[1]
    assert np.array_equal(out > 0, seg > 0)


def test_dust_and_contiguous():
    seg = np.zeros((1, 1, 10), np.uint32)
    seg[0, 0, :5] = 7
    seg[0, 0, 6] = 9
    seg[0, 0, 8:] = 3
    d = remove_dust(seg, 2)
    assert 9 not in d and 7 in d and 3 in d
    c, m = make_contiguous(d)
    assert m == {3: 1, 7: 2} and set(np.unique(c)) == {0, 1, 2}


def test_postprocess_keeps_origins_of_seed_components():
    seg = np.zeros((1, 1, 9), np.uint32)
    seg[0, 0, [0, 1, 5, 6, 7]] = 4  # two components of object 4; seed in the second
    seg[0, 0, 3] = 2
    origins = {4: Origin((0, 0, 6), 3, 0.1), 2: Origin((0, 0, 3), 1, 0.1)}
    out, org = postprocess(seg, origins, split=True, dust_size=2)
    # object 2 (1 voxel) is dust; 4 splits into [0,1] and [5,6,7]
    assert set(np.unique(out)) == {0, 1, 2}
    assert out[0, 0, 6] == 2 and out[0, 0, 0] == 1
    assert set(org) == {2} and org[2].seed_zyx == (0, 0, 6)
