"""Gradient-boosted trees of a LightGBM text model, evaluated with NumPy: the learned
refinement decides without LightGBM installed (it is needed to *train*, extra ``refine``).

What is read of the text model (LightGBM's ``Booster.model_to_string``, format ``v4``): the
objective (``binary sigmoid:S``, the only one a refine model uses) and every tree's arrays:
``split_feature``, ``threshold``, ``decision_type``, ``left_child``, ``right_child`` and
``leaf_value`` (a child ``< 0`` is the leaf ``~child``). A tree of one leaf has no split.

How a row goes down a tree (LightGBM's numerical decision, ``tree.h``): a value with
|v| <= 1e-35f is read as 0.0 (LightGBM's predictor keeps only the values beyond that, as a sparse
row); with
``missing = (decision_type >> 2) & 3`` (0 none, 1 zero, 2 NaN) and ``default_left =
decision_type & 2``, a NaN value counts as 0.0 unless ``missing`` is NaN; a value that is the
missing kind (NaN, or |v| <= 1e-35f for zero) goes the default way; any other goes left when
``v <= threshold``. The raw score is the sum of the rows' leaf values over the trees in their
order (in float64, as LightGBM adds them), the probability ``1 / (1 + exp(-S * raw))`` with
the C library's ``exp``: the same figures as ``lightgbm.Booster.predict``, bit for bit
(tests/test_trees.py checks it on the bundled model and on trained ones). Categorical splits,
other objectives or several classes are refused (:class:`TreeModelError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TreeModel", "TreeModelError", "parse_lightgbm"]

ZERO = float(np.float32(1e-35))  # LightGBM's kZeroThreshold (1e-35f, a float: 1.0000000180025095e-35): |v| at most this is "zero"


def _exp(v: float) -> float:
    """The C library's ``exp``, as LightGBM's sigmoid calls it: +inf past the largest double
    (a leaf of a pure region can be huge: the probability is then exactly 0, as LightGBM's)."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


class TreeModelError(ValueError):
    """A text model this evaluator cannot use (the message says what is unsupported or damaged)."""


@dataclass(frozen=True)
class Tree:
    """One tree's arrays (internal nodes 0..n-2; leaves ~child)."""

    feature: np.ndarray  # int64, per internal node
    threshold: np.ndarray  # float64
    decision: np.ndarray  # int64: LightGBM's decision_type bits
    left: np.ndarray  # int64 (< 0: leaf ~left)
    right: np.ndarray  # int64
    leaf_value: np.ndarray  # float64


class TreeModel:
    """A binary LightGBM model: its trees, flattened into one set of node arrays (every tree
    walked at once, a level at a time), and the sigmoid's scale."""

    def __init__(self, trees: tuple[Tree, ...], n_features: int, sigmoid: float):
        self.n_trees, self.n_features, self.sigmoid = len(trees), int(n_features), float(sigmoid)
        node_at = np.cumsum([0] + [t.feature.size for t in trees])  # each tree's first internal node
        leaf_at = np.cumsum([0] + [t.leaf_value.size for t in trees])  # and first leaf

        def child(c: np.ndarray, i: int) -> np.ndarray:  # a tree's child -> global (leaf: ~global leaf)
            return np.where(c >= 0, c + node_at[i], ~(~c + leaf_at[i]))

        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        self.feature = cat([t.feature for t in trees], np.int64)
        self.threshold = cat([t.threshold for t in trees], np.float64)
        decision = cat([t.decision for t in trees], np.int64)
        self.default_left = (decision & 2) > 0
        self.missing = (decision >> 2) & 3  # 0 none, 1 zero, 2 NaN
        self.left = cat([child(t.left, i) for i, t in enumerate(trees)], np.int64)
        self.right = cat([child(t.right, i) for i, t in enumerate(trees)], np.int64)
        self.leaf_value = cat([t.leaf_value for t in trees], np.float64)
        # where each tree starts: its root, or its only leaf
        self.roots = np.array([node_at[i] if t.feature.size else ~leaf_at[i] for i, t in enumerate(trees)], np.int64)

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """(k, trees): the global leaf each row of ``x`` falls in, in every tree."""
        x = self._check(x)
        x = np.where(np.abs(x) <= ZERO, 0.0, x)  # LightGBM reads such a value as an absent one: 0.0
        node = np.repeat(self.roots[None, :], len(x), axis=0)
        while True:
            r, c = np.nonzero(node >= 0)
            if r.size == 0:
                return ~node
            n = node[r, c]
            v = x[r, self.feature[n]]
            miss = self.missing[n]
            nan = np.isnan(v)
            v = np.where(nan & (miss != 2), 0.0, v)
            is_missing = ((miss == 1) & (np.abs(v) <= ZERO)) | ((miss == 2) & nan)
            go_left = np.where(is_missing, self.default_left[n], v <= self.threshold[n])
            node[r, c] = np.where(go_left, self.left[n], self.right[n])

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        """The sum of the rows' leaf values, tree after tree in float64 (LightGBM's order:
        ``cumsum`` adds sequentially)."""
        if len(x) == 0:
            return np.zeros(0)
        return np.cumsum(self.leaf_value[self.leaves(x)], axis=1)[:, -1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The probabilities of the rows of ``x`` (k, n_features), as ``Booster.predict``."""
        raw = self.raw_score(x)
        s = self.sigmoid
        return np.fromiter((1.0 / (1.0 + _exp(-s * r)) for r in raw.tolist()), np.float64, len(raw))

    def _check(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise TreeModelError(f"features of shape {x.shape}: expected (k, {self.n_features})")
        return x


def _field(block: dict[str, str], name: str, dtype, where: str) -> np.ndarray:
    try:
        text = block[name]
        return np.array(text.split(), dtype=dtype) if text.strip() else np.zeros(0, dtype)
    except KeyError:
        raise TreeModelError(f"{where}: no {name}") from None
    except ValueError as exc:
        raise TreeModelError(f"{where}: {name}: {exc}") from None


def _tree(block: dict[str, str], where: str) -> Tree:
    leaf_value = _field(block, "leaf_value", np.float64, where)
    try:
        n_leaves = int(block.get("num_leaves", "0"))
    except ValueError:
        raise TreeModelError(f"{where}: num_leaves {block.get('num_leaves')!r}") from None
    if n_leaves < 1 or leaf_value.size != n_leaves:
        raise TreeModelError(f"{where}: {leaf_value.size} leaf values for {n_leaves} leaves")
    if n_leaves == 1:
        empty = np.zeros(0, np.int64)
        return Tree(empty, np.zeros(0), empty, empty, empty, leaf_value)
    feature = _field(block, "split_feature", np.int64, where)
    threshold = _field(block, "threshold", np.float64, where)
    decision = _field(block, "decision_type", np.int64, where)
    left = _field(block, "left_child", np.int64, where)
    right = _field(block, "right_child", np.int64, where)
    n = n_leaves - 1
    if any(a.size != n for a in (feature, threshold, decision, left, right)):
        raise TreeModelError(f"{where}: node arrays of unequal length (expected {n} splits)")
    if np.any(decision & 1):
        raise TreeModelError(f"{where}: a categorical split (refine models have none)")
    for child in (left, right):
        if np.any((child >= n) | (child < -n_leaves)):
            raise TreeModelError(f"{where}: a child index out of range")
    return Tree(feature, threshold, decision, left, right, leaf_value)


def parse_lightgbm(text: str, n_features: int | None = None) -> TreeModel:
    """The :class:`TreeModel` of a LightGBM text model (``n_features``: expected, checked)."""
    header: dict[str, str] = {}
    blocks: list[dict[str, str]] = []
    current = header
    for line in text.splitlines():
        if line.startswith("Tree="):
            current = {}
            blocks.append(current)
            continue
        if line.startswith("end of trees"):
            break
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value
    objective = header.get("objective", "").split()
    if not objective or objective[0] != "binary":
        raise TreeModelError(f"objective {' '.join(objective) or 'missing'!r}: only binary models are read")
    sigmoid = 1.0
    for part in objective[1:]:
        if part.startswith("sigmoid:"):
            try:
                sigmoid = float(part.split(":", 1)[1])
            except ValueError:
                raise TreeModelError(f"objective {' '.join(objective)!r}: bad sigmoid") from None
    if header.get("num_class", "1").strip() != "1" or header.get("num_tree_per_iteration", "1").strip() != "1":
        raise TreeModelError("a model of several classes (refine models have one)")
    if "average_output" in header:
        raise TreeModelError("a random-forest model (average_output; refine models are boosted)")
    try:
        n_feat = int(header.get("max_feature_idx", "-1")) + 1
    except ValueError:
        raise TreeModelError(f"max_feature_idx {header.get('max_feature_idx')!r}") from None
    if n_features is not None and n_feat != n_features:
        raise TreeModelError(f"a model of {n_feat} features, expected {n_features}")
    if not blocks:
        raise TreeModelError("no trees")
    trees = tuple(_tree(b, f"tree {i}") for i, b in enumerate(blocks))
    for i, t in enumerate(trees):
        if t.feature.size and (t.feature.min() < 0 or t.feature.max() >= n_feat):
            raise TreeModelError(f"tree {i}: a split on feature {int(t.feature.max())} of {n_feat}")
    return TreeModel(trees, n_feat, sigmoid)
