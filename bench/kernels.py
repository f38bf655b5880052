"""Microbenchmarks: each native kernel vs its NumPy/scikit-image reference.

Every kernel is first checked against its reference on the benchmark input (exact
equality), then both are timed alternately ``--repeat`` times; the table reports medians.
Results are printed as JSON and written to ``bench/results/kernels-<machine>.json`` where
``<machine>`` is the slugified CPU model plus the core count.

    python bench/kernels.py                # full sizes (needs ~2 GB RAM, a few minutes)
    python bench/kernels.py --quick        # small sizes, smoke test
    python bench/kernels.py --sycl         # reference vs OpenMP vs SYCL (CPU device)

Sizes (full): FOV update of 32 FOVs of 33^3 into one 250^3 canvas and into 32 distinct
canvases; FOV gather of the same; peak finding on the 250^3 FIB-25 distance map (the
seed pipeline: Sobel magnitude > its Gaussian blur, EDT, + 1e-4 noise; a synthetic edge
map when the data file is missing); pair counting / relabel on 64x256x256 uint64 label
arrays with ~1000 ids; union-find on 200k edges.

``--sycl`` (needs ``pip install ".[sycl]"``): each kernel of floodfilling.sycl_backend
through the NumPy reference, the OpenMP launcher and SYCL on the CPU's SYCL device, with
host arrays (copied to USM shared memory and back) and with USM arrays (in place): K = 1,
8, 64 FOVs of 33^3 in K distinct 80^3 canvases and in one 250^3 canvas; pair counting of
two 256^3 uint64 segmentations; relabel of a 256^3 uint32 block with ~1000 ids.  First-call
(kernel fetch + first launch; the compile times of the backend are reported apart) and
steady-state medians; every result checked equal first.  Written to
``bench/results/kernels-sycl-<machine>.json`` with the machine load (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from floodfilling import kernels as K
from floodfilling.kernels_reference import (
    commit_object_reference, count_pairs_reference, find_peaks_reference, gather_fovs_reference,
    relabel_reference, union_find_reference, update_fovs_reference,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, cpu_model, machine_id  # noqa: E402

DATA = SHARED / "data" / "fib25_train_250.h5"
TARGETS = {"update_fovs": 10.0, "find_peaks": 5.0, "count_pairs": 10.0}


# ------------------------------------------------------------------------- timing


def bench_pair(name, size, ref_fn, nat_fn, repeat, target=None, setup=None):
    """Alternate reference, native (default threads) and native (1 thread) runs; report
    medians and the per-round speedup median."""
    ref_t, nat_t, one_t = [], [], []
    threads = K.get_num_threads()
    for _ in range(repeat):
        for fn, acc, nt in ((ref_fn, ref_t, threads), (nat_fn, nat_t, threads),
                            (nat_fn, one_t, 1)):
            K.set_num_threads(nt)
            state = setup() if setup else None
            t0 = time.perf_counter()
            fn(state) if setup else fn()
            acc.append(time.perf_counter() - t0)
    K.set_num_threads(threads)
    ref_s, nat_s = statistics.median(ref_t), statistics.median(nat_t)
    one_s = statistics.median(one_t)
    row = {
        "kernel": name,
        "size": size,
        "reference_s": ref_s,
        "native_s": nat_s,
        "speedup": ref_s / nat_s,
        "speedup_round_median": statistics.median(r / n for r, n in zip(ref_t, nat_t)),
        "native_threads": threads,
        "native_1thread_s": one_s,
        "speedup_1thread": ref_s / one_s,
        "reference_runs_s": ref_t,
        "native_runs_s": nat_t,
        "native_1thread_runs_s": one_t,
    }
    if target is not None:
        row["target"] = target
        row["meets_target"] = row["speedup"] >= target
    print(f"  {name:<34} {size:<44} ref {ref_s * 1e3:9.2f} ms  native {nat_s * 1e3:8.3f} ms"
          f"  x{row['speedup']:6.1f}  | 1 thread {one_s * 1e3:8.3f} ms x{ref_s / one_s:6.1f}",
          file=sys.stderr)
    return row


# ---------------------------------------------------------------------- FOV update


def fov_inputs(rng, k, canvas_shape, distinct, fov=33):
    n_canvases = k if distinct else 1
    canvases = []
    for _ in range(n_canvases):
        c = np.full(canvas_shape, np.nan, np.float32)
        # a partially predicted canvas: a blob of logits around the middle
        sl = tuple(slice(s // 4, 3 * s // 4) for s in canvas_shape)
        c[sl] = rng.standard_normal(c[sl].shape).astype(np.float32) * 3
        canvases.append(c)
    if not distinct:
        canvases = canvases * k
    h = fov // 2
    centers = np.stack([rng.integers(h, s - h, k) for s in canvas_shape], axis=1)
    logits = (rng.standard_normal((k, fov, fov, fov)) * 3 + 1).astype(np.float32)
    return canvases, logits, centers


def check_update(canvases, logits, centers, kw):
    def cp(cv):
        memo = {}
        return [memo.setdefault(id(c), c.copy()) for c in cv]

    cn, cr, ln, lr = cp(canvases), cp(canvases), logits.copy(), logits.copy()
    sn, on = K.update_fovs(cn, ln, centers, **kw)
    sr, orf = update_fovs_reference(cr, lr, centers, **kw)
    assert np.array_equal(sn.view(np.uint32), sr.view(np.uint32)), "update_fovs scores differ"
    assert np.array_equal(on, orf), "update_fovs offsets differ"
    assert np.array_equal(ln.view(np.uint32), lr.view(np.uint32)), "written logits differ"
    for a, b in zip(cn, cr):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), "canvases differ"


def bench_fov(rng, repeat, quick):
    rows = []
    kw = dict(move_threshold=2.1972245773362196, deltas=(8, 8, 8), disco_seed_threshold=0.0)
    cshape = (96, 96, 96) if quick else (250, 250, 250)
    dshape = (64, 64, 64) if quick else (96, 96, 96)
    k = 32
    for label, shape, distinct in ((f"32 FOVs 33^3 -> one {cshape[0]}^3 canvas", cshape, False),
                                   (f"32 FOVs 33^3 -> 32 {dshape[0]}^3 canvases", dshape, True)):
        canvases, logits, centers = fov_inputs(rng, k, shape, distinct)
        check_update(canvases, logits, centers, kw)
        work = logits.copy()

        def setup():
            np.copyto(work, logits)  # fresh network output each round (in-place API)
            return work

        rows.append(bench_pair("update_fovs", label,
                               lambda w: update_fovs_reference(canvases, w, centers, **kw),
                               lambda w: K.update_fovs(canvases, w, centers, **kw),
                               repeat, TARGETS["update_fovs"], setup=setup))
        out = np.empty((k, 33, 33, 33), np.float32)
        ref = gather_fovs_reference(canvases, centers, 33, -2.944)
        K.gather_fovs(canvases, centers, 33, -2.944, out)
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), "gather differs"
        rows.append(bench_pair("gather_fovs", label,
                               lambda: gather_fovs_reference(canvases, centers, 33, -2.944, out),
                               lambda: K.gather_fovs(canvases, centers, 33, -2.944, out),
                               repeat))

    # per-step latency (K = 1), the inference hot path
    canvases, logits, centers = fov_inputs(rng, 1, cshape, False)
    work = logits.copy()
    n_calls = 200

    def many(fn):
        def run():
            for _ in range(n_calls):
                fn(canvases, work, centers, **kw)
        return run

    row = bench_pair("update_fovs K=1 (per call)", "1 FOV 33^3, x200 calls",
                     many(update_fovs_reference), many(K.update_fovs), max(3, repeat))
    for key in ("reference_s", "native_s", "native_1thread_s"):
        row[key] /= n_calls
    rows.append(row)
    # binding overhead: a 1^3 FOV with deltas 0 does (almost) no work
    one_c, one_l, one_x = [np.zeros((3, 3, 3), np.float32)], np.zeros((1, 1, 1, 1), np.float32), \
        np.ones((1, 3), np.int64)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        K.update_fovs(one_c, one_l, one_x, move_threshold=0.9, deltas=0)
    t_py = (time.perf_counter() - t0) / n
    raw = K._native()
    t0 = time.perf_counter()
    for _ in range(n):
        raw.update_fovs(one_c, one_l, one_x, 0.9, (0, 0, 0), 0.0)
    t_raw = (time.perf_counter() - t0) / n
    print(f"  call overhead: update_fovs {t_py * 1e6:.2f} us (binding alone {t_raw * 1e6:.2f} us)",
          file=sys.stderr)
    rows.append({"kernel": "update_fovs call overhead", "size": "1 FOV 1^3, deltas 0",
                 "native_s": t_py, "binding_only_s": t_raw})
    return rows


# -------------------------------------------------------------------------- peaks


def distance_map(quick):
    """The seed pipeline's distance map (float64) on FIB-25, or a synthetic one."""
    if not quick and DATA.exists():
        try:
            import h5py

            with h5py.File(DATA, "r") as f:
                raw = f["raw"][...]
            img = raw.astype(np.float32)
            img = (img - img.mean()) / img.std()
            mag = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
            edges = mag > ndimage.gaussian_filter(mag, 49.0 / 6.0, mode="reflect")
            source = "fib25_train_250 raw (Sobel edges)"
        except ImportError:
            edges = None
    else:
        edges = None
    if edges is None:
        shape = (96, 96, 96) if quick else (250, 250, 250)
        rs = np.random.RandomState(0)
        edges = ndimage.gaussian_filter(rs.random_sample(shape).astype(np.float32), 2) > 0.5
        source = "synthetic random edge map"
    dt = ndimage.distance_transform_edt(~edges).astype(np.float32)
    return dt + 1e-4 * np.random.RandomState(42).random_sample(dt.shape), source


def bench_peaks(repeat, quick):
    dmap, source = distance_map(quick)
    got = K.find_peaks(dmap, min_distance=3, threshold=0.0)
    want = find_peaks_reference(dmap, min_distance=3, threshold=0.0)
    assert np.array_equal(got, want), "find_peaks differs from skimage"
    size = f"{'x'.join(map(str, dmap.shape))} float64, {len(got)} peaks"
    print(f"  distance map: {source}: {len(got)} peaks", file=sys.stderr)
    row = bench_pair("find_peaks", size, lambda: find_peaks_reference(dmap),
                     lambda: K.find_peaks(dmap), repeat, TARGETS["find_peaks"])
    row["source"] = source
    rows = [row]
    d32 = dmap.astype(np.float32)
    assert np.array_equal(K.find_peaks(d32), find_peaks_reference(d32))
    rows.append(bench_pair("find_peaks (float32)", size.replace("float64", "float32"),
                           lambda: find_peaks_reference(d32), lambda: K.find_peaks(d32),
                           repeat))
    return rows


# ---------------------------------------------------------------------- reconcile


def voronoi_labels(shape, n_ids, rng, jitter=0, points_seed=0):
    """Labels of the nearest of n_ids random seeds (a blocky, segmentation-like volume);
    ids are random values < 2^31 drawn from rng.  The seed points come from points_seed;
    jitter moves them (another block's segmentation of the same objects)."""
    prng = np.random.default_rng(points_seed)
    pts = np.stack([prng.integers(0, s, n_ids) for s in shape], axis=1)
    if jitter:
        pts = np.clip(pts + rng.integers(-jitter, jitter + 1, pts.shape), 0, np.array(shape) - 1)
    mask = np.ones(shape, bool)
    mask[tuple(pts.T)] = False
    _, idx = ndimage.distance_transform_edt(mask, return_indices=True)
    ids = np.zeros(shape, np.int64)
    ids[tuple(pts.T)] = np.arange(1, n_ids + 1)
    lut = np.concatenate([[0], rng.choice(2**31, n_ids, replace=False)]).astype(np.uint64)
    return lut[ids[tuple(idx)]]


def bench_reconcile(rng, repeat, quick):
    shape = (16, 64, 64) if quick else (64, 256, 256)
    a = voronoi_labels(shape, 1000, rng)
    b = voronoi_labels(shape, 1000, rng, jitter=4)
    b[rng.random(shape) < 0.01] = 0  # a little unlabelled space
    p, c = K.count_pairs(a, b)
    rp, rc = count_pairs_reference(a, b)
    assert np.array_equal(p, rp) and np.array_equal(c, rc), "count_pairs differs"
    size = f"{'x'.join(map(str, shape))} uint64, {len(np.unique(a))}+{len(np.unique(b))} ids"
    rows = [bench_pair("count_pairs", size + f", {len(p)} pairs",
                       lambda: count_pairs_reference(a, b), lambda: K.count_pairs(a, b),
                       repeat, TARGETS["count_pairs"])]
    # random (worst case: no runs) labels
    ra = rng.integers(0, 1000, shape).astype(np.uint64)
    rb = rng.integers(0, 1000, shape).astype(np.uint64)
    p, c = K.count_pairs(ra, rb)
    rp, rc = count_pairs_reference(ra, rb)
    assert np.array_equal(p, rp) and np.array_equal(c, rc), "count_pairs differs (random)"
    rows.append(bench_pair("count_pairs (i.i.d. random labels)",
                           f"{'x'.join(map(str, shape))} uint64, {len(p)} pairs",
                           lambda: count_pairs_reference(ra, rb),
                           lambda: K.count_pairs(ra, rb), repeat))
    for row in rows:  # timings on a shared machine: record how busy it was
        row["loadavg_1min"] = round(os.getloadavg()[0], 2)

    keys = np.unique(a)[::2]
    values = keys // np.uint64(3) + np.uint64(7)
    want = relabel_reference(a.copy(), keys, values)
    assert np.array_equal(K.relabel(a.copy(), keys, values), want), "relabel differs"
    work = a.copy()

    def setup():
        np.copyto(work, a)
        return work

    rows.append(bench_pair("relabel", f"{'x'.join(map(str, shape))} uint64, {len(keys)} keys",
                           lambda w: relabel_reference(w, keys, values),
                           lambda w: K.relabel(w, keys, values), repeat, setup=setup))

    m = 20000 if quick else 200000
    edges = rng.integers(0, m, (m, 2)).astype(np.uint64) * np.uint64(977)
    got, want = K.union_find(edges), union_find_reference(edges)
    assert all(np.array_equal(x, y) for x, y in zip(got, want)), "union_find differs"
    rows.append(bench_pair("union_find", f"{m} random edges", lambda: union_find_reference(edges),
                           lambda: K.union_find(edges), repeat))
    return rows


# ------------------------------------------------------------------------- SYCL


def bench_sycl(rng, repeat, quick):
    """Reference vs OpenMP vs SYCL (host arrays; USM arrays) per kernel."""
    from floodfilling import sycl_backend as S

    S.select_device(os.environ.get("FFN_SYCL_DEVICE") or "cpu")
    t0 = time.perf_counter()
    info = S.info()
    info["backend_ready_s"] = time.perf_counter() - t0
    info.pop("devices", None)
    rows = []

    def timed(fn, n):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return ts

    def usm_copy(a):
        u = S.empty(a.shape, a.dtype)
        u[...] = a
        return u

    def row(name, size, fns, first_of):
        first = {k: timed(fns[k], 1)[0] for k in first_of}
        runs = {k: timed(f, repeat) for k, f in fns.items()}
        r = {"kernel": name, "size": size}
        for k, ts in runs.items():
            r[f"{k}_s"] = statistics.median(ts)
            r[f"{k}_runs_s"] = ts
        for k, t in first.items():
            r[f"{k}_first_call_s"] = t
        r["sycl_host_vs_openmp"] = r["sycl_host_s"] / r["openmp_s"]
        r["sycl_usm_vs_openmp"] = r["sycl_usm_s"] / r["openmp_s"]
        print(f"{name:12s} {size:34s} ref {r['reference_s']*1e3:9.2f} ms  omp "
              f"{r['openmp_s']*1e3:8.2f} ms  sycl host {r['sycl_host_s']*1e3:8.2f} ms  "
              f"usm {r['sycl_usm_s']*1e3:8.2f} ms", file=sys.stderr)
        rows.append(r)

    kw = dict(move_threshold=2.1972245773362196, deltas=(8, 8, 8), disco_seed_threshold=0.0)
    ks = (1, 8) if quick else (1, 8, 64)
    for distinct, cshape in ((True, (80, 80, 80)), (False, (96,) * 3 if quick else (250,) * 3)):
        for k in ks:
            canvases, logits, centers = fov_inputs(rng, k, cshape, distinct)
            ucanv = [usm_copy(c) for c in {id(c): c for c in canvases}.values()]
            ucanvases = ucanv * k if not distinct else ucanv
            ulogits = usm_copy(logits)
            # equal results first (fresh copies; SYCL on host arrays and on USM arrays)
            memo = {}
            cs = [memo.setdefault(id(c), c.copy()) for c in canvases]
            ls = logits.copy()
            ss, so = S.update_fovs(cs, ls, centers, **kw)
            memo = {}
            cr = [memo.setdefault(id(c), c.copy()) for c in canvases]
            lr = logits.copy()
            sr, orf = update_fovs_reference(cr, lr, centers, **kw)
            su, ou = S.update_fovs(ucanvases, ulogits, centers, **kw)
            for a, b in ((ss, sr), (ls, lr), (su, sr), (ulogits, lr), *zip(cs, cr),
                         *zip(ucanvases, cr)):
                assert np.array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32)), \
                    "SYCL update_fovs differs"
            assert np.array_equal(so, orf) and np.array_equal(ou, orf)
            check_update(canvases, logits, centers, kw)
            size = f"K={k} 33^3, {'distinct' if distinct else 'one'} {cshape[0]}^3"
            lw = logits.copy()
            row("update_fovs", size, {
                "reference": lambda: update_fovs_reference(canvases, lw, centers, **kw),
                "openmp": lambda: K.update_fovs(canvases, lw, centers, **kw),
                "sycl_host": lambda: S.update_fovs(canvases, lw, centers, **kw),
                "sycl_usm": lambda: S.update_fovs(ucanvases, ulogits, centers, **kw),
            }, ["sycl_host"] if k == ks[0] and distinct else [])
            out = np.empty_like(logits)
            uout = S.empty(logits.shape)
            ref = gather_fovs_reference(canvases, centers, 33, 0.05)
            S.gather_fovs(canvases, centers, 33, 0.05, out)
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
            S.gather_fovs(ucanvases, centers, 33, 0.05, uout)
            assert np.array_equal(uout.view(np.uint32), ref.view(np.uint32))
            K.gather_fovs(canvases, centers, 33, 0.05, out)
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
            row("gather_fovs", size, {
                "reference": lambda: gather_fovs_reference(canvases, centers, 33, 0.05),
                "openmp": lambda: K.gather_fovs(canvases, centers, 33, 0.05, out),
                "sycl_host": lambda: S.gather_fovs(canvases, centers, 33, 0.05, out),
                "sycl_usm": lambda: S.gather_fovs(ucanvases, centers, 33, 0.05, uout),
            }, ["sycl_host"] if k == ks[0] and distinct else [])
            del ucanv, ucanvases, ulogits, uout
    shape = (64, 64, 64) if quick else (256, 256, 256)
    a = voronoi_labels(shape, 1000, rng)
    b = voronoi_labels(shape, 1000, rng, jitter=4)
    want = count_pairs_reference(a, b)
    for fn in (K.count_pairs, S.count_pairs):
        got = fn(a, b)
        assert all(np.array_equal(x, y) for x, y in zip(got, want)), "count_pairs differs"
    row("count_pairs", f"{shape[0]}^3 uint64, {len(want[0])} pairs", {
        "reference": lambda: count_pairs_reference(a, b),
        "openmp": lambda: K.count_pairs(a, b),
        "sycl_host": lambda: S.count_pairs(a, b),
        "sycl_usm": lambda: S.count_pairs(a, b),  # copies (widens) its inputs either way
    }, ["sycl_host"])
    del a, b
    labels = voronoi_labels(shape, 1000, rng).astype(np.uint32)
    ids = np.unique(labels).astype(np.uint64)
    values = rng.permutation(len(ids)).astype(np.uint64) + 1
    want = relabel_reference(labels.copy(), ids, values)
    for fn in (K.relabel, S.relabel):
        got = labels.copy()
        fn(got, ids, values)
        assert np.array_equal(got, want), "relabel differs"
    ulab = usm_copy(labels)
    S.relabel(ulab, ids, values)
    assert np.array_equal(ulab, want)
    work, uwork = labels.copy(), usm_copy(labels)
    row("relabel", f"{shape[0]}^3 uint32, {len(ids)} ids", {
        "reference": lambda: relabel_reference(work, ids, values),
        "openmp": lambda: K.relabel(work, ids, values),
        "sycl_host": lambda: S.relabel(work, ids, values),
        "sycl_usm": lambda: S.relabel(uwork, ids, values),
    }, ["sycl_host"])
    # union-find of the block-merge graph: the pairs of two label volumes (overlap matches)
    pairs = count_pairs_reference(labels, voronoi_labels(shape, 1000, rng, jitter=4))[0]
    edges = np.ascontiguousarray(pairs[(pairs[:, 0] != 0) & (pairs[:, 1] != 0)]) + np.array([0, 2**32], np.uint64)
    want = union_find_reference(edges)
    for fn in (K.union_find, S.union_find):
        assert all(np.array_equal(x, y) for x, y in zip(fn(edges), want)), "union_find differs"
    row("union_find", f"{len(edges)} edges, {len(want[0])} ids", {
        "reference": lambda: union_find_reference(edges),
        "openmp": lambda: K.union_find(edges),
        "sycl_host": lambda: S.union_find(edges),
        "sycl_usm": lambda: S.union_find(edges),  # copies its (small) input either way
    }, ["sycl_host"])
    del labels, work, uwork, ulab
    # object commit: a 96^3 object box of a 128^3 canvas (one commit per object of the flood)
    cshape = (64,) * 3 if quick else (128,) * 3
    logit = rng.normal(size=cshape).astype(np.float32)
    seg0 = (voronoi_labels(cshape, 50, rng) % 7).astype(np.int32)
    box = tuple(3 * n // 4 for n in cshape)
    kw = dict(seg_threshold=0.0, min_size=1000, new_id=99)
    seg_w, seg_r = seg0.copy(), seg0.copy()
    got = S.commit_object(logit, (4, 4, 4), seg_w, (4, 4, 4), box, **kw)
    want = commit_object_reference(logit, (4, 4, 4), seg_r, (4, 4, 4), box, **kw)
    assert got[0] == want[0] and np.array_equal(seg_w, seg_r), "commit_object differs"
    assert all(np.array_equal(x, y) for x, y in zip(got[1:], want[1:])), "commit_object differs"
    ulogit, useg = usm_copy(logit), usm_copy(seg0)

    def fresh(fn, lg, sg):  # each commit on the untouched segmentation (the copy is not timed apart)
        def run():
            sg[...] = seg0
            fn(lg, (4, 4, 4), sg, (4, 4, 4), box, **kw)
        return run

    row("commit_object", f"{box[0]}^3 box of a {cshape[0]}^3 canvas", {
        "reference": fresh(commit_object_reference, logit, seg_w),
        "openmp": fresh(K.commit_object, logit, seg_w),
        "sycl_host": fresh(S.commit_object, logit, seg_w),
        "sycl_usm": fresh(S.commit_object, ulogit, useg),
    }, ["sycl_host"])
    # seed peaks: a 128^3 block of the seed pipeline's distance map
    dmap, _ = distance_map(quick)
    block = np.ascontiguousarray(dmap[:128, :128, :128])
    want = find_peaks_reference(block, min_distance=3, threshold=0.0)
    for fn in (K.find_peaks, S.find_peaks):
        assert np.array_equal(fn(block, min_distance=3, threshold=0.0), want), "find_peaks differs"
    ublock = usm_copy(block)
    row("find_peaks", f"{'x'.join(map(str, block.shape))} float64, {len(want)} peaks", {
        "reference": lambda: find_peaks_reference(block, min_distance=3, threshold=0.0),
        "openmp": lambda: K.find_peaks(block, min_distance=3, threshold=0.0),
        "sycl_host": lambda: S.find_peaks(block, min_distance=3, threshold=0.0),
        "sycl_usm": lambda: S.find_peaks(ublock, min_distance=3, threshold=0.0),
    }, ["sycl_host"])
    return info, rows


def main_sycl(args):
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    info, rows = bench_sycl(rng, args.repeat, args.quick)
    result = {
        "machine": machine_id(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "openmp_threads": K.get_num_threads(), "sycl": info,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "python": platform.python_version(), "numpy": np.__version__,
        "repeat": args.repeat, "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).resolve().parent / "results" / f"kernels-sycl-{machine_id()}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds per kernel (median)")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="native threads (0 = default)")
    ap.add_argument("--only", choices=["fov", "peaks", "reconcile"], action="append",
                    help="run only these groups (repeatable; default: all)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: "
                    "bench/results/kernels-<machine>.json; not written with --quick or --only)")
    ap.add_argument("--sycl", action="store_true", help="reference vs OpenMP vs SYCL on the "
                    "CPU SYCL device (bench/results/kernels-sycl-<machine>.json)")
    args = ap.parse_args(argv)
    if not K.HAVE_NATIVE:
        sys.exit("floodfilling._kernels is not built")
    K.set_num_threads(args.threads)
    if args.sycl:
        return main_sycl(args)
    rng = np.random.default_rng(0)
    print(f"machine {machine_id()}, native threads {K.get_num_threads()}, "
          f"build {K.build_info()}", file=sys.stderr)
    groups = args.only or ["fov", "peaks", "reconcile"]
    rows = []
    if "fov" in groups:
        rows += bench_fov(rng, args.repeat, args.quick)
    if "peaks" in groups:
        rows += bench_peaks(max(3, args.repeat // 2 + 1) if not args.quick else args.repeat,
                            args.quick)
    if "reconcile" in groups:
        rows += bench_reconcile(rng, args.repeat, args.quick)
    import scipy
    import skimage

    result = {
        "machine": machine_id(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "native_threads": K.get_num_threads(),
        "build_info": K.build_info(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit_image": skimage.__version__,
        "repeat": args.repeat,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out
    if out is None and not args.quick and args.only is None:
        out = Path(__file__).resolve().parent / "results" / f"kernels-{machine_id()}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    missed = [r for r in rows if r.get("meets_target") is False]
    for r in missed:
        print(f"TARGET MISSED: {r['kernel']} x{r['speedup']:.1f} < x{r['target']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
