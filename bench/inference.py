"""Inference speed on the CPU: what a step costs beside the network.

    python bench/inference.py        # writes bench/results/inference-<machine>.json

Part "real" (CPU, bundled depth-12 model, fp32): segments a FIB-25 crop and splits wall time
into network time (inside the torch call) and everything else; measures in the same process
the bare batch-1 forward on a fixed FOV. Goals: step <= 1.05 x bare forward, time outside the
network <= 5 % of wall.

The engine's ceiling (a network that costs next to nothing, K canvases in flight) is in
bench/throughput.py.

Never run this while another job uses the cores: it doubles every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fib25_crop as volume_crop, machine_id  # noqa: E402


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
    seeds.Peaks().seeds(normalise_image(raw, 128, 33), (16, 16, 16))
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
    ap = argparse.ArgumentParser(description="inference speed benchmark (real model, CPU)")
    ap.add_argument("--crop", type=int, default=96, help="edge of the FIB-25 crop for the real-model part")
    ap.add_argument("--repeats", type=int, default=20, help="bare-forward repetitions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = {"benchmark": "inference", "machine": machine_id(), "cpu_count": os.cpu_count(),
           "command": "python bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res["real_model_cpu_fp32"] = bench_real(args.crop, args.repeats)
    text = json.dumps(res, indent=2)
    print(text)
    dest = Path(args.out) if args.out else HERE / "results" / f"inference-{machine_id()}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
