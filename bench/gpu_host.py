"""bench/gpu_check.py's host and block sections: the host work of a block (read, normalise,
seeds) per voxel, its Sobel + Gaussian on the device, block inference voxels/s with blocks
prepared ahead, and whether the host keeps a 3 M voxels/s device busy (issue 15)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from gpu_common import mirrored, one_line, peak_memory, reset_peak, run_child, sync, tiny_model

DEVICE_VOXELS_PER_S = 3e6  # the device rate the host must keep up with (issue 15)
GOAL_WAIT_FRACTION = 0.05


def edges_scipy(img):
    from scipy import ndimage

    edges = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
    thresh = np.zeros(edges.shape, dtype=np.float32)
    ndimage.gaussian_filter(edges, 49.0 / 6.0, output=thresh, mode="reflect")
    return edges > thresh


def edges_torch(img, dev):
    """Steps 1-2 of the peaks seeding as torch convolutions: each 1-D pass in float64 and
    rounded to float32 (as SciPy's correlate1d), mode 'reflect' (numpy 'symmetric')."""
    import torch
    import torch.nn.functional as F

    def pass1d(x, w, axis):
        r = (len(w) - 1) // 2
        n = x.shape[axis]
        idx = torch.from_numpy(np.pad(np.arange(n), r, mode="symmetric")).to(dev)
        xp = x.index_select(axis, idx).double().movedim(axis, -1)
        shape = xp.shape
        out = F.conv1d(xp.reshape(-1, 1, shape[-1]), torch.tensor(w, dtype=torch.float64, device=dev).view(1, 1, -1))
        return out.reshape(shape[:-1] + (n,)).movedim(-1, axis).float()

    x = torch.from_numpy(np.ascontiguousarray(img, np.float32)).to(dev)
    mag = None
    for a in range(3):
        g = pass1d(x, [-1.0, 0.0, 1.0], a)
        for b in range(3):
            if b != a:
                g = pass1d(g, [1.0, 2.0, 1.0], b)
        g = g * g
        mag = g if mag is None else mag + g
    mag = torch.sqrt(mag)
    sigma = 49.0 / 6.0
    radius = int(4.0 * sigma + 0.5)
    xs = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * xs ** 2)
    w = (w / w.sum()).tolist()
    t = mag
    for a in range(3):
        t = pass1d(t, w, a)
    return (mag > t).cpu().numpy()


def sec_host(dev, deadline, args, ctx) -> dict:
    """Host work of one block, per part; device Sobel + Gaussian; GIL check."""
    from scipy import ndimage

    from floodfilling import kernels
    from floodfilling.inference.seeds import inside_margin
    from floodfilling.normalise import Normalisation

    edge = args.host_block
    vol = mirrored(edge)
    import h5py

    path = ctx["tmp"] / "host-block.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=vol, chunks=(64, 64, 64))
    norm = Normalisation("fixed", 128.0, 33.0)
    parts = {}
    t = time.perf_counter()
    with h5py.File(path, "r") as f:  # (from the page cache: a lower bound of a real read)
        vol = f["raw"][:]
    parts["read"] = time.perf_counter() - t
    t = time.perf_counter()
    img = norm.apply(vol, "block")
    parts["normalise"] = time.perf_counter() - t
    t = time.perf_counter()
    filt = edges_scipy(img)
    parts["sobel_gaussian"] = time.perf_counter() - t
    t = time.perf_counter()
    dt = ndimage.distance_transform_edt(~filt).astype(np.float32)
    dt = dt + np.random.RandomState(42).random_sample(dt.shape) * 1e-4
    parts["distance_transform"] = time.perf_counter() - t
    t = time.perf_counter()
    pts = inside_margin(kernels.find_peaks(dt, min_distance=3, threshold=0.0), img.shape, (16, 16, 16))
    parts["peaks"] = time.perf_counter() - t
    total = sum(parts.values())
    out = {"block": [edge] * 3, "seconds_by_part": parts, "prepare_seconds": total, "seeds": int(len(pts)),
           "host_seconds_per_voxel": total / edge ** 3, "threads_native": "OMP_NUM_THREADS=" +
           os.environ.get("OMP_NUM_THREADS", "unset")}
    # the Sobel + Gaussian as torch convolutions on the device (warm once, then timed)
    try:
        edges_torch(img[:40, :40, :40], dev)
        sync(dev)
        t = time.perf_counter()
        filt_dev = edges_torch(img, dev)
        sync(dev)
        t_dev = time.perf_counter() - t
        diff = int(np.count_nonzero(filt_dev != filt))
        out["sobel_gaussian_on_device"] = {
            "device": str(dev), "seconds": t_dev, "host_seconds": parts["sobel_gaussian"],
            "voxels_differing": diff, "identical": diff == 0,
            "faster": "device" if t_dev < parts["sobel_gaussian"] else "host",
            "library_default": "host (SciPy): kept; switch only where measurably faster and identical"}
    except Exception as exc:  # noqa: BLE001
        out["sobel_gaussian_on_device"] = {"error": one_line(exc)}
    # GIL: rate of a Python loop alone and while a thread prepares the block
    def loop(secs):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            for i in range(2000):
                n += i
        return n / secs

    alone = loop(1.0)
    th = threading.Thread(target=lambda: ndimage.distance_transform_edt(~filt))
    th.start()
    busy = loop(min(1.0, max(0.2, parts["distance_transform"] * 0.8)))
    th.join()
    out["python_loop_rate_while_preparing"] = busy / alone
    out["python_loop_note"] = "1.0: the preparing thread does not slow the engine's Python (GIL released); " \
                              f"on a loaded machine with {os.cpu_count()} cores, less also from sharing the cores"
    return out


def child_blocks(spec: dict) -> dict:
    """In a child process: the runs of ``spec`` through segment_blocks (one process start)."""
    import hashlib

    import h5py
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.distributed.run import segment_blocks
    from floodfilling.model import select_device

    dev = select_device(spec["device"])
    results = []
    for run in spec["runs"]:
        reset_peak(dev)
        work, out = Path(run["dir"]) / "work", Path(run["dir"]) / "seg.h5"
        cfg = InferenceConfig(device=spec["device"], precision=spec["precision"], prefetch=run["prefetch"],
                              min_segment_size=spec.get("min_segment_size", 1000))
        t0 = time.perf_counter()
        res = segment_blocks(spec["image"], f"{out}:seg", block=tuple(spec["block"]), workdir=str(work),
                             model=spec["model"], config=cfg, inflight=run["inflight"])
        secs = time.perf_counter() - t0
        rep = json.loads((work / "reconcile.json").read_text())
        with h5py.File(out, "r") as f:
            seg = f["seg"][:]
        results.append({"name": run["name"], "inflight": run["inflight"], "prefetch": run["prefetch"],
                        "seconds": secs, "voxels": int(seg.size), "voxels_per_s": seg.size / secs,
                        "segmented_voxels": sum(r["voxels"] for r in rep["per_rank"]),
                        "objects": res.n_objects, "blocks": res.n_blocks, "per_rank": rep["per_rank"],
                        "blocks_s": rep["timings"].get("blocks_s"),  # phase 2 only (plan, reconcile, write aside)
                        "voxels_per_block_phase_s": seg.size / rep["timings"]["blocks_s"],
                        "seg_sha256": hashlib.sha256(seg.tobytes()).hexdigest(), **peak_memory(dev)})
    return {"runs": results, "torch_threads": torch.get_num_threads()}


def sec_blocks(dev, deadline, args, ctx) -> dict:
    import h5py

    tmp = ctx["tmp"]
    model = str(tiny_model(tmp)[0]) if args.quick else None
    kmain = args.block_inflight or (4 if dev.type == "cpu" else 16)
    out = {"model": "tiny (FOV 9)" if args.quick else "bundled depth 12", "precision": "fp32"}
    small = tmp / "small.h5"
    with h5py.File(small, "w") as f:
        f.create_dataset("raw", data=mirrored(args.small_edge))
    spec = {"device": str(dev), "precision": "fp32", "model": model, "image": f"{small}:raw",
            "block": [args.small_edge // 2] * 3, "min_segment_size": 200 if args.quick else 1000, "runs": [
                {"name": "K=1 prefetch 0", "inflight": 1, "prefetch": 0},
                {"name": f"K={kmain} prefetch 0", "inflight": kmain, "prefetch": 0},
                {"name": f"K={kmain} prefetch {args.prefetch}", "inflight": kmain, "prefetch": args.prefetch}]}
    for i, r in enumerate(spec["runs"]):
        r["dir"] = str(tmp / f"small-{i}")
    runs = run_child("blocks", spec, deadline, tmp)["runs"]
    a, b, c = (r["seg_sha256"] for r in runs)
    out["small"] = {"edge": args.small_edge, "block": spec["block"], "runs": runs,
                    "prefetch_identical": b == c, "k1_identical_to_k": a == b,
                    "k1_note": "exact on the CPU; on a GPU only if the network's logits do not depend on the batch"}
    if b != c:
        raise AssertionError("blocks prepared ahead changed the segmentation (prefetch 0 != prefetch "
                             f"{args.prefetch}); see small.runs")
    big = tmp / "big.h5"
    with h5py.File(big, "w") as f:
        f.create_dataset("raw", data=mirrored(args.edge), chunks=(64, 64, 64))
    spec.update(image=f"{big}:raw", block=list(args.block), runs=[
        {"name": f"K={kmain} prefetch {args.prefetch}", "inflight": kmain, "prefetch": args.prefetch,
         "dir": str(tmp / "big")}])
    if args.quick:  # cheap here: the engine's wait without prefetch, for comparison
        spec["runs"].append({"name": f"K={kmain} prefetch 0", "inflight": kmain, "prefetch": 0,
                             "dir": str(tmp / "big0")})
    try:
        out["volume"] = {"edge": args.edge, "block": list(args.block), "mirrored": "np.pad reflect of the FIB-25 cube",
                         "runs": run_child("blocks", spec, deadline, tmp)["runs"]}
    except TimeoutError as exc:
        done = list((tmp / "big" / "work" / "blocks").glob("*.h5")) if (tmp / "big").exists() else []
        out["volume"] = {"edge": args.edge, "error": str(exc), "blocks_finished_by_then": len(done)}
    return out


def host_keeps_up(doc: dict, prefetch: int) -> dict:
    """Issue 15's arithmetic: would the host make a 3 M voxels/s device wait?"""
    host = doc["sections"].get("host", {})
    vol = doc["sections"].get("blocks", {}).get("volume", {}).get("runs", [])
    out = {"device_voxels_per_s_assumed": DEVICE_VOXELS_PER_S, "prefetch_threads": prefetch,
           "goal_wait_fraction": GOAL_WAIT_FRACTION}
    spv = host.get("host_seconds_per_voxel")
    if spv is None:
        return dict(out, error="host section missing")
    busy = spv * DEVICE_VOXELS_PER_S
    out.update(host_seconds_per_voxel=spv, host_seconds_per_voxel_from=f"host section, {host['block']} block, this CPU",
               host_core_seconds_per_device_second=busy,
               steady_state_wait_fraction=max(0.0, 1 - prefetch / busy) if prefetch else busy / (1 + busy),
               steady_state_note="prefetch P threads keep up when P >= host_core_seconds_per_device_second "
                                 "and each has a core (a GPU node has 8 or more per GPU rank): the engine then "
                                 "waits only for the first K blocks; without prefetch it stops for each block's "
                                 "preparation, a fraction busy / (1 + busy) of the run")
    for r in vol:
        if r.get("blocks_s"):
            rank = r["per_rank"][0]
            row = {"run": r["name"], "prefetch": r["prefetch"], "host_wait_seconds": rank["host_wait_seconds"],
                   "prepare_seconds": rank["prepare_seconds"], "blocks_s": r["blocks_s"],
                   "wait_fraction_of_this_run": rank["host_wait_seconds"] / r["blocks_s"],
                   # (with prefetch: wall time of threads sharing the cores, so above the one-core cost)
                   "host_seconds_per_segmented_voxel_in_run": rank["prepare_seconds"] / max(rank["voxels"], 1)}
            if r["prefetch"]:
                # the engine admits K blocks before its first step: their preparation is never hidden
                per_block = r["segmented_voxels"] / max(r["blocks"], 1)
                fill = -(-min(r["inflight"], r["blocks"]) // r["prefetch"]) * per_block * spv
                device_s = r["segmented_voxels"] / DEVICE_VOXELS_PER_S
                row.update(start_fill_wait_s_at_3M=fill, run_device_s_at_3M=device_s,
                           start_fill_fraction_of_this_volume_at_3M=fill / (fill + device_s),
                           # blocks a rank must run for that start to stay under the goal
                           blocks_per_rank_for_start_fill_under_goal=int(np.ceil(
                               fill / (GOAL_WAIT_FRACTION * per_block / DEVICE_VOXELS_PER_S))))
            out.setdefault("measured", []).append(row)
    return out
