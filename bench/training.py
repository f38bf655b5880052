"""Training benchmarks on the FIB-25 cube (results: bench/results/training-<machine>.json).

    python bench/training.py --mode speed                 # FOV steps/s, depth-12 and a small model
    python bench/training.py --mode learn --steps 3000    # does a small model learn? (dev-volume P/R)

Mode "speed": ``floodfilling.training.train`` on the 250^3 FIB-25 cube (coordinates from
``ffn prepare``), CPU, no checkpoints in the loop; reports training FOV steps/s (examples/s:
one FOV of one sequence, forward + backward + update + write-back) as the median over the
logging intervals after the first (warm-up) one, for the reference depth-12 33^3 model and a
small depth-4 17^3 one.

Mode "learn": a depth-4, 17^3 FOV, deltas 4 model is trained on the FIB-25 cube for --steps
steps (Adam; resumable: rerunning the same command continues the run in --workdir), and
evaluated before (the same initial weights) and after on --eval-sequences move sequences from
the held-out medulla dev volume (fib_medulla_dev_50x100x200.h5, normalised with its own
mean/std; balanced coordinates from its own partitions): FOV-level precision and recall of
the prediction >= logit(0.9) against the 0.95/0.05 target, the network making its own moves.

Machine load changes every figure: the JSON records the load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402

TRAIN = SHARED / "data" / "fib25_train_250.h5"
DEV = SHARED / "data" / "fib_medulla_dev_50x100x200.h5"


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def prepare_coords(workdir: Path, margin: int) -> Path:
    from floodfilling.training.partitions import prepare

    out = workdir / f"fib25-coords-r{margin}.h5"
    if not out.exists():
        r = prepare(f"{TRAIN}:labels", str(out), radius_zyx=margin, min_size=10000)
        print(f"prepared {out}: {r['coords']} coordinates, partitions {r['partition_seconds']:.1f} s, "
              f"total {r['seconds']:.1f} s", flush=True)
    return out


def speed(args, workdir: Path) -> dict:
    import torch

    from floodfilling.training.train import TrainOptions, read_metrics, train

    configs = [
        ("depth12_fov33_delta8", dict(depth=12, features=32, fov=(33,) * 3, deltas=(8,) * 3, batch=args.batch12,
                                      max_steps=args.steps12)),
        ("depth4_fov17_delta4", dict(depth=4, features=32, fov=(17,) * 3, deltas=(4,) * 3, batch=args.batch_small,
                                     max_steps=args.steps_small)),
    ]
    out = {"threads": torch.get_num_threads(), "load_before": _load()}
    for name, kw in configs:
        margin = kw["fov"][0] // 2 + kw["deltas"][0]
        coords = prepare_coords(workdir, margin)
        run = workdir / f"speed-{name}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        log_every = max(1, kw["max_steps"] // 5)
        res = train(TrainOptions(image=f"{TRAIN}:raw", labels=f"{TRAIN}:labels", out=str(run), coords=str(coords),
                                 optimizer="adam", device="cpu", checkpoint_every=0, checkpoint_secs=0,
                                 log_every=log_every, tensorboard=False, **kw))
        rows = read_metrics(run / "metrics.csv")
        rates = [r["fov_per_s"] for r in rows[1:]] or [res.fov_per_s]
        out[name] = {"batch": kw["batch"], "steps": kw["max_steps"], "fov_steps_per_s": float(np.median(rates)),
                     "fov_steps_per_s_intervals": rates, "fov_steps_per_s_whole_loop": res.fov_per_s,
                     "training_steps_per_s": float(np.median(rates)) / kw["batch"]}
        print(f"{name}: {out[name]['fov_steps_per_s']:.2f} FOV steps/s (batch {kw['batch']})", flush=True)
    out["load_after"] = _load()
    return out


def evaluate_dev(net, geometry, n_sequences: int, batch: int, seed: int) -> dict:
    import h5py

    from floodfilling.training.examples import ExampleSource, ExampleStream, run_sequences
    from floodfilling.training.partitions import build_coordinates, compute_partitions
    from floodfilling.training.volumes import intensity_stats

    with h5py.File(DEV, "r") as f:
        raw, labels = f["raw"][...], f["labels"][...]
    mean, std, _ = intensity_stats(raw)
    image = ((raw.astype(np.float32) - mean) / std).astype(np.float32)
    parts = compute_partitions(labels, geometry.margin, min_size=1000, source=str(DEV))
    coords = build_coordinates(parts, geometry.margin, seed=seed)
    src = ExampleSource(image, labels, coords, geometry, seed=seed, augment=False)
    t0 = time.perf_counter()
    counts = run_sequences(net, ExampleStream(src, batch, max_examples=n_sequences))
    s = counts.summary()
    s.pop("loss", None)
    total = counts.tp + counts.fp + counts.fn + counts.tn
    return {**s, "fovs": total / float(np.prod(geometry.fov)),
            # predicted-positive voxels (the untrained net: only the seed voxel of each FOV)
            "predicted_positive_voxels": counts.tp + counts.fp,
            # precision of the trivial "everything is the object" predictor on these FOVs
            "target_fraction": (counts.tp + counts.fn) / total if total else float("nan"),
            "seconds": time.perf_counter() - t0, "dev_mean": mean, "dev_std": std}


def learn(args, workdir: Path) -> dict:
    import torch

    from floodfilling.model import ConvStack3D, load_model
    from floodfilling.training.examples import Geometry
    from floodfilling.training.train import TrainOptions, read_metrics, train

    geometry = Geometry((17,) * 3, (4,) * 3)
    run = workdir / "learn"
    load_before = _load()
    torch.manual_seed(args.seed)
    untrained = ConvStack3D(4, 32)  # the same initial weights as train() draws with this seed
    before = evaluate_dev(untrained, geometry, args.eval_sequences, 8, seed=1)
    print("before:", json.dumps(_clean({k: before[k] for k in ("precision", "recall", "f1")})), flush=True)
    t0 = time.perf_counter()
    state = run / "checkpoint" / "state.pt"
    start = int(torch.load(state, map_location="cpu", weights_only=False)["step"]) if state.exists() else 0
    res = train(TrainOptions(image=f"{TRAIN}:raw", labels=f"{TRAIN}:labels", out=str(run), depth=4, features=32,
                             fov=geometry.fov, deltas=geometry.deltas, batch=args.batch_small, max_steps=args.steps,
                             optimizer="adam", lr=args.lr, seed=args.seed, device="cpu", checkpoint_every=250,
                             checkpoint_secs=120, log_every=50, resume=True, progress=not args.quiet,
                             tensorboard=False))
    train_secs = time.perf_counter() - t0
    net, info = load_model(run / "checkpoint")
    after = evaluate_dev(net, geometry, args.eval_sequences, 8, seed=1)
    print("after:", json.dumps(_clean({k: after[k] for k in ("precision", "recall", "f1")})), flush=True)
    rows = read_metrics(run / "metrics.csv")
    trained_now = res.steps - start
    return {"trained_steps_this_invocation": trained_now, "model": {"depth": 4, "features": 32, "fov": list(geometry.fov), "deltas": list(geometry.deltas)},
            "optimizer": "adam", "lr": args.lr, "batch": args.batch_small, "steps": res.steps,
            "train_seconds_this_invocation": train_secs, "fov_steps_per_s": res.fov_per_s,
            "eval_sequences": args.eval_sequences, "dev_before": before, "dev_after": after,
            "train_metrics_last": rows[-1] if rows else {}, "train_metrics_first": rows[0] if rows else {},
            "load_before": load_before, "load_after": _load()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["speed", "learn"], default="speed", help="what to measure")
    ap.add_argument("--steps", type=int, default=3000, help="learn: training steps of the small model")
    ap.add_argument("--lr", type=float, default=0.001, help="learn: Adam learning rate")
    ap.add_argument("--seed", type=int, default=0, help="learn: seed of weights and training examples")
    ap.add_argument("--eval-sequences", type=int, default=200, help="learn: dev-volume sequences evaluated")
    ap.add_argument("--steps12", type=int, default=10, help="speed: steps of the depth-12 model")
    ap.add_argument("--batch12", type=int, default=2, help="speed: batch of the depth-12 model")
    ap.add_argument("--steps-small", type=int, default=60, help="speed: steps of the small model")
    ap.add_argument("--batch-small", type=int, default=4, help="batch of the small model (both modes)")
    ap.add_argument("--workdir", default=None,
                    help="runs and prepared coordinates (default $TMPDIR/ffn-bench-training)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/training-<machine>.json)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not TRAIN.exists():
        print(f"shared data not found at {SHARED} (set FFN_SHARED)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "ffn-bench-training"
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) if args.out else HERE / "results" / f"training-{machine_id()}.json"
    res = speed(args, workdir) if args.mode == "speed" else learn(args, workdir)
    doc = json.loads(dest.read_text()) if dest.exists() else {"benchmark": "training"}
    doc.update({"machine": machine_id(), "cpu_count": os.cpu_count()})
    prev = doc.get(args.mode, {})
    res = {**_clean(res), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.mode == "learn" and res.get("trained_steps_this_invocation") == 0 and prev.get("steps") == res["steps"]:
        # a rerun that only re-evaluated a finished run: keep the timing of the run that trained
        res["train_seconds_this_invocation"] = prev.get("train_seconds_this_invocation")
        res["fov_steps_per_s"] = prev.get("fov_steps_per_s")
        res["training_date"] = prev.get("training_date", prev.get("date"))
        res["training_load"] = prev.get("training_load", [prev.get("load_before"), prev.get("load_after")])
    doc[args.mode] = res
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
