"""The NumPy evaluator of LightGBM text models (floodfilling.inference.trees): a hand-built
model against hand-computed scores, the bundled refine model and a freshly trained one against
LightGBM's own predict (bit for bit), unusable models refused, the learned refinement without
LightGBM installed."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from floodfilling.inference import learned
from floodfilling.inference.trees import TreeModelError, parse_lightgbm

# two trees on 2 features. Tree 0: f0 <= 0.5 (missing: NaN, default right) ? (f1 <= -1 (missing: zero,
# default left) ? 0.1 : 0.2) : 0.3.  Tree 1: a single leaf -0.05.
HAND = """tree
version=v4
num_class=1
num_tree_per_iteration=1
label_index=0
max_feature_idx=1
objective=binary sigmoid:2

Tree=0
num_leaves=3
split_feature=0 1
threshold=0.5 -1
decision_type=8 6
left_child=1 -1
right_child=-3 -2
leaf_value=0.1 0.2 0.3

Tree=1
num_leaves=1
leaf_value=-0.05

end of trees
"""


def _hand_score(f0: float, f1: float) -> float:
    if math.isnan(f0):
        leaf = 0.3  # missing NaN, default right
    elif f0 <= 0.5:
        if math.isnan(f1) or abs(f1) <= 1e-35:
            leaf = 0.1  # NaN counts as 0.0 (missing type zero), which goes the default way: left
        else:
            leaf = 0.1 if f1 <= -1 else 0.2
    else:
        leaf = 0.3
    raw = leaf + -0.05
    return 1.0 / (1.0 + math.exp(-2.0 * raw))


def test_hand_built_model_scores_as_computed_by_hand():
    m = parse_lightgbm(HAND, 2)
    rows = [(0.0, -2.0), (0.5, -1.0), (0.5, -0.99), (0.6, -5.0), (float("nan"), -5.0), (0.2, float("nan")),
            (0.2, 0.0), (0.2, 1e-36), (0.2, 3.0), (-7.0, -1.0)]
    got = m.predict(np.array(rows))
    assert got.tolist() == [_hand_score(a, b) for a, b in rows]


def test_huge_raw_scores_give_probability_0_and_1_as_lightgbm():
    """A leaf of a pure region can be huge (boundary maps): exp overflows to +inf in C, the
    probability is exactly 0 (and 1 the other way), never an error."""
    m = parse_lightgbm(HAND.replace("leaf_value=0.1 0.2 0.3", "leaf_value=-600 0.2 600"), 2)
    got = m.predict(np.array([[0.0, -2.0], [0.6, 0.0], [0.5, 3.0]]))
    assert got.tolist() == [0.0, 1.0, 1.0 / (1.0 + math.exp(-2.0 * 0.15))]


def _edge_rows(m, n: int, seed: int = 0) -> np.ndarray:
    """Rows that meet every kind of branch: values at the split thresholds, NaN, zeros."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m.n_features)) * 3
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.03] = 0.0
    pick = rng.integers(0, len(m.threshold), n)
    x[np.arange(n), m.feature[pick]] = m.threshold[pick]
    return x


def test_bundled_model_equals_lightgbm_bit_for_bit():
    lgb = pytest.importorskip("lightgbm")
    text = json.loads(open(learned.bundled_refine_model_path()).read())["lightgbm"]
    m = parse_lightgbm(text, len(learned.FEATURES))
    x = _edge_rows(m, 3000)
    want = lgb.Booster(model_str=text).predict(x, num_threads=1)
    assert np.array_equal(m.predict(x), want)
    assert np.array_equal(m.predict(x[:1]), want[:1]) and m.predict(x[:0]).shape == (0,)


def test_trained_model_equals_lightgbm_bit_for_bit():
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 5))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = ((np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 1]) > 0) ^ (rng.random(400) < 0.1)).astype(float)
    booster = lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1,
                         "deterministic": True, "seed": 0, "min_data_in_leaf": 5},
                        lgb.Dataset(x, label=y), num_boost_round=30)
    m = parse_lightgbm(booster.model_to_string(), 5)
    probe = _edge_rows(m, 2000, seed=2)
    assert np.array_equal(m.predict(probe), booster.predict(probe, num_threads=1))


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace("objective=binary sigmoid:2", "objective=regression"), "only binary"),
    (lambda t: t.replace("num_class=1", "num_class=3"), "several classes"),
    (lambda t: t.replace("decision_type=8 6", "decision_type=9 6"), "categorical"),
    (lambda t: t.replace("leaf_value=0.1 0.2 0.3", "leaf_value=0.1 0.2"), "leaf values"),
    (lambda t: t.replace("left_child=1 -1", "left_child=5 -1"), "out of range"),
    (lambda t: t.replace("split_feature=0 1", "split_feature=0 7"), "feature 7"),
    (lambda t: t.replace("threshold=0.5 -1", "threshold=0.5 x"), "threshold"),
    (lambda t: t.split("Tree=0")[0], "no trees"),
])
def test_unusable_models_are_refused(edit, needle):
    with pytest.raises(TreeModelError, match=needle):
        parse_lightgbm(edit(HAND), 2)
    with pytest.raises(TreeModelError, match="expected 3"):
        parse_lightgbm(HAND, 3)


def test_learned_refinement_decides_without_lightgbm(monkeypatch):
    """With LightGBM missing (import fails), the bundled model still loads and scores; only
    training needs it (a one-line error naming the extra)."""
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    m = learned.load_refine_model("bundled")
    x = _edge_rows(parse_lightgbm(m.booster, len(learned.FEATURES)), 50)
    p = m.predict(x)
    assert p.shape == (50,) and np.all((p > 0) & (p < 1))
    with pytest.raises(learned.RefineModelError, match=r"floodfilling\[refine\]"):
        learned.import_lightgbm()
