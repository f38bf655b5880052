"""bf16 on the CPU: speed against fp32 and what it changes (golden FOVs, object parity).

    python bench/bf16.py [--objects 2,3,5,7,10,12,15,16,17,18]

bf16 is only offered on CPUs with AVX512_BF16 / AMX-BF16 (elsewhere it is many times slower).
Reports: batch-1 forward time fp32 vs bf16 (same process, alternating), max |error| on the
three golden FOVs (TensorFlow fp32 outputs), and how many reference objects a bf16 run still
reproduces voxel for voxel and step for step in the object-by-object parity check. Whole-cube
figures (VI to fp32 and against the labels) come from
``python bench/parity_fullcube.py --precision bf16``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="bf16 vs fp32 on the CPU")
    ap.add_argument("--objects", default="2,3,5,7,10,12,15,16,17,18", help="reference object ids to check")
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards per precision")
    args = ap.parse_args(argv)
    import h5py
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.inference.canvas import Canvas, CanvasState
    from floodfilling.inference.predictor import Predictor, cpu_has_bf16
    from floodfilling.model import load_model

    if not cpu_has_bf16():
        print(json.dumps({"error": "this CPU has no AVX512_BF16/AMX-BF16"}))
        return 1
    net, info = load_model(None)
    g = np.load(SHARED / "reference" / "fib25_forward_golden.npz")
    preds = {p: Predictor(net, info.fov_zyx, device="cpu", precision=p) for p in ("fp32", "bf16")}
    out = {"benchmark": "bf16", "machine": machine_id(), "torch_threads": torch.get_num_threads()}
    golden = {}
    for p, pr in preds.items():
        errs = []
        for i in range(3):
            pr._img[0, 0] = g["image"][i]
            pr._seed[0, 0] = g["seed_logits"][i]
            errs.append(float(np.abs(pr.run(1)[0] - g["output_logits"][i]).max()))
        golden[p] = max(errs)
    out["golden_max_abs_error"] = golden
    times = {"fp32": [], "bf16": []}
    for p in preds:
        for _ in range(3):
            preds[p].run(1)
    for _ in range(args.repeats):
        for p, pr in preds.items():
            t = time.perf_counter()
            pr.run(1)
            times[p].append(time.perf_counter() - t)
    out["forward_s"] = {p: float(np.median(v)) for p, v in times.items()}
    out["bf16_speedup"] = out["forward_s"]["fp32"] / out["forward_s"]["bf16"]

    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        img = ((f["raw"][:].astype(np.float32) - 128) / 33).astype(np.float32)
    ref = np.load(SHARED / "reference" / "google_ffn_fib25_training_sample2.npz")["segmentation"]
    origins = {o["id"]: o for o in json.loads((SHARED / "reference" / "google_ffn_fib25_origins.json").read_text())}
    rows = []
    for k in [int(v) for v in args.objects.split(",")]:
        state = CanvasState(segmentation=(ref * ((ref > 0) & (ref < k))).astype(np.int32), max_id=k - 1)
        cv = Canvas(img, np.zeros((0, 3)), InferenceConfig(), info.fov_zyx, info.deltas_zyx, state=state)
        t = time.perf_counter()
        steps = cv.flood_one(tuple(origins[k]["seed_zyx"]), preds["bf16"])
        got, want = cv.segmentation == k, ref == k
        rows.append({"id": k, "steps": steps, "reference_steps": origins[k]["steps"],
                     "voxels": int(got.sum()), "reference_voxels": int(want.sum()),
                     "voxels_differing": int(np.count_nonzero(got != want)), "seconds": time.perf_counter() - t})
    out["object_parity_bf16"] = rows
    out["objects_identical"] = sum(r["voxels_differing"] == 0 and r["steps"] == r["reference_steps"] for r in rows)
    out["objects_checked"] = len(rows)
    text = json.dumps(out, indent=2)
    print(text)
    dest = HERE / "results" / f"bf16-{machine_id()}.json"
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
