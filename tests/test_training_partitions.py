"""Partition volume and balanced coordinates against brute-force NumPy references."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floodfilling.cli import main
from floodfilling.training.partitions import (DEFAULT_THRESHOLDS, IGNORE, PartitionError, build_coordinates,
                                              compute_partitions, partition_counts)


def brute_partitions(labels, radius, thresholds, min_size):
    """Voxel by voxel: the reference's definition, no tables."""
    labels = labels.copy()
    ids, counts = np.unique(labels, return_counts=True)
    for i, c in zip(ids, counts):
        if c < min_size:
            labels[labels == i] = 0
    r = np.array(radius)
    diam = 2 * r + 1
    out = np.full(labels.shape, IGNORE, np.uint8)
    box = float(np.prod(diam))
    for z in range(r[0], labels.shape[0] - r[0]):
        for y in range(r[1], labels.shape[1] - r[1]):
            for x in range(r[2], labels.shape[2] - r[2]):
                lab = labels[z, y, x]
                if lab == 0:
                    out[z, y, x] = 0
                    continue
                win = labels[z - r[0]:z + r[0] + 1, y - r[1]:y + r[1] + 1, x - r[2]:x + r[2] + 1]
                frac = np.count_nonzero(win == lab) / box
                val = len(thresholds) + 1
                for i, th in enumerate(thresholds):
                    if frac < th:
                        val = i + 1
                        break
                out[z, y, x] = val
    return out


def reference_algorithm(labels, radius, thresholds, min_size):
    """The reference's whole-volume summed-volume table per label (written from its definition)."""
    labels = labels.copy()
    ids, counts = np.unique(labels, return_counts=True)
    labels[np.isin(labels, ids[counts < min_size])] = 0
    r = np.array(radius)
    d = 2 * r + 1
    valid = tuple(slice(a, s - a) for a, s in zip(r, labels.shape))
    out = np.zeros(labels[valid].shape, np.uint8)
    for lab in np.unique(labels):
        if lab == 0:
            continue
        m = labels == lab
        svt = np.pad(m.astype(np.int64).cumsum(0).cumsum(1).cumsum(2), [(1, 0)] * 3)
        s = (svt[d[0]:, d[1]:, d[2]:] - svt[:-d[0], d[1]:, d[2]:] - svt[d[0]:, :-d[1], d[2]:]
             - svt[d[0]:, d[1]:, :-d[2]] + svt[:-d[0], :-d[1], d[2]:] + svt[:-d[0], d[1]:, :-d[2]]
             + svt[d[0]:, :-d[1], :-d[2]] - svt[:-d[0], :-d[1], :-d[2]])
        frac = s / np.prod(d)
        mv = m[valid]
        for i, th in enumerate(thresholds):
            out[mv & (frac < th) & (out == 0)] = i + 1
        out[mv & (frac >= thresholds[-1]) & (out == 0)] = len(thresholds) + 1
    full = np.full(labels.shape, IGNORE, np.uint8)
    full[valid] = out
    return full


def blobs(rng, shape, n):
    """A label volume of n random boxes over background (overlaps: later wins)."""
    lab = np.zeros(shape, np.uint32)
    for i in range(1, n + 1):
        a = [int(rng.integers(0, s)) for s in shape]
        b = [min(s, x + int(rng.integers(1, max(2, s // 2 + 2)))) for s, x in zip(shape, a)]
        lab[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = i * 7
    return lab


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rz=st.integers(0, 2), ry=st.integers(0, 2), rx=st.integers(1, 2),
       min_size=st.sampled_from([1, 5, 30]))
def test_partitions_match_brute_force(seed, rz, ry, rx, min_size):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(6, 11, size=3))
    lab = blobs(rng, shape, int(rng.integers(1, 6)))
    th = DEFAULT_THRESHOLDS
    want = brute_partitions(lab, (rz, ry, rx), th, min_size)
    if not np.any(want[want != IGNORE] > 0) and min_size > 1:
        ids, cnt = np.unique(lab, return_counts=True)
        if not np.any((ids != 0) & (cnt >= min_size)):
            with pytest.raises(PartitionError, match="no object"):
                compute_partitions(lab, (rz, ry, rx), th, min_size)
            return
    got = compute_partitions(lab, (rz, ry, rx), th, min_size)
    np.testing.assert_array_equal(got, want)


def test_threshold_equality_goes_up():
    """A fraction exactly equal to a threshold is not below it (strict <), as in the reference."""
    lab = np.zeros((3, 3, 3), np.uint32)
    lab.flat[:9] = 5  # 9 of 27 voxels
    lab.flat[9:] = 6
    th = (9 / 27, 0.5, 0.9)
    got = compute_partitions(lab, 1, th, 1)
    assert got[1, 1, 1] == brute_partitions(lab, (1, 1, 1), th, 1)[1, 1, 1] == 3  # 18/27 of label 6 at centre
    lab[1, 1, 1] = 5  # now the centre is label 5 with 10/27 >= 9/27, < 0.5
    assert compute_partitions(lab, 1, th, 1)[1, 1, 1] == 2


def test_fib25_crop_matches_reference_algorithm(fib25):
    lab = fib25[1][:60, 40:110, 100:170].copy()
    want = reference_algorithm(lab, (6, 7, 8), DEFAULT_THRESHOLDS, 2000)
    got = compute_partitions(lab, (6, 7, 8), DEFAULT_THRESHOLDS, 2000)
    np.testing.assert_array_equal(got, want)
    assert len(partition_counts(got)) > 5


def test_fib25_full_cube_under_60s(fib25):
    t0 = time.perf_counter()
    p = compute_partitions(fib25[1], (24, 24, 24), DEFAULT_THRESHOLDS, 10000)
    secs = time.perf_counter() - t0
    assert secs < 60, f"compute_partitions took {secs:.1f} s on the 250^3 cube"
    assert p.shape == (250, 250, 250)
    assert np.all(p[:24] == IGNORE) and np.all(p[:, :, -24:] == IGNORE)
    inner = p[24:-24, 24:-24, 24:-24]
    assert IGNORE not in inner and set(np.unique(inner)) <= set(range(14))


def test_bad_options():
    lab = np.ones((8, 8, 8), np.uint32)
    with pytest.raises(PartitionError, match="smaller than the partition box"):
        compute_partitions(lab, 4, DEFAULT_THRESHOLDS, 1)
    with pytest.raises(PartitionError, match="no object has >= 1000 voxels"):
        compute_partitions(lab, 1, DEFAULT_THRESHOLDS, 1000)
    with pytest.raises(PartitionError, match="thresholds"):
        compute_partitions(lab, 1, (0.5, 0.2), 1)
    with pytest.raises(PartitionError, match="integers"):
        compute_partitions(lab.astype(np.float32), 1, DEFAULT_THRESHOLDS, 1)


def test_coordinates_balanced_and_inside():
    rng = np.random.default_rng(3)
    parts = np.full((12, 14, 16), IGNORE, np.uint8)
    parts[2:-2, 2:-2, 2:-2] = rng.choice([0, 1, 5, 13], size=(8, 10, 12), p=[0.1, 0.2, 0.6, 0.1])
    m = (3, 2, 4)
    c = build_coordinates(parts, m, seed=7)
    region = parts[3:-3, 2:-2, 4:-4]
    vals, counts = np.unique(region[region != IGNORE], return_counts=True)
    assert len(c) == len(vals) * counts.max()
    assert c.dtype == np.int32 and c.shape[1] == 3
    assert np.all(c >= m) and np.all(c < np.array(parts.shape) - m)
    got_vals, got_counts = np.unique(parts[tuple(c.T)], return_counts=True)
    np.testing.assert_array_equal(got_vals, vals)
    assert np.all(got_counts == counts.max())  # every class oversampled to the largest one
    # every voxel of every class is used, each at least once
    for v in vals:
        want = set(map(tuple, np.argwhere(region == v) + m))
        assert set(map(tuple, c[parts[tuple(c.T)] == v])) == want
    np.testing.assert_array_equal(c, build_coordinates(parts, m, seed=7))
    assert not np.array_equal(c, build_coordinates(parts, m, seed=8))
    assert not np.array_equal(np.sort(c[:, 0])[:50], c[:50, 0])  # shuffled


def test_prepare_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lab = blobs(rng, (20, 22, 24), 6)
    lab[lab == 0] = 1000  # one big background-like object
    src = tmp_path / "lab.h5"
    with h5py.File(src, "w") as f:
        f["labels"] = lab
    out = tmp_path / "prep.h5"
    assert main(["prepare", f"{src}:labels", str(out), "--radius", "3,4,5", "--min-size", "50",
                 "--margin", "4", "--seed", "2"]) == 0
    assert "coordinates" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        parts = f["partitions"][...]
        coords = f["coords"][...]
        assert list(f["coords"].attrs["margin_zyx"]) == [4, 4, 4]
        assert list(f["partitions"].attrs["radius_zyx"]) == [3, 4, 5]
    np.testing.assert_array_equal(parts, compute_partitions(lab, (3, 4, 5), DEFAULT_THRESHOLDS, 50))
    np.testing.assert_array_equal(coords, build_coordinates(parts, 4, seed=2))
    # existing output, no objects, volume too small: one-line errors, exit 2
    assert main(["prepare", f"{src}:labels", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["prepare", f"{src}:labels", str(tmp_path / "b.h5"), "--radius", "3", "--min-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffn: error:") and "no object has >= 100000 voxels" in err and err.count("\n") == 1
    assert main(["prepare", f"{src}:labels", str(tmp_path / "c.h5"), "--radius", "12"]) == 2
    assert "smaller than the partition box" in capsys.readouterr().err
