"""Tests of floodfilling.evaluation: hand-computed cases pin the conventions, scikit-image is
used as an independent cross-check, and the reference FIB-25 segmentation pins real figures."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from floodfilling.evaluation import (
    Contingency,
    adapted_rand,
    contingency,
    evaluate,
    format_report,
    variation_of_information,
)

skm = pytest.importorskip("skimage.metrics")

SHARED = Path(os.environ.get("FFN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _brute_table(seg, gt):
    pairs, counts = np.unique(
        np.stack([seg.ravel().astype(object), gt.ravel().astype(object)], axis=1).astype(str),
        axis=0,
        return_counts=True,
    )
    return {(int(a), int(b)): int(c) for (a, b), c in zip(pairs, counts)}


def _as_dict(t: Contingency):
    return {(int(a), int(b)): int(c) for a, b, c in zip(t.seg_ids, t.gt_ids, t.counts)}


# --------------------------------------------------------------------------------------------
# hand-computed cases: these pin the naming conventions


MERGE_GT = np.array([1, 1, 1, 1, 2, 2, 2, 2]).reshape(1, 1, 8)
MERGE_SEG = np.full((1, 1, 8), 5)


def test_pure_merge_hand_computed():
    # one seg object covering two gt objects of 4 voxels: a pure (false) merge
    r = adapted_rand(MERGE_SEG, MERGE_GT)
    # sum p^2 = 4^2 + 4^2 = 32; sum b^2 (seg) = 8^2 = 64; sum a^2 (gt) = 2 * 4^2 = 32
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(1.0)
    assert r["are"] == pytest.approx(1 - 2 * 0.5 * 1.0 / 1.5)
    v = variation_of_information(MERGE_SEG, MERGE_GT)
    assert v["vi_split"] == pytest.approx(0.0, abs=1e-12)  # H(seg|gt) = 0
    assert v["vi_merge"] == pytest.approx(1.0)  # H(gt|seg) = 1 bit
    assert v["vi"] == pytest.approx(1.0)
    assert variation_of_information(MERGE_SEG, MERGE_GT, base=math.e)["vi_merge"] == (
        pytest.approx(math.log(2))
    )


def test_pure_split_hand_computed():
    # the mirror: one gt object of 8 voxels split into two seg objects
    seg, gt = np.array([3, 3, 3, 3, 4, 4, 4, 4]).reshape(1, 1, 8), np.full((1, 1, 8), 7)
    r = adapted_rand(seg, gt)
    assert r["precision"] == pytest.approx(1.0)
    assert r["recall"] == pytest.approx(0.5)
    assert r["are"] == pytest.approx(1 / 3)
    v = variation_of_information(seg, gt)
    assert v["vi_split"] == pytest.approx(1.0)
    assert v["vi_merge"] == pytest.approx(0.0, abs=1e-12)


def test_skimage_swaps_precision_and_recall_on_the_merge_case():
    # documents why we do not reuse skimage's precision/recall: for a pure merge it reports
    # precision 1.0 (it divides by the gt sizes) and a low recall
    are, prec, rec = skm.adapted_rand_error(MERGE_GT, MERGE_SEG)
    assert prec == pytest.approx(1.0)
    assert rec < 1.0
    ours = adapted_rand(MERGE_SEG, MERGE_GT, exclude_self_pairs=True)
    assert ours["precision"] == pytest.approx(rec)
    assert ours["recall"] == pytest.approx(prec)
    assert ours["are"] == pytest.approx(are)


def test_perfect_match_is_zero():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(4, 5, 6))
    seg = gt * 10 + 3  # relabelled, same partition
    for mode in ("ignore", "label"):
        r = evaluate(seg, gt, gt_zero=mode)
        assert r["vi"] == 0.0 and r["vi_split"] == 0.0 and r["vi_merge"] == 0.0
        assert r["are"] == pytest.approx(0.0, abs=1e-12)
        assert r["precision"] == pytest.approx(1.0) and r["recall"] == pytest.approx(1.0)
        assert r["false_merges"] == [] and r["false_splits"] == []


# --------------------------------------------------------------------------------------------
# cross-checks against scikit-image


@pytest.mark.parametrize("seed", range(4))
def test_vi_matches_skimage_order(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 7, 8)
    gt = rng.integers(0, 5, size=shape)
    seg = (gt + rng.integers(0, 2, size=shape) * rng.integers(0, 4, size=shape)) % 7
    # skimage.metrics.variation_of_information(image0, image1) returns
    # [H(image1 | image0), H(image0 | image1)]; with (gt, seg): [H(seg|gt), H(gt|seg)]
    sk_split, sk_merge = skm.variation_of_information(gt, seg)
    ours = variation_of_information(seg, gt, gt_zero="label")
    assert ours["vi_split"] == pytest.approx(sk_split, rel=1e-10, abs=1e-12)
    assert ours["vi_merge"] == pytest.approx(sk_merge, rel=1e-10, abs=1e-12)
    sk_split0, sk_merge0 = skm.variation_of_information(gt, seg, ignore_labels=[0])
    ours0 = variation_of_information(seg, gt)  # default gt_zero="ignore"
    assert ours0["vi_split"] == pytest.approx(sk_split0, rel=1e-10, abs=1e-12)
    assert ours0["vi_merge"] == pytest.approx(sk_merge0, rel=1e-10, abs=1e-12)


def test_vi_split_merge_correspondence_on_a_split():
    # a split must show up in skimage's first value and in our vi_split
    gt = np.zeros((2, 4, 4), int) + 1
    seg = np.zeros_like(gt)
    seg[:, :, 2:] = 1
    sk = skm.variation_of_information(gt, seg)
    ours = variation_of_information(seg, gt)
    assert sk[0] > 0 and sk[1] == pytest.approx(0, abs=1e-12)
    assert ours["vi_split"] == pytest.approx(sk[0]) and ours["vi_merge"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_adapted_rand_matches_skimage(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (5, 9, 11)
    gt = rng.integers(0, 6, size=shape)
    seg = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, 9, size=shape))
    sk_are, sk_prec, sk_rec = skm.adapted_rand_error(gt, seg)  # ignores gt == 0
    exact = adapted_rand(seg, gt, exclude_self_pairs=True)
    assert exact["are"] == pytest.approx(sk_are, rel=1e-12)
    # skimage's precision/recall are the other way round from the SNEMI3D/CREMI convention
    assert exact["precision"] == pytest.approx(sk_rec, rel=1e-12)
    assert exact["recall"] == pytest.approx(sk_prec, rel=1e-12)
    sk_all = skm.adapted_rand_error(gt, seg, ignore_labels=())
    assert adapted_rand(seg, gt, gt_zero="label", exclude_self_pairs=True)["are"] == (
        pytest.approx(sk_all[0], rel=1e-12)
    )


def test_adapted_rand_default_close_to_skimage_on_large_volume():
    rng = np.random.default_rng(7)
    shape = (20, 40, 40)
    gt = rng.integers(0, 8, size=shape)
    seg = np.where(rng.random(shape) < 0.8, gt, rng.integers(0, 8, size=shape))
    # n^2 vs n(n-1) pair counting differ by O(1/object size)
    assert adapted_rand(seg, gt)["are"] == pytest.approx(skm.adapted_rand_error(gt, seg)[0], abs=1e-3)


# --------------------------------------------------------------------------------------------
# contingency table


@pytest.mark.parametrize(
    "seg_dtype,gt_dtype,offset",
    [
        (np.uint8, np.uint32, 0),
        (np.int8, np.int64, -5),
        (np.uint64, np.uint16, 2**63 + 11),
        (np.int64, np.uint64, 2**40),
    ],
)
def test_contingency_matches_brute_force(seg_dtype, gt_dtype, offset):
    rng = np.random.default_rng(3)
    seg = rng.integers(0, 7, size=(3, 4, 5))
    gt = rng.integers(0, 9, size=(3, 4, 5))
    if np.issubdtype(seg_dtype, np.signedinteger) and offset < 0:
        seg = seg.astype(seg_dtype) + seg_dtype(offset)
        gt = gt.astype(gt_dtype) + gt_dtype(offset)
    elif offset:
        seg = seg.astype(seg_dtype) * seg_dtype(offset // 7 + 1)
        gt = gt.astype(gt_dtype)
    seg, gt = seg.astype(seg_dtype), gt.astype(gt_dtype)
    t = contingency(seg, gt)
    assert _as_dict(t) == _brute_table(seg, gt)
    assert t.total == seg.size
    assert t.seg_ids.dtype == seg.dtype and t.gt_ids.dtype == gt.dtype
    order = np.lexsort((t.gt_ids, t.seg_ids))
    assert np.array_equal(order, np.arange(len(t)))


@pytest.mark.parametrize("dtype,offset", [(np.uint32, 0), (np.int16, -4), (np.uint64, 2**63)])
def test_contingency_volumes_by_slabs_equals_whole(dtype, offset):
    from floodfilling.evaluation import contingency_volumes

    rng = np.random.default_rng(7)
    seg = rng.integers(0, 6, size=(7, 5, 6)).astype(dtype) + np.array(offset).astype(dtype)
    gt = rng.integers(0, 4, size=(7, 5, 6)).astype(np.uint8)
    whole = contingency(seg, gt)
    for slab in (1, 30, 61, 10**6):  # one voxel (one plane), a plane, two planes and a bit, all
        t = contingency_volumes(seg, gt, slab_voxels=slab)
        for a, b in ((t.seg_ids, whole.seg_ids), (t.gt_ids, whole.gt_ids), (t.counts, whole.counts)):
            assert a.dtype == b.dtype and np.array_equal(a, b), slab
    with pytest.raises(ValueError, match="shape mismatch"):
        contingency_volumes(seg, gt[:3])


def test_contingency_huge_sparse_ids_uses_sorting_path():
    seg = np.array([[[0, 2**50, 2**50, 7]]], dtype=np.uint64)
    gt = np.array([[[2**62, 2**62, 1, 1]]], dtype=np.uint64)
    assert _as_dict(contingency(seg, gt)) == {(0, 2**62): 1, (2**50, 2**62): 1, (2**50, 1): 1, (7, 1): 1}


def test_contingency_drop_gt_zero_and_sizes():
    seg = np.array([1, 1, 2, 2, 0]).reshape(1, 1, 5)
    gt = np.array([0, 3, 3, 0, 3]).reshape(1, 1, 5)
    t = contingency(seg, gt)
    d = t.drop_gt_zero()
    assert _as_dict(d) == {(0, 3): 1, (1, 3): 1, (2, 3): 1}
    ids, sizes = t.seg_sizes()
    assert ids.tolist() == [0, 1, 2] and sizes.tolist() == [1, 2, 2]
    ids, sizes = t.gt_sizes()
    assert ids.tolist() == [0, 3] and sizes.tolist() == [2, 3]


# --------------------------------------------------------------------------------------------
# gt_zero and properties


def test_gt_zero_ignore_equals_masking():
    rng = np.random.default_rng(11)
    gt = rng.integers(0, 5, size=(6, 6, 6))
    seg = rng.integers(0, 4, size=(6, 6, 6))
    mask = gt != 0
    ign = evaluate(seg, gt, gt_zero="ignore")
    masked = evaluate(seg[mask].reshape(1, 1, -1), gt[mask].reshape(1, 1, -1), gt_zero="label")
    for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall"):
        assert ign[k] == pytest.approx(masked[k], rel=1e-12, abs=1e-12)
    assert ign["voxels"] == int(mask.sum())
    lab = evaluate(seg, gt, gt_zero="label")
    assert lab["voxels"] == gt.size and lab["vi"] != pytest.approx(ign["vi"])


def test_seg_zero_is_an_ordinary_label():
    gt = np.array([1, 1, 2, 2]).reshape(1, 1, 4)
    seg = np.array([0, 0, 0, 0]).reshape(1, 1, 4)  # nothing segmented: one "object" 0
    r = evaluate(seg, gt)
    assert r["precision"] == pytest.approx(0.5) and r["vi_merge"] == pytest.approx(1.0)
    assert r["false_merges"] == []  # seg 0 is never listed as a merge
    assert r["seg_objects"] == 0 and r["gt_objects"] == 2


def test_all_gt_zero_ignored_raises():
    with pytest.raises(ValueError, match="no voxels to evaluate"):
        evaluate(np.ones((2, 2, 2), int), np.zeros((2, 2, 2), int))
    assert evaluate(np.ones((2, 2, 2), int), np.zeros((2, 2, 2), int), gt_zero="label")["vi"] == 0


labels = hnp.arrays(np.int64, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=5),
                    elements=st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(labels, st.integers(0, 2**31))
def test_properties(gt, seed):
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, 4, size=gt.shape)
    a = evaluate(seg, gt, gt_zero="label")
    b = evaluate(gt, seg, gt_zero="label")
    # symmetry: swapping the arguments swaps split/merge and precision/recall
    assert a["vi_split"] == pytest.approx(b["vi_merge"], abs=1e-12)
    assert a["vi_merge"] == pytest.approx(b["vi_split"], abs=1e-12)
    assert a["precision"] == pytest.approx(b["recall"])
    assert a["are"] == pytest.approx(b["are"], abs=1e-12)
    assert a["vi_split"] >= 0 and a["vi_merge"] >= 0
    assert 0 <= a["are"] <= 1 and 0 < a["precision"] <= 1 and 0 < a["recall"] <= 1
    # VI is bounded by log2(n)
    assert a["vi"] <= math.log2(gt.size) + 1e-9
    # relabelling invariance
    perm = rng.permutation(10) + 20
    c = evaluate(perm[seg], gt, gt_zero="label")
    assert c["vi"] == pytest.approx(a["vi"], abs=1e-12) and c["are"] == pytest.approx(a["are"], abs=1e-12)


# --------------------------------------------------------------------------------------------
# evaluate: lists, JSON, report


def _example():
    # gt objects 1 (8 voxels), 2 (4), 3 (4); seg 10 = gt1 + all of gt2 (merge of 4 voxels),
    # seg 11 + seg 12 split gt 3 (2 + 2), seg 0 leaves one... nothing: everything segmented.
    gt = np.array([1] * 8 + [2] * 4 + [3] * 4).reshape(1, 2, 8)
    seg = np.array([10] * 8 + [10] * 4 + [11, 11, 12, 12]).reshape(1, 2, 8)
    return seg, gt


def test_evaluate_lists_and_json():
    seg, gt = _example()
    r = evaluate(seg, gt)
    json.loads(json.dumps(r))
    assert r["seg_objects"] == 3 and r["gt_objects"] == 3 and r["voxels"] == 16
    # each object's share of the VI, by hand: seg 10 holds 8 + 4 of 16 voxels, gt 3 is 2 + 2
    merge_bits = (8 * math.log2(12 / 8) + 4 * math.log2(12 / 4)) / 16
    assert r["false_merges"] == [
        {"seg_id": 10, "voxels": 12, "absorbed_voxels": 4, "n_gt": 2, "gt": [[1, 8], [2, 4]],
         "vi_merge": pytest.approx(merge_bits, abs=1e-12)}
    ]
    assert r["false_splits"] == [
        {"gt_id": 3, "voxels": 4, "split_voxels": 2, "n_seg": 2, "seg": [[11, 2], [12, 2]],
         "vi_split": pytest.approx(0.25, abs=1e-12)}
    ]
    # the only impure objects: their shares are the whole terms
    assert r["vi_merge"] == pytest.approx(merge_bits, abs=1e-12)
    assert r["vi_split"] == pytest.approx(0.25, abs=1e-12)
    for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall"):
        assert type(r[k]) is float
    for k in ("voxels", "seg_objects", "gt_objects"):
        assert type(r[k]) is int


def test_evaluate_ranking_and_top():
    # three merges absorbing 1, 3 and 2 voxels; ranked 3, 2, 1
    gt = np.array([1, 1, 1, 1, 2] + [3, 3, 3, 3, 4, 4, 4] + [5, 5, 5, 5, 6, 6]).reshape(1, 1, -1)
    seg = np.array([7] * 5 + [8] * 7 + [9] * 6).reshape(1, 1, -1)
    r = evaluate(seg, gt, top=2)
    assert [m["seg_id"] for m in r["false_merges"]] == [8, 9]
    assert [m["absorbed_voxels"] for m in r["false_merges"]] == [3, 2]
    r = evaluate(gt, seg, top=5)  # arguments swapped: now they are splits
    assert [s["gt_id"] for s in r["false_splits"]] == [8, 9, 7]
    assert evaluate(seg, gt, top=0)["false_merges"] == []


def test_object_shares_sum_to_vi_terms():
    # every impure object listed (no id 0 on either side): the shares add up to the terms,
    # in bits and in nats
    rng = np.random.default_rng(5)
    gt = rng.integers(1, 9, (4, 5, 6))
    seg = (gt + rng.integers(0, 3, gt.shape)) % 7 + 1
    for base in (2.0, math.e):
        r = evaluate(seg, gt, top=100, base=base)
        assert sum(m["vi_merge"] for m in r["false_merges"]) == pytest.approx(r["vi_merge"], rel=1e-12)
        assert sum(s["vi_split"] for s in r["false_splits"]) == pytest.approx(r["vi_split"], rel=1e-12)


def test_gt_zero_affects_lists():
    gt = np.array([0, 0, 1, 1]).reshape(1, 1, 4)
    seg = np.array([5, 5, 5, 5]).reshape(1, 1, 4)
    assert evaluate(seg, gt, gt_zero="ignore")["false_merges"] == []
    lab = evaluate(seg, gt, gt_zero="label")["false_merges"]
    assert lab[0]["gt"] == [[0, 2], [1, 2]]


def test_format_report():
    seg, gt = _example()
    r = evaluate(seg, gt)
    text = format_report(r)
    assert isinstance(text, str) and len(text.splitlines()) >= 8
    assert f"{r['vi']:.4f}" in text and f"{r['are']:.4f}" in text
    assert "seg 10" in text and "gt 3" in text
    assert "precision" in text and "recall" in text


# --------------------------------------------------------------------------------------------
# validation


def test_validation_errors():
    a = np.zeros((2, 3, 4), np.uint32)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        evaluate(a, np.zeros((2, 3, 5), np.uint32))
    with pytest.raises(ValueError, match="seg must have an integer dtype.*float32"):
        variation_of_information(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="gt must have an integer dtype.*float64"):
        adapted_rand(a, a.astype(np.float64))
    with pytest.raises(ValueError, match="empty"):
        contingency(np.zeros((0, 3, 4), int), np.zeros((0, 3, 4), int))
    with pytest.raises(ValueError, match="gt_zero"):
        evaluate(a, a, gt_zero="drop")
    with pytest.raises(ValueError, match="top"):
        evaluate(a, a, top=-1)


def test_speed_250_cubed():
    rng = np.random.default_rng(5)
    shape = (250, 250, 250)
    gt = (np.arange(250**3, dtype=np.uint32).reshape(shape) // 30_000).astype(np.uint32)
    seg = gt // 2
    seg[rng.random(shape) < 0.01] = 0
    t0 = time.perf_counter()
    r = evaluate(seg.astype(np.uint64), gt)
    elapsed = time.perf_counter() - t0
    assert r["vi_split"] == pytest.approx(0.0, abs=0.1) and r["vi_merge"] > 0.5
    assert elapsed < 15, elapsed  # about 1 s on 2 cores


# --------------------------------------------------------------------------------------------
# real data: the reference segmentation of the FIB-25 cube


def test_reference_fib25_figures():
    ref = SHARED / "reference" / "google_ffn_fib25_training_sample2.npz"
    data = SHARED / "data" / "fib25_train_250.h5"
    if not (ref.exists() and data.exists()):
        pytest.skip(f"shared data not found under {SHARED} (set FFN_SHARED)")
    h5py = pytest.importorskip("h5py")
    seg = np.load(ref)["segmentation"]
    with h5py.File(data, "r") as f:
        gt = f["labels"][:]
    r = evaluate(seg, gt, gt_zero="label")
    # reference README: VI 1.82 (conditional entropies 0.90 and 0.92), ARAND 0.157
    assert round(r["vi"], 2) == 1.82
    assert round(r["vi_split"], 2) == 0.90
    assert round(r["vi_merge"], 2) == 0.92
    assert round(r["are"], 2) == 0.16 and abs(r["are"] - 0.157) < 5e-4
    assert r["seg_objects"] == 254 and r["gt_objects"] == 525
    json.dumps(r)
