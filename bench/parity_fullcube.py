"""Whole-cube parity with the reference (google/ffn) segmentation of FIB-25 (250^3).

Runs the bundled model over all of fib25_train_250.h5 with the default (reference) options,
resumably (kill it and rerun the same command: it continues), then compares with the
reference's published segmentation and with the ground-truth labels:

    python bench/parity_fullcube.py --workdir runs/fullcube        # ~1 h on 2 CPU cores

Prints JSON and writes bench/results/parity-fullcube-<machine>.json. Figures: objects,
FOV steps, how many reference objects are reproduced voxel for voxel, step counts equal,
variation of information to the reference, VI / adapted Rand error against the labels
(scikit-image convention: all voxels, label 0 counted as a label, as the reference's
published figures 1.817 / 0.157).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/fullcube", help="resumable state and the finished result")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="network precision")
    ap.add_argument("--resident", default="off", choices=["off", "on"],
                    help="on: the device-resident path (torch tensors; here on the cpu device)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/parity-fullcube[-bf16]-<machine>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import h5py

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig
    from floodfilling.inference.segment import segment_array

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tag = args.precision + ("-resident" if args.resident == "on" else "")
    result_path = wd / f"result-{tag}.npz"
    cfg = InferenceConfig(threads=args.threads, precision=args.precision, checkpoint_interval_s=120, device="cpu",
                          normalise="fixed",  # the reference's (x - 128) / 33
                          resident=args.resident)
    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw = f["raw"][:]
        labels = f["labels"][:]
    if not result_path.exists():
        manifest = {"bench": "parity_fullcube", "precision": args.precision, "resident": args.resident}
        t0 = time.time()
        res = segment_array(raw, config=cfg, state_path=wd / f"state-{tag}.npz", manifest=manifest,
                            progress=True)
        ids = np.array(sorted(res.origins), dtype=np.int64)
        tmp = wd / f"result-{tag}.tmp.npz"
        np.savez_compressed(tmp, segmentation=res.segmentation, ids=ids,
                            seeds=np.array([res.origins[i].seed_zyx for i in ids]).reshape(-1, 3),
                            steps=np.array([res.origins[i].steps for i in ids]),
                            seconds=np.array([res.origins[i].seconds for i in ids]),
                            counters=json.dumps(res.counters), wall=time.time() - t0)
        os.replace(tmp, result_path)
    r = np.load(result_path)
    seg = r["segmentation"]
    ref = np.load(SHARED / "reference" / "google_ffn_fib25_training_sample2.npz")["segmentation"].astype(np.uint32)
    ref_origins = json.load(open(SHARED / "reference" / "google_ffn_fib25_origins.json"))
    ref_steps = {o["id"]: o["steps"] for o in ref_origins}
    # Objects match by id (creation order) and voxel set.
    same_voxels = 0
    for i in range(1, int(ref.max()) + 1):
        if np.array_equal(seg == i, ref == i):
            same_voxels += 1
    steps = dict(zip(r["ids"].tolist(), r["steps"].tolist()))
    same_steps = sum(1 for i, s in ref_steps.items() if steps.get(i) == s)
    vs_ref = evaluation.variation_of_information(seg, ref, gt_zero="label")
    vs_gt = evaluation.evaluate(seg, labels, gt_zero="label")
    ref_vs_gt = evaluation.evaluate(ref, labels, gt_zero="label")
    counters = json.loads(str(r["counters"]))
    out = {
        "benchmark": "parity_fullcube",
        "machine": machine_id(),
        "command": "python bench/parity_fullcube.py --workdir " + str(args.workdir)
        + (f" --precision {args.precision}" if args.precision != "fp32" else "")
        + (" --resident on" if args.resident == "on" else ""),
        "precision": args.precision,
        "path": "device-resident (torch, cpu device)" if args.resident == "on" else "host (native kernels)",
        "objects": int(len(r["ids"])),
        "reference_objects": len(ref_origins),
        "objects_identical_voxels": same_voxels,
        "objects_same_steps": same_steps,
        "voxels_differing": int(np.count_nonzero(seg != ref)),
        "fov_steps": int(counters["steps"]),
        "reference_fov_steps": 25799,
        "objects_attempted": int(counters["objects_attempted"]),
        "vi_to_reference": vs_ref["vi"],
        "vs_labels": {k: vs_gt[k] for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall")},
        "reference_vs_labels": {k: ref_vs_gt[k] for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall")},
        "wall_seconds": float(r["wall"]),
        "note": "wall_seconds includes resumed sessions' time only for the last session; "
                "timings are not comparable when other jobs shared the cores",
    }
    text = json.dumps(out, indent=2)
    print(text)
    dest = Path(args.out) if args.out else HERE / "results" / (
        f"parity-fullcube{'' if tag == 'fp32' else '-' + tag}-{machine_id()}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
