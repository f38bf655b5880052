"""Intensity normalisation: estimates, modes, guards, and the failure/fix on real data."""

import logging

import numpy as np
import pytest

from floodfilling import normalise as N


def test_standardise_recovers_mean_std_and_ignores_padding():
    rng = np.random.default_rng(0)
    vol = np.clip(rng.normal(140, 50, size=(40, 60, 60)), 1, 254).astype(np.uint8)
    truth = vol.astype(np.float64)
    vol[:, :10] = 0  # black padding: ignored
    vol[:, -5:] = 255  # white padding: ignored
    n = N.resolve("standardise", vol, 128, 33)
    inner = truth[:, 10:-5]
    assert n.mean == pytest.approx(inner.mean(), rel=0.01)
    assert n.std == pytest.approx(inner.std(), rel=0.02)
    x = n.apply(vol[:, 10:-5])
    assert abs(float(x.mean())) < 0.02 and float(x.std()) == pytest.approx(1.0, abs=0.03)


def test_fixed_is_the_reference_formula():
    raw = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    n = N.resolve("fixed", raw, 128, 33)
    assert (n.mean, n.std) == (128, 33)
    np.testing.assert_array_equal(n.apply(raw), (raw.astype(np.float32) - 128) / np.float32(33))
    n2 = N.resolve("fixed", raw, 128, 33, image_mean=100, image_std=20)
    assert (n2.mean, n2.std) == (100, 20)


def test_histogram_matches_target_quantiles():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 20.0, size=(30, 40, 40)).astype(np.float32)  # skewed, not Gaussian
    n = N.resolve("histogram", vol, 128, 33)  # no model quantiles: Gaussian(128, 33) target
    x = n.apply(vol) * 33 + 128  # back to intensities in the model's space
    assert float(np.median(x)) == pytest.approx(128, abs=2)
    assert float(np.percentile(x, 84.1) - np.percentile(x, 15.9)) / 2 == pytest.approx(33, rel=0.05)
    q = np.linspace(50, 200, N.N_QUANTILES)
    n2 = N.resolve("histogram", vol, 128, 33, model_quantiles=q)
    y = n2.apply(vol) * 33 + 128
    assert float(np.median(y)) == pytest.approx(125, abs=2)


def test_bad_images():
    with pytest.raises(N.NormalisationError, match="constant"):
        N.resolve("standardise", np.full((10, 10, 10), 7, np.uint8), 128, 33)
    bad = np.ones((10, 10, 10), np.float32)
    bad[1, 2, 3] = np.inf
    with pytest.raises(N.NormalisationError, match="NaN or infinite"):
        N.resolve("standardise", bad, 128, 33, source="img.h5:raw")
    with pytest.raises(N.NormalisationError, match="option normalise="):
        N.resolve("zscore", bad, 128, 33)


def test_dominant_object_warning(caplog):
    seg = np.zeros((10, 10, 10), np.uint32)
    seg[:6] = 3
    n = N.Normalisation("fixed", 128, 33)
    with caplog.at_level(logging.WARNING):
        msg = N.check_dominant_object(seg, n)
    assert msg and "intensities" in msg and "normalise=" in msg and "image_mean" in msg
    seg[:4] = 0
    assert N.check_dominant_object(seg, n) is None


def test_dev_volume_fixed_merges_default_separates(shared_dir):
    """The bundled FIB-25 model on FIB-SEM with different contrast (std ~54 vs 33): the
    reference's fixed (x - 128) / 33 floods everything; the default standardisation does not."""
    import h5py

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig
    from floodfilling.inference.segment import segment_array

    with h5py.File(shared_dir / "data" / "fib_medulla_dev_50x100x200.h5", "r") as f:
        raw, labels = f["raw"][:, :, :100], f["labels"][:, :, :100]
    out = {}
    for mode in ("fixed", "standardise"):
        r = segment_array(raw, config=InferenceConfig(normalise=mode))
        out[mode] = (r, evaluation.evaluate(r.segmentation, labels))
    fixed, std = out["fixed"][1], out["standardise"][1]
    assert std["seg_objects"] >= 3 * max(fixed["seg_objects"], 1)
    assert std["vi"] < fixed["vi"] - 0.5
    assert out["standardise"][0].normalisation["method"] == "standardise"
