"""Inference speed: what a step costs beside the network, and the engine's ceiling.

    python bench/inference.py                 # both parts, writes bench/results/inference-<machine>.json
    python bench/inference.py --part ceiling  # engine ceiling only (seconds)

Part "real" (CPU, bundled depth-12 model, fp32): segments a FIB-25 crop and splits wall time
into network time (inside the torch call) and everything else; measures in the same process
the bare batch-1 forward on a fixed FOV. Goals: step <= 1.05 x bare forward, time outside the
network <= 5 % of wall.

Part "ceiling": the same engine with a network that costs next to nothing but still floods
(update = +6 on bright voxels, -6 on dark ones: it follows the membranes), one thread,
K = 1, 8, 64 canvases in flight. Goal >= 5,000 FOV steps/s.

Never run this while another job uses the cores: it doubles every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402


class CheapPredictor:
    """Stands in for Predictor: gathers FOVs exactly as the real one, then a trivial 'network'."""

    def __init__(self, fov, max_batch=1):
        from floodfilling.inference.predictor import Predictor

        self._gather = Predictor.predict
        self.fov = tuple(fov)
        self.max_batch = max_batch
        shape = (max_batch, 1) + self.fov
        self._img = np.zeros(shape, np.float32)
        self._seed = np.zeros(shape, np.float32)
        self.calls = 0
        self.fovs = 0

    def run(self, n):
        # The canvases' "image" is the precomputed update (+6 on bright voxels, -6 on dark
        # ones), so the network is one addition: logits = seed + update.
        self.calls += 1
        self.fovs += n
        return self._seed[:n, 0] + self._img[:n, 0]

    def predict(self, canvases, centers, pad_logit):
        return self._gather(self, canvases, centers, pad_logit)


def volume_crop(size):
    import h5py

    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw = f["raw"][:]
    if size >= 250:
        return raw
    o = (250 - size) // 2
    return raw[o:o + size, o:o + size, o:o + size]


def bench_ceiling(size: int, ks=(1, 8, 64)) -> dict:
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.inference import seeds
    from floodfilling.inference.canvas import Canvas
    from floodfilling.inference.engine import Job, run_jobs
    from floodfilling.inference.segment import normalise_image

    torch.set_num_threads(1)
    from floodfilling import kernels

    kernels.set_num_threads(1)
    raw = volume_crop(size)
    img = normalise_image(raw, 128, 33)
    sd = seeds.make_seeds("peaks", img, (16, 16, 16))
    cfg = InferenceConfig(min_segment_size=100)
    update = np.where(img > -0.5, np.float32(6.0), np.float32(-6.0)).astype(np.float32)
    out = {"volume": list(img.shape), "seeds": int(len(sd)), "threads": 1, "by_k": {}}
    ref_seg = None
    for k in ks:
        # K copies of the same subvolume in flight (each must give the same result).
        pred = CheapPredictor((33, 33, 33), max_batch=1)
        jobs = [Job(i, lambda: Canvas(update, sd, cfg)) for i in range(k)]
        t0 = time.perf_counter()
        res = run_jobs(jobs, pred, inflight=k)
        dt = time.perf_counter() - t0
        # Memory in a second, untimed run: NumPy reports its buffers to tracemalloc.
        tracemalloc.start()
        run_jobs(jobs, CheapPredictor((33, 33, 33)), inflight=k)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        steps = sum(int(cv.state.counters["steps"]) for cv in res.values())
        segs = [cv.final_segmentation() for cv in res.values()]
        if ref_seg is None:
            ref_seg = segs[0]
        identical = all(np.array_equal(s, ref_seg) for s in segs)
        out["by_k"][str(k)] = {"fov_steps": steps, "seconds": dt, "steps_per_s": steps / dt,
                               "objects_per_canvas": int(res[0].state.counters["objects"]),
                               "all_canvases_identical_to_k1": bool(identical),
                               "peak_traced_mib": peak / 2**20,
                               "peak_traced_mib_per_canvas": peak / 2**20 / k}
    return out


def bench_real(crop: int, repeats: int) -> dict:
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.inference.predictor import Predictor
    from floodfilling.inference.segment import segment_array
    from floodfilling.model import load_model

    net, info = load_model(None)
    threads = torch.get_num_threads()
    # Bare forward, batch 1, the same layout and buffers the engine uses.
    pred = Predictor(net, info.fov_zyx, device="cpu")
    rng = np.random.default_rng(0)
    pred._img[0, 0] = rng.normal(size=info.fov_zyx).astype(np.float32)
    pred._seed[0, 0] = np.float32(-2.944)
    for _ in range(3):
        pred.run(1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.run(1)
        times.append(time.perf_counter() - t)
    bare = float(np.median(times))

    # A real segmentation, with the network call timed from inside.
    import floodfilling.inference.predictor as pmod

    net_time = [0.0]
    orig_run = pmod.Predictor.run

    def timed_run(self, n):
        t = time.perf_counter()
        r = orig_run(self, n)
        net_time[0] += time.perf_counter() - t
        return r

    pmod.Predictor.run = timed_run
    try:
        raw = volume_crop(crop)
        t0 = time.perf_counter()
        res = segment_array(raw, config=InferenceConfig(device="cpu", normalise="fixed"), net_and_info=(net, info))
        wall = time.perf_counter() - t0
    finally:
        pmod.Predictor.run = orig_run
    steps = int(res.counters["steps"])
    # Seeds (Sobel, Gaussian, EDT, peaks) are a one-off cost per volume: reported apart.
    from floodfilling.inference import seeds
    from floodfilling.inference.segment import normalise_image

    t = time.perf_counter()
    seeds.make_seeds("peaks", normalise_image(raw, 128, 33), (16, 16, 16))
    seed_s = time.perf_counter() - t
    loop = wall - seed_s
    return {
        "threads": threads, "crop": [crop] * 3, "fov_steps": steps, "objects": int(res.counters["objects"]),
        "bare_forward_s": bare, "wall_s": wall, "seed_policy_s": seed_s, "network_s": net_time[0],
        "per_step_s": loop / steps, "per_step_over_bare_forward": loop / steps / bare,
        "outside_network_fraction_of_loop": (loop - net_time[0]) / loop,
        "outside_network_ms_per_step": 1000 * (loop - net_time[0]) / steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="inference speed benchmarks")
    ap.add_argument("--part", choices=["all", "real", "ceiling"], default="all")
    ap.add_argument("--crop", type=int, default=96, help="edge of the FIB-25 crop for the real-model part")
    ap.add_argument("--ceiling-size", type=int, default=100, help="edge of the FIB-25 crop for the ceiling part")
    ap.add_argument("--repeats", type=int, default=20, help="bare-forward repetitions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = {"benchmark": "inference", "machine": machine_id(), "cpu_count": os.cpu_count(),
           "command": "python bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.part in ("all", "real"):
        res["real_model_cpu_fp32"] = bench_real(args.crop, args.repeats)
    if args.part in ("all", "ceiling"):
        res["engine_ceiling"] = bench_ceiling(args.ceiling_size)
    text = json.dumps(res, indent=2)
    print(text)
    dest = Path(args.out) if args.out else HERE / "results" / f"inference-{machine_id()}.json"
    if args.part != "all" and not args.out:
        dest = HERE / "results" / f"inference-{args.part}-{machine_id()}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
