"""Strong scaling of block inference (``mpiexec -n R ffn segment --block ...``) and a cost model
for N nodes.

    python bench/scaling.py                     # tiny flooding model, 27 blocks, ranks 1 and 2 (~1-2 min)
    python bench/scaling.py --preset bundled    # bundled depth-12 network, 8 blocks (~20 min on 2 cores)
    python bench/scaling.py --quick             # seconds: checks the script, writes nothing
    python bench/scaling.py --nodes 512 --target 8192,8192,8192 --ranks-per-node 12 \
        --model-block 128,256,256 --model-halo 24,24,24                          # cost-model parameters

Every rank runs with ONE thread (``OMP_NUM_THREADS=1`` and ``--threads 1``, i.e. torch and the
native kernels use one thread): ranks, not threads, use the cores. The same command is run
with 1 and 2 ranks on a fresh work directory each; the outputs must be identical. Reported:
wall time per rank count, the speed-up (target >= 1.7x for 1 -> 2 ranks), and the phases
from ``DIR/reconcile.json`` (block inference, pair matching, union-find, writing).

Cost model at N nodes (printed, and stored in the JSON): for a target volume and the same
block/halo, the number of blocks and blocks per rank, the halo overhead (segmented voxels /
output voxels - 1, exact from the block grid), the block time from this run's measured cost
per segmented voxel (so it is as representative as the model and data of this run), the
reconciliation time from the measured cost per overlap voxel (reading both blocks' overlap +
pair counting) times the target grid's overlap voxels, spread over the ranks, union-find
(serial, rank 0; cost per edge measured on a random 1 M-edge graph), and writing: all ranks write their cores (per-rank bandwidth measured in the
multi-rank run, capped by ``--fs-gbs``); the single-writer time (1 rank, gzip) is shown too.

Results: ``bench/results/scaling-<machine>.json``. Never run this while another job uses the
cores: every figure is meaningless then (the script records the load average and warns).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402

PRESETS = {
    # tiny hand-set model (FOV 9, deltas 2) that floods bright regions: engine + scheduling cost
    "tiny": dict(crop="40:136,29:221,29:221", block="32,64,64", halo="6,6,6", model="tiny",
                 sets=["min_segment_size=200"]),
    # the bundled reference network (FOV 33, deltas 8), minimal halo (FOV radius)
    "bundled": dict(crop="92:158,61:189,61:189", block="33,64,64", halo="16,16,16", model=None, sets=[]),
    "quick": dict(crop="100:148,60:156,60:156", block="24,48,48", halo="6,6,6", model="tiny",
                  sets=["min_segment_size=200"]),
}


def tiny_model(path: Path) -> Path:
    """logits = seed + 6 * mean3x3x3(normalised image): floods bright regions (as the tests)."""
    from floodfilling.testing import mean_flood_model

    return mean_flood_model(path)


def make_image(tmp: Path, crop: str) -> str:
    import h5py

    sl = tuple(slice(int(a), int(b)) for a, b in (p.split(":") for p in crop.split(",")))
    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw = f["raw"][sl]
    with h5py.File(tmp / "image.h5", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [8, 8, 8]
    return f"{tmp / 'image.h5'}:raw"


def run(ranks: int, image: str, out: Path, work: Path, args, preset: dict, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "floodfilling.cli", "segment", image, f"{out}:seg", "--block", preset["block"],
           "--halo", preset["halo"], "--workdir", str(work), "--threads", "1", "--device", "cpu", "-q"]
    if model:
        cmd += ["--model", model]
    for s in preset["sets"]:
        cmd += ["--set", s]
    mpiexec = shutil.which("mpiexec")
    if mpiexec:
        cmd = [mpiexec, "-n", str(ranks)] + cmd
    elif ranks > 1:
        raise SystemExit("mpiexec not found: pip install 'floodfilling[mpi]'")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rep = json.loads((work / "reconcile.json").read_text())
    return {"ranks": ranks, "wall_s": wall, **rep}


def axis_terms(extent: int, block: int, halo: int, fov: int):
    """Per axis: number of cores, sum of outer lengths, and over ordered pairs (k, m), k != m,
    of intervals that intersect: their count and the sum of their overlap lengths."""
    from floodfilling.geometry import axis_bounds

    b = axis_bounds(extent, min(block, extent), fov)
    lo = np.maximum(np.array(b[:-1]) - halo, 0)
    hi = np.minimum(np.array(b[1:]) + halo, extent)
    n = len(lo)
    ov = np.maximum(np.minimum(hi[:, None], hi[None, :]) - np.maximum(lo[:, None], lo[None, :]), 0)
    return n, float((hi - lo).sum()), ov, hi - lo


def union_find_cost(n_edges: int = 1_000_000) -> float:
    """Seconds per merge edge of the native union-find on a random 1 M-edge graph (the run's
    own handful of edges is all fixed overhead)."""
    from floodfilling import kernels

    rng = np.random.default_rng(0)
    e = rng.integers(1, 4 * n_edges, (n_edges, 2)).astype(np.uint64)
    t0 = time.perf_counter()
    kernels.union_find(e)
    return (time.perf_counter() - t0) / n_edges


def cost_model(measured: dict, args, fov, parallel: dict | None = None) -> dict:
    """Time at N nodes for the target volume, from the 1-rank measurement's unit costs.

    Computed axis by axis (a 3-D block is a product of intervals), so targets with millions
    of blocks cost nothing to model."""
    t = measured["timings"]
    seg_vox = sum(r["voxels"] for r in measured["per_rank"])
    per_vox = t["block_seconds_sum"] / max(seg_vox, 1)  # seconds per segmented (outer) voxel, 1 rank
    per_ov = (t["pair_read_s"] + t["pair_match_s"]) / max(t["pair_voxels"], 1)  # per overlap voxel
    per_pair = (t["pair_read_s"] + t["pair_match_s"]) / max(t["pairs_matched"], 1)
    out_vox = float(np.prod(measured["shape"]))
    write_per_vox = t["write_s"] / out_vox  # rank 0 alone, gzip (the 1-rank path)
    # several ranks: each writes its cores uncompressed; per-rank bandwidth from a multi-rank run
    if parallel and parallel["timings"].get("parallel_write_s_max"):
        rank_bw = parallel["timings"]["parallel_write_bytes"] / parallel["ranks"] / parallel["timings"]["parallel_write_s_max"]
    else:
        rank_bw = 4.0 / write_per_vox
    itemsize = 4
    uf_per_edge = union_find_cost()
    target, block, halo = tuple(args.target), tuple(args.model_block), tuple(args.model_halo)
    terms = [axis_terms(e, b, h, f) for e, b, h, f in zip(target, block, halo, fov)]
    n_blocks = int(np.prod([tm[0] for tm in terms]))
    outer_total = float(np.prod([tm[1] for tm in terms]))
    mean_outer = outer_total / n_blocks
    # pairs of distinct blocks whose outer boxes intersect: product over axes of the ordered
    # index pairs with intersecting intervals (diagonal included), minus the diagonal, halved
    cnt = [float((tm[2] > 0).sum()) for tm in terms]
    vox = [float(tm[2].sum()) for tm in terms]
    diag_vox = float(np.prod([tm[3].sum() for tm in terms]))
    n_pairs = int(round((np.prod(cnt) - n_blocks) / 2))
    pair_vox = (np.prod(vox) - diag_vox) / 2
    edges = measured["merges"] / max(measured["n_pairs"], 1) * n_pairs
    rows = []
    for nodes in sorted({1, 2, 8, 64, args.nodes}):
        ranks = nodes * args.ranks_per_node
        per_rank_blocks = n_blocks / ranks
        t_blocks = np.ceil(per_rank_blocks) * mean_outer * per_vox  # dynamic scheduling: at most one block of tail
        t_match = pair_vox * per_ov / ranks
        t_uf = edges * uf_per_edge
        t_single = float(np.prod(target)) * write_per_vox  # ONE writer (rank 0, gzip)
        t_write = float(np.prod(target)) * itemsize / min(ranks * rank_bw, args.fs_gbs * 1e9)  # all ranks
        total = t_blocks + t_match + t_uf + (t_write if ranks > 1 else t_single)
        rows.append({"nodes": nodes, "ranks": ranks, "blocks_per_rank": per_rank_blocks,
                     "block_phase_s": t_blocks, "reconcile_pairs_s": t_match, "union_find_s": t_uf,
                     "single_writer_s": t_single, "parallel_write_s": t_write, "total_s": total,
                     "parallel_efficiency": (n_blocks * mean_outer * per_vox) / (ranks * total)})
    return {"target_shape": list(target), "block": list(block), "halo": list(halo), "fov": list(fov),
            "ranks_per_node": args.ranks_per_node, "n_blocks": n_blocks, "n_pairs": n_pairs,
            "overlap_voxels": pair_vox, "halo_overhead": outer_total / float(np.prod(target)) - 1,
            "seconds_per_segmented_voxel": per_vox, "reconcile_seconds_per_overlap_voxel": per_ov,
            "reconcile_seconds_per_pair_measured": per_pair, "write_seconds_per_output_voxel": write_per_vox,
            "parallel_write_bytes_per_s_per_rank": rank_bw, "fs_bandwidth_gbs": args.fs_gbs,
            "union_find_seconds_per_edge": uf_per_edge, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--quick", action="store_true", help="tiny case (seconds) to check the script; writes nothing")
    ap.add_argument("--ranks", default="1,2", help="rank counts to run (default 1,2)")
    ap.add_argument("--nodes", type=int, default=512, help="largest node count in the cost model")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="ranks per node in the cost model")
    ap.add_argument("--target", default="8192,8192,8192", help="target volume z,y,x for the cost model")
    ap.add_argument("--fs-gbs", type=float, default=100.0,
                    help="file-system write bandwidth (GB/s) that caps the parallel writer in the cost model")
    ap.add_argument("--model-block", default="128,256,256", help="block z,y,x for the cost model")
    ap.add_argument("--model-halo", default="24,24,24", help="halo z,y,x for the cost model")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    args.target = [int(v) for v in args.target.split(",")]
    args.model_block = [int(v) for v in args.model_block.split(",")]
    args.model_halo = [int(v) for v in args.model_halo.split(",")]
    name = "quick" if args.quick else args.preset
    preset = PRESETS[name]
    ranks = [int(r) for r in args.ranks.split(",")]
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.2f}: another job uses the cores, timings are meaningless", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="ffn-scaling-"))
    try:
        from floodfilling.model import load_model

        model = str(tiny_model(tmp / "tiny.npz")) if preset["model"] == "tiny" else preset["model"]
        _, info = load_model(model, "cpu")
        image = make_image(tmp, preset["crop"])
        results, outs = [], []
        for r in ranks:
            out, work = tmp / f"seg-{r}.h5", tmp / f"work-{r}"
            res = run(r, image, out, work, args, preset, model)
            import h5py

            with h5py.File(out, "r") as f:
                seg = f["seg"][:]
            res["shape"] = list(seg.shape)
            outs.append(seg)
            results.append(res)
            t = res["timings"]
            print(f"{r} rank(s): wall {res['wall_s']:.1f} s (blocks {t['blocks_s']:.1f} s, pair matching "
                  f"{t['match_s']:.2f} s, union-find {t['union_find_s'] * 1e3:.1f} ms, write {t['write_s']:.2f} s); "
                  f"{res['n_blocks']} blocks, {res['objects']} objects, {res['merges']} merges over {res['n_pairs']} pairs")
        same = all(np.array_equal(outs[0], o) for o in outs[1:])
        print(f"outputs identical across rank counts: {same}")
        base = results[0]
        speedups = {}
        for res in results[1:]:
            s = base["wall_s"] / res["wall_s"]
            sb = base["timings"]["blocks_s"] / res["timings"]["blocks_s"]
            speedups[f"{base['ranks']}->{res['ranks']}"] = {"wall": s, "blocks_phase": sb}
            print(f"speed-up {base['ranks']} -> {res['ranks']} ranks: {s:.2f}x wall, {sb:.2f}x block phase "
                  f"(target >= 1.7x for 1 -> 2)")
        model_cost = cost_model(base, args, tuple(info.fov_zyx), results[-1] if len(results) > 1 else None)
        print(f"\ncost model: target {args.target} voxels, block {args.model_block}, halo {args.model_halo}, "
              f"{args.ranks_per_node} rank(s) per node: {model_cost['n_blocks']} blocks, "
              f"{model_cost['n_pairs']} pairs, halo overhead {100 * model_cost['halo_overhead']:.0f}%; measured "
              f"{model_cost['seconds_per_segmented_voxel'] * 1e6:.2f} us per segmented voxel, "
              f"{model_cost['reconcile_seconds_per_pair_measured'] * 1e3:.2f} ms per block pair "
              f"({model_cost['reconcile_seconds_per_overlap_voxel'] * 1e9:.1f} ns per overlap voxel)")
        print(f"{'nodes':>6} {'ranks':>6} {'blocks/rank':>11} {'blocks h':>9} {'reconcile s':>11} "
              f"{'union-find s':>12} {'write s':>8} {'(1 writer h)':>12} {'total h':>8} {'efficiency':>10}")
        for row in model_cost["rows"]:
            print(f"{row['nodes']:>6} {row['ranks']:>6} {row['blocks_per_rank']:>11.1f} {row['block_phase_s'] / 3600:>9.2f} "
                  f"{row['reconcile_pairs_s']:>11.1f} {row['union_find_s']:>12.2f} {row['parallel_write_s']:>8.1f} "
                  f"{row['single_writer_s'] / 3600:>12.2f} "
                  f"{row['total_s'] / 3600:>8.2f} {row['parallel_efficiency']:>10.2f}")
        doc = {"machine": machine_id(), "preset": name, "threads_per_rank": 1, "OMP_NUM_THREADS": 1,
               "load_average_at_start": load, "valid": load <= 0.5, "crop": preset["crop"],
               "block": preset["block"], "halo": preset["halo"], "model": preset["model"] or "bundled",
               "outputs_identical": same, "runs": results, "speedups": speedups, "cost_model": model_cost,
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not args.quick:
            path = HERE / "results" / f"scaling-{machine_id()}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path}")
        return 0 if same else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
