"""The learned boundary map of the refine base (:mod:`floodfilling.inference.boundary`): labels and
filters against hand-computed and scipy values, the watershed's landscape against the map
evaluated everywhere, held-out maps, the model file with and without a map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("lightgbm")
pytest.importorskip("skimage")

from floodfilling.config import RefineConfig  # noqa: E402
from floodfilling.inference import boundary as bmap  # noqa: E402
from floodfilling.inference import learned  # noqa: E402


def test_boundary_labels_hand_computed():
    # x: bodies 1 | 2 meet between x=1 and x=2; 2 touches label 0 (not a boundary of 2's own);
    # the 0 run: x=4,5 within 2 voxels of a labelled voxel (boundary), x=6,7 deeper (unknown)
    gt = np.array([[[1, 1, 2, 2, 0, 0, 0, 0]]], np.uint32)
    b, unknown = bmap.boundary_labels(gt)
    assert b[0, 0].astype(int).tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert unknown[0, 0].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    # along y and z too; no label 0: nothing unknown
    gt = np.array([[[1], [1]], [[1], [3]]], np.uint32)
    b, unknown = bmap.boundary_labels(gt)
    assert b[:, :, 0].astype(int).tolist() == [[0, 1], [1, 1]] and not unknown.any()


def test_filter_bank_is_scipy_at_the_voxels_asked():
    rng = np.random.default_rng(0)
    im = rng.normal(size=(12, 13, 14)).astype(np.float32)
    where = rng.random(im.shape) < 0.3
    x = bmap.filter_bank(im, where)
    assert x.shape == (int(where.sum()), len(bmap.FILTERS)) and x.dtype == np.float32
    col = {n: i for i, n in enumerate(bmap.FILTERS)}
    assert np.array_equal(x[:, col["image"]], im[where])
    assert np.array_equal(x[:, col["gauss_s2"]], ndimage.gaussian_filter(im, 2.0)[where])
    assert np.array_equal(x[:, col["gradient_s1"]], ndimage.gaussian_gradient_magnitude(im, 1.0)[where])
    assert np.array_equal(x[:, col["log_s4"]], ndimage.gaussian_laplace(im, 4.0)[where])
    # Hessian eigenvalues at sigma 3, one voxel, from its six second derivatives
    k = 5
    z, y, xx = (a[k] for a in np.nonzero(where))
    h = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            h[i, j] = ndimage.gaussian_filter(im, 3.0, order=order)[z, y, xx]
    want = np.linalg.eigvalsh(h)
    got = x[k, [col["hessian0_s3"], col["hessian1_s3"], col["hessian2_s3"]]]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6) and np.all(np.diff(got) >= 0)
    # every voxel: the rows in raster order
    assert np.array_equal(bmap.filter_bank(im)[np.flatnonzero(where.ravel())], x)


def _volume(seed: int):
    from floodfilling.testing import voronoi_volume

    raw, labels = voronoi_volume((20, 24, 26), n=12, seed=seed)
    image = ((raw.astype(np.float32) - 128) / 33).astype(np.float32)
    flood = np.where(ndimage.binary_erosion(raw > 110, iterations=1), labels, 0).astype(np.uint32)
    cut = (flood % 3 == 0) & (np.arange(flood.shape[2])[None, None, :] % 10 < 5)  # cells cut in two
    flood = np.where(cut, flood + 100, flood).astype(np.uint32)
    flood[flood == 2] = 0
    return image, labels, flood


def test_map_learns_the_boundaries_and_is_deterministic():
    image, labels, _ = _volume(0)
    text = bmap.fit_boundary([(image, labels, None)])
    assert text == bmap.fit_boundary([(image, labels, None)])  # the same model, byte for byte
    other, other_labels, _ = _volume(1)
    p = bmap.BoundaryMap(text).probability(other)
    b, _ = bmap.boundary_labels(other_labels)
    assert ((p > 0.5) == b).mean() > 0.85  # a volume it never saw
    # the NumPy trees agree with LightGBM itself
    import lightgbm

    x = bmap.filter_bank(other)
    want = lightgbm.Booster(model_str=text).predict(x.astype(np.float64))
    assert np.array_equal(p.ravel(), want.astype(np.float32))


def test_landscape_at_the_free_voxels_and_their_neighbours_gives_the_full_maps_watershed(monkeypatch):
    import skimage.segmentation

    real = skimage.segmentation.watershed
    seen = []
    monkeypatch.setattr(skimage.segmentation, "watershed",
                        lambda land, markers: seen.append((land, markers.copy())) or real(land, markers=markers))
    image, labels, flood = _volume(2)
    m = bmap.BoundaryMap(bmap.fit_boundary([(image, labels, None)]))
    cfg = RefineConfig(gap_core_radius=2.0, gap_min_core=5).validate()
    for base in ("watershed", "cores"):
        got = learned.base_segmentation(image, flood, base, cfg, boundary=m).segmentation
        land, markers = seen[-1]
        free = markers == 0
        assert free.any() and np.array_equal(land == 0, ~ndimage.binary_dilation(free))  # 0 only deep in markers
        want = real(m.probability(image), markers=markers)
        assert np.array_equal(got, want), base
        assert (got > 0).all()


def test_held_out_maps_never_see_the_voxels_they_answer_for():
    image, labels, _ = _volume(0)
    (held,) = bmap.held_out_maps([(image, labels)])
    lower, upper = bmap.halves(labels.shape)
    assert lower.sum() == upper.sum() == labels.size // 2 and not (lower & upper).any()
    (m1, r1), (m2, r2) = held.parts
    assert np.array_equal(r1, upper) and m1.text == bmap.fit_boundary([(image, labels, lower)])
    assert np.array_equal(r2, lower) and m2.text == bmap.fit_boundary([(image, labels, upper)])
    p = held.probability(image)
    assert np.array_equal(p[upper], m1.probability(image)[upper])
    # two volumes: each answered by the other's classifier
    other = _volume(1)[:2]
    a, b = bmap.held_out_maps([(image, labels), other])
    assert a.parts[0][0].text == bmap.fit_boundary([(other[0], other[1], None)]) and a.parts[0][1] is None
    assert b.parts[0][0].text == bmap.fit_boundary([(image, labels, None)])


def test_model_file_carries_the_map_and_reads_version_1(tmp_path):
    from floodfilling.inference.train_refine import TrainUnit, train_model

    image, labels, flood = _volume(0)
    m = train_model([TrainUnit("v0", image, flood, labels)], "cores", rounds=10)
    assert m.boundary and m.training["boundary"]["filters"] == list(bmap.FILTERS)
    path = tmp_path / "m.json"
    learned.save_refine_model(m, str(path))
    back = learned.load_refine_model(str(path))
    assert back.to_json() == m.to_json() and back.boundary_map().text == m.boundary
    # without a map (and a file of version 1, before the map): the watershed of the image
    plain = train_model([TrainUnit("v0", image, flood, labels)], "cores", rounds=10, boundary=False)
    d = json.loads(plain.to_json())
    assert d["boundary"] is None and plain.training["boundary"] is None
    d.pop("boundary")
    d["format_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(d))
    v1 = learned.load_refine_model(str(tmp_path / "v1.json"))
    assert v1.boundary_map() is None and v1.booster == plain.booster
    for bad, needle in ((123, "boundary map int"), ("tree\nnonsense=1\n", "LightGBM")):
        (tmp_path / "bad.json").write_text(json.dumps({**json.loads(m.to_json()), "boundary": bad}))
        with pytest.raises(learned.RefineModelError, match=needle) as e:
            learned.load_refine_model(str(tmp_path / "bad.json"))
        assert str(tmp_path / "bad.json") in str(e.value)
