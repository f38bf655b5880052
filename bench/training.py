"""Training benchmarks on the FIB-25 cube (results: bench/results/training-<machine>.json).

    python bench/training.py --mode speed                 # FOV steps/s, depth-12 and a small model
    python bench/training.py --mode learn --steps 3000    # does a small model learn? (dev-volume P/R)
    python bench/training.py --mode finetune              # fine-tune the bundled model on half the dev volume

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

Mode "finetune" (issue 16, "Adapting to your data"): the medulla dev volume (50 x 100 x 200) is
cut in two halves along x (``left`` x < 100, ``right`` x >= 100). For each direction (tune on
one half, evaluate on the other) the bundled FIB-25 model segments the unseen half (``ffn
segment``, default options) and is fine-tuned on the other half (``ffn train --init bundled``,
the recipe's options), then the fine-tuned run directory segments the unseen half again
(``ffn segment --model RUN``); both are scored with ``floodfilling.evaluation.evaluate``
(gt 0 = boundary voxels ignored): VI and its split/merge parts, adapted Rand error, precision,
recall, objects, coverage. Nothing is tuned on the evaluation half (no thresholds, no step count:
validation runs on the tuning half). The tuning half's label-0 (boundary) voxels are given the
id of the nearest object (``--zero-labels grow``; the FIB-25 labels the bundled model learnt
from have membranes inside the bodies, and evaluation ignores gt 0 anyway), and it is
mirror-padded (``np.pad`` reflect, image and labels) by the training margin (fov // 2 + deltas =
24) so that training coordinates cover the whole half (unpadded, z = 50 leaves 2 legal centre
planes). Every stage runs as a
subprocess (its CPU seconds = user + sys of the children) and is skipped when its output is in
--workdir: rerunning the same command resumes. ``--variant NAME`` with other options stores a
variant (e.g. what did not work) next to the recipe in the JSON.

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


# -- mode finetune ------------------------------------------------------------------------------

HALVES = {"left": np.s_[:, :, :100], "right": np.s_[:, :, 100:]}
FT_MARGIN = 24  # fov // 2 + deltas of the bundled model (33^3, 8^3): training patches are 49^3
UNCONTENDED_FOV_PER_S = "speed.depth12_fov33_delta8.fov_steps_per_s"  # of this JSON (2 threads, idle machine)


def _write_pair(path: Path, raw: np.ndarray, labels: np.ndarray) -> None:
    import h5py

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        for name, a in (("raw", raw), ("labels", labels)):
            d = f.create_dataset(name, data=np.ascontiguousarray(a), compression="gzip")
            d.attrs["resolution_zyx_nm"] = [10, 10, 10]
    os.replace(tmp, path)


def grow_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every label-0 voxel given the id of its nearest labelled voxel (Euclidean;
    ties as scipy's distance transform breaks them): boundary voxels joined to the objects they
    separate, as in the FIB-25 labels the bundled model was trained on."""
    from scipy import ndimage

    zero = labels == 0
    if not zero.any() or zero.all():
        return labels
    idx = ndimage.distance_transform_edt(zero, return_distances=False, return_indices=True)
    return labels[tuple(idx)]


def ft_data(workdir: Path, pad: int, zero_labels: str) -> dict[str, dict[str, Path]]:
    """Per half (cached in workdir): ``half`` (the evaluation volume, labels as given), ``val``
    (the training labels: label 0 grown over when ``zero_labels`` is "grow"), ``train`` (``val``
    mirror-padded by ``pad``) and ``coords`` (its balanced training coordinates, ``ffn prepare``'s
    defaults: radius = margin 24, min_size 10000, seed 0)."""
    import h5py

    from floodfilling.training.partitions import build_coordinates, compute_partitions, labels_digest

    out: dict[str, dict[str, Path]] = {}
    with h5py.File(DEV, "r") as f:
        raw, labels = f["raw"][...], f["labels"][...]
    for half, sl in HALVES.items():
        p = {"half": workdir / f"{half}.h5", "val": workdir / f"{half}-{zero_labels}.h5",
             "train": workdir / f"{half}-{zero_labels}-pad{pad}.h5",
             "coords": workdir / f"{half}-{zero_labels}-pad{pad}-coords.h5"}
        r, lab = raw[sl], labels[sl]
        if not p["half"].exists():
            _write_pair(p["half"], r, lab)
        if zero_labels == "grow":
            lab = grow_labels(lab)
        if not p["val"].exists():
            _write_pair(p["val"], r, lab)
        if pad:
            r, lab = np.pad(r, pad, mode="reflect"), np.pad(lab, pad, mode="reflect")
        if not p["train"].exists():
            _write_pair(p["train"], r, lab)
        if not p["coords"].exists():
            parts = compute_partitions(lab, (FT_MARGIN,) * 3, min_size=10000, source=str(p["train"]))
            coords = build_coordinates(parts, (FT_MARGIN,) * 3, seed=0)
            tmp = p["coords"].with_name(f"{p['coords'].name}.tmp{os.getpid()}")
            with h5py.File(tmp, "w") as f:
                d = f.create_dataset("coords", data=coords.astype(np.uint16))
                d.attrs.update({"labels_digest": labels_digest(lab), "volume_shape": list(lab.shape),
                                "margin_zyx": [FT_MARGIN] * 3, "seed": 0, "axes": "zyx"})
            os.replace(tmp, p["coords"])
        out[half] = p
    return out


def _child(cmd: list[str], log: Path, stoppable: bool = False) -> float:
    """Runs ``python -m floodfilling.cli CMD`` (output appended to ``log``); its CPU seconds.
    ``stoppable``: a child ended by a signal (``kill PID`` of the ``ffn train`` process, to stop a
    run early; it resumes from its last checkpoint) is not an error."""
    import resource
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "python"), os.environ.get("PYTHONPATH", "")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as f:
        rc = subprocess.call([sys.executable, "-m", "floodfilling.cli", *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0 and not (stoppable and rc < 0):
        raise RuntimeError(f"ffn {cmd[0]} failed (exit {rc}); see {log}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _score(seg: Path, half: Path) -> dict:
    import h5py

    from floodfilling.evaluation import evaluate

    with h5py.File(seg, "r") as f:
        s = f["seg"][...]
    with h5py.File(half, "r") as f:
        g = f["labels"][...]
    r = evaluate(s, g, gt_zero="ignore", top=0)
    keep = ("vi", "vi_split", "vi_merge", "are", "precision", "recall", "seg_objects", "gt_objects", "voxels")
    out = {k: r[k] for k in keep}
    out["coverage"] = float(np.count_nonzero(s[g > 0]) / max(1, np.count_nonzero(g > 0)))  # labelled voxels segmented
    return out


def _trained_steps(run: Path) -> int:
    """Steps of the run's checkpoint (0 when none)."""
    import torch

    state = run / "checkpoint" / "state.pt"
    return int(torch.load(state, map_location="cpu", weights_only=False)["step"]) if state.exists() else 0


def ft_segment(model: str | None, half: Path, seg: Path, threads: int, log: Path) -> float:
    cmd = ["segment", f"{half}:raw", f"{seg}:seg", "--threads", str(threads), "-q", "--device", "cpu", "--overwrite"]
    if model:
        cmd += ["--model", model]
    return _child(cmd, log)


def finetune(args, workdir: Path) -> dict:
    from floodfilling.training.train import read_metrics

    data = ft_data(workdir, args.pad, args.zero_labels)
    cpu_dir = workdir / "cpu-seconds"  # CPU seconds of every finished stage, one file each (a resume adds to it)
    cpu_dir.mkdir(exist_ok=True)

    def spent(key: str) -> float | None:
        f = cpu_dir / f"{key}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def note(key: str, secs: float) -> None:
        (cpu_dir / f"{key}.json").write_text(json.dumps((spent(key) or 0.0) + secs))

    recipe = {"init": "bundled", "optimizer": args.ft_optimizer, "lr": args.ft_lr, "momentum": args.ft_momentum,
              "clip": 0.7, "batch": args.ft_batch, "steps": args.ft_steps, "pad": args.pad,
              "zero_labels": args.zero_labels, "min_size": 10000, "augment": True, "seed": 0,
              "threads": args.threads, "validation": f"the tuning half itself (unpadded, training labels), {args.val_sequences} "
                                                    f"sequences every {args.val_every} steps"}
    res: dict = {"variant": args.variant, "recipe": recipe, "volume": f"{DEV.name}, halves x < 100 / x >= 100",
                 "gt_zero": "ignore (label 0 = boundary voxels left out)", "directions": {},
                 "load_before": _load()}
    dirs = {"left-right": ("left", "right"), "right-left": ("right", "left")}
    chosen = list(dirs) if args.direction == "both" else [args.direction]
    bench_json = HERE / "results" / f"training-{machine_id()}.json"
    fov_per_s = None
    if bench_json.exists():
        fov_per_s = json.loads(bench_json.read_text()).get("speed", {}).get("depth12_fov33_delta8", {}).get(
            "fov_steps_per_s")
    for name in chosen:
        tune, test = dirs[name]
        d: dict = {"tune": tune, "evaluate": test}
        base_seg = workdir / f"seg-bundled-{test}.h5"
        if not base_seg.exists():
            note(f"segment-bundled-{test}", ft_segment(None, data[test]["half"], base_seg, args.threads,
                                                        workdir / "segment.log"))
        d["bundled"] = {**_score(base_seg, data[test]["half"]), "segment_cpu_s": spent(f"segment-bundled-{test}")}
        run = workdir / f"{args.variant}-{tune}"
        train_cmd = ["train", "--image", f"{data[tune]['train']}:raw", "--labels", f"{data[tune]['train']}:labels",
                     "--coords", f"{data[tune]['coords']}:coords", "--out", str(run), "--init", "bundled",
                     "--device", "cpu", "--threads", str(args.threads), "--batch", str(args.ft_batch),
                     "--max-steps", str(args.ft_steps), "--optimizer", args.ft_optimizer, "--lr", str(args.ft_lr),
                     "--momentum", str(args.ft_momentum), "--log-every", "25", "--checkpoint-every", "50",
                     "--val-image", f"{data[tune]['val']}:raw", "--val-labels", f"{data[tune]['val']}:labels",
                     "--val-every", str(args.val_every), "--val-sequences", str(args.val_sequences),
                     "--resume", "--no-tensorboard", "-q"]
        if _trained_steps(run) < args.ft_steps:
            note(f"train-{args.variant}-{tune}", _child(train_cmd, workdir / f"train-{args.variant}-{tune}.log",
                                                               stoppable=True))
        steps = _trained_steps(run)  # of the checkpoint (a run stopped later resumes from it)
        rows = [r for r in read_metrics(run / "metrics.csv") if r["step"] <= steps]
        ft_seg = workdir / f"seg-{args.variant}-{tune}-on-{test}.h5"
        seg_key = f"segment-{args.variant}-{tune}-on-{test}@{steps}"
        if spent(seg_key) is None or not ft_seg.exists():
            note(seg_key, ft_segment(str(run), data[test]["half"], ft_seg, args.threads, workdir / "segment.log"))
        train_cpu = spent(f"train-{args.variant}-{tune}")
        fovs = steps * args.ft_batch
        d["fine_tuned"] = {**_score(ft_seg, data[test]["half"]), "segment_cpu_s": spent(seg_key)}
        d["training"] = {"steps": steps, "fov_steps": fovs, "cpu_s": train_cpu,
                         "cpu_s_note": "user+sys of the ffn train process(es), validation included, 1 torch thread",
                         "uncontended_min": (fovs / fov_per_s / 60 if fov_per_s else None),
                         "uncontended_note": f"training FOV steps / {fov_per_s} FOV steps/s ({UNCONTENDED_FOV_PER_S} "
                                             f"of {bench_json.name}: depth 12, 2 threads, idle machine), "
                                             "validation excluded",
                         "metrics": [{k: r.get(k) for k in ("step", "loss", "precision", "recall", "f1",
                                                            "moves_per_sequence", "val_loss", "val_precision",
                                                            "val_recall", "val_f1")} for r in rows]}
        d["vi_change"] = d["fine_tuned"]["vi"] - d["bundled"]["vi"]
        res["directions"][name] = d
        print(f"{name}: VI {d['bundled']['vi']:.3f} -> {d['fine_tuned']['vi']:.3f} "
              f"(ARE {d['bundled']['are']:.3f} -> {d['fine_tuned']['are']:.3f}), {steps} steps, "
              f"train CPU {train_cpu or 0:.0f} s", flush=True)
    res["load_after"] = _load()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["speed", "learn", "finetune"], default="speed", help="what to measure")
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
    ft = ap.add_argument_group("finetune (defaults: the recipe)")
    ft.add_argument("--variant", default="recipe", help="name of this set of options (results stored under it)")
    ft.add_argument("--direction", choices=["left-right", "right-left", "both"], default="both",
                    help="tune on the first half, evaluate on the second")
    ft.add_argument("--ft-optimizer", choices=["sgd", "adam"], default="sgd")
    ft.add_argument("--ft-lr", type=float, default=1e-3)
    ft.add_argument("--ft-momentum", type=float, default=0.0)
    ft.add_argument("--ft-batch", type=int, default=4)
    ft.add_argument("--ft-steps", type=int, default=50)
    ft.add_argument("--pad", type=int, default=FT_MARGIN, help="mirror padding of the tuning half (0: none)")
    ft.add_argument("--zero-labels", choices=["grow", "keep"], default="grow",
                    help="label-0 (boundary) voxels of the tuning half: grow the objects over them (nearest id), "
                         "or keep them as background (targets 0.05; examples centred on them)")
    ft.add_argument("--val-every", type=int, default=50)
    ft.add_argument("--val-sequences", type=int, default=32)
    ft.add_argument("--threads", type=int, default=1, help="torch threads of every ffn subprocess")
    args = ap.parse_args(argv)
    if not TRAIN.exists():
        print(f"shared data not found at {SHARED} (set FFN_SHARED)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "ffn-bench-training"
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) if args.out else HERE / "results" / f"training-{machine_id()}.json"
    if args.mode == "finetune":
        res = finetune(args, workdir)
        dest = Path(args.out) if args.out else HERE / "results" / f"training-finetune-{machine_id()}.json"
        doc = json.loads(dest.read_text()) if dest.exists() else {"benchmark": "training-finetune"}
        doc.update({"machine": machine_id(), "cpu_count": os.cpu_count()})
        prev = doc.setdefault("variants", {}).get(args.variant, {})
        res = {**_clean(res), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        if prev.get("recipe") == res["recipe"]:  # the other direction, run separately, is kept
            res["directions"] = {**prev.get("directions", {}), **res["directions"]}
        doc["variants"][args.variant] = res
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(_clean({k: v for k, v in res.items() if k != "directions"})))
        print(f"wrote {dest}")
        return 0
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
