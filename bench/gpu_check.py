"""GPU readiness check: one command, at most ~8 minutes on one H100-class GPU.

    bench/gpu_check.sh cuda             # or cuda:1, xpu: bench/results/gpu-check-<device>.json
    bench/gpu_check.sh cpu --quick      # CPU smoke run of the whole script (a few minutes; no GPU figure)
    python bench/gpu_check.py DEVICE [--quick] [--print summary]

Sections, run in this order, each within a time budget (a section past its budget stops or
is skipped, a failing one records its error, and the rest still run); the JSON is rewritten
after every section, so a killed run keeps what was measured:

  tests     the device test lane ``FFN_TEST_DEVICE=DEVICE python -m pytest -m device -q``:
            pass / fail / skip counts and duration.
  sweep     FOV steps/s against K canvases in flight (1, 2, 4, ..., 64), fp32 and bf16, eager:
            the engine with the device-resident predictor (resident on), the bundled depth-12
            model, K copies of a FIB-25 crop; and the host's share of each step: time in
            ``launch`` (enqueueing), in ``collect`` (waiting for the device) and in the flood
            loop (the rest), from a timing wrapper around the predictor.
  host      the host work of a block (read, normalise, seeds: Sobel, Gaussian, distance
            transform, peaks) per voxel, each part timed; the Sobel + Gaussian as torch
            convolutions on DEVICE (float64 passes, as SciPy) against SciPy: time and whether
            the edge map is identical; whether a preparing thread slows a Python loop (GIL).
  blocks    ``segment_blocks`` (``ffn segment --block``) in a child process under a time cap:
            correctness on a small crop (K=1 prefetch 0, K prefetch 0, K prefetch 4 (the cuda/xpu
            default): the prefetch must not change a voxel; K=1 against K is recorded), then
            voxels/s on the FIB-25 cube mirrored (np.pad reflect) to 512^3 with blocks prepared
            ahead; ``host_wait_seconds`` (the engine waiting for prepared blocks) of each run.
  training  ``floodfilling.training.train`` on DEVICE: depth 12, FOV steps/s at batch 4 and 16,
            fp32 and bf16 (torch.autocast around the loop); a 2-rank DDP run (torchrun) when
            two devices are visible, else skipped with the reason.
  sycl      (xpu, cpu) the SYCL launcher (``kernels="sycl"``; needs ``pip install ".[sycl]"``): its
            report (device, driver, fp64, compile times), the sweep's fp32 rows with the FOV
            gather and update as SYCL kernels on the pool (on torch's own queue on xpu) against
            the torch ops, with the two runs' segmentations compared voxel for voxel, and the
            kernel microbenchmarks (bench/kernels.py --sycl --quick) on the device's SYCL device.
  compile   the sweep again with torch.compile (reduce-overhead on cuda, default elsewhere),
            K in order of interest until the budget is spent (the rest marked skipped).

Every section records its peak device memory (torch max_memory_allocated; on cpu the
process's peak resident set size). ``host_keeps_up`` holds the arithmetic of issue 15: the
measured host seconds per voxel and the fraction of a device doing 3 M voxels/s that the host
would make it wait with the prefetch depth used. --quick (for CPU): K 1, 2, 4, a tiny model
where the bundled one would take minutes on a CPU, small volumes; the JSON says it is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import SHARED, fib25_crop, machine_id  # noqa: E402
from gpu_common import device_info, log, one_line, peak_memory, reset_peak, run_child, sync, tiny_model  # noqa: E402
from gpu_host import child_blocks, host_keeps_up, sec_blocks, sec_host  # noqa: E402
BUDGETS = {"tests": 120, "sweep": 60, "host": 25, "blocks": 130, "training": 60, "ddp": 45, "sycl": 60,
           "compile": 80}
QUICK_BUDGETS = {"tests": 300, "sweep": 45, "host": 30, "blocks": 120, "training": 45, "ddp": 45, "sycl": 120,
                 "compile": 40}
TOTAL_S = 470  # all sections together (8 minutes less start-up)
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY", "OMP_NUM_THREADS",
            "ONEAPI_DEVICE_SELECTOR", "CCL_ATL_TRANSPORT", "FI_PROVIDER", "FFN_SHARED")


class TimedPredictor:
    """The predictor with time spent in launch (enqueueing a step) and collect (waiting for it)."""

    def __init__(self, pred):
        self.pred, self.launch_s, self.collect_s, self.first_launch = pred, 0.0, 0.0, None

    def __getattr__(self, name):
        return getattr(self.pred, name)

    def launch(self, *args):
        t0 = time.perf_counter()
        if self.first_launch is None:
            self.first_launch = t0
        h = self.pred.launch(*args)
        self.launch_s += time.perf_counter() - t0
        return h

    def collect(self, handle):
        t0 = time.perf_counter()
        out = self.pred.collect(handle)
        self.collect_s += time.perf_counter() - t0
        return out


# ---------------------------------------------------------------- sections

def sec_tests(device: str, deadline: float, args, ctx) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider"]
    if args.quick:  # the 10 reference objects of the bundled model take minutes on a CPU (CI runs them)
        cmd += ["-k", "not test_object_parity"]
    env = dict(os.environ, FFN_TEST_DEVICE=device)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise TimeoutError(f"device tests still running after {time.perf_counter() - t0:.0f} s "
                           f"(budget); last output: {tail.strip().splitlines()[-1:]}") from None
    lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                                last)}
    m = re.search(r"in ([\d.]+)s", last)
    note = {"note": "pytest exit 5: no test carries the device mark"} if p.returncode == 5 else {}
    return {**note, "command": f"FFN_TEST_DEVICE={device} " + " ".join(cmd[1:]), "returncode": p.returncode,
            "counts": counts, "pytest_seconds": float(m.group(1)) if m else None,
            "ok": p.returncode == 0 and counts.get("passed", 0) > 0,
            "tail": lines[-8:] if p.returncode else lines[-1:]}


def sweep(dev, net, info, ks, precisions, compile_mode, size, window_s, deadline, max_steps=400) -> dict:
    from throughput import _limited

    from floodfilling.config import InferenceConfig
    from floodfilling.inference import seeds
    from floodfilling.geometry import fov_margin
    from floodfilling.inference.engine import Job, make_predictor, run_jobs
    from floodfilling.inference.segment import normalise_image

    img = normalise_image(fib25_crop(size), 128, 33)
    sd = seeds.Peaks().seeds(img, fov_margin(info.fov_zyx))
    rows, warm = {}, 0.0
    for k, prec in [(k, p) for k in ks for p in precisions]:  # both precisions at each K
        key = f"{prec} K={k}"
        if time.perf_counter() + window_s + warm > deadline:  # (the last warm-up as the estimate)
            rows[key] = {"skipped": "section budget spent"}
            continue
        try:
            cfg = InferenceConfig(device=str(dev), precision=prec, resident="on", compile=compile_mode)
            pred = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=dev, inflight=k, max_batch=k)
            jobs = [Job(i, lambda: pred.new_canvas(img, sd, cfg, info.deltas_zyx)) for i in range(k)]
            t0 = time.perf_counter()
            run_jobs(_limited(jobs, 3), pred, inflight=k)  # warm-up: cuDNN, compilation at batch K
            sync(dev)
            warm = time.perf_counter() - t0
            timed, fovs0 = TimedPredictor(pred), pred.fovs
            t_stop = time.perf_counter() + window_s
            run_jobs(_limited(jobs, max_steps, t_stop), timed, inflight=k)
            sync(dev)
            dt = time.perf_counter() - timed.first_launch  # canvas set-up before the first step excluded
            fovs = pred.fovs - fovs0
            rows[key] = {"K": k, "precision": prec, "steps_per_s": fovs / dt, "fov_steps": fovs, "seconds": dt,
                         "warmup_s": warm, "launch_s": timed.launch_s, "collect_wait_s": timed.collect_s,
                         "flood_loop_s": dt - timed.launch_s - timed.collect_s,
                         # on an asynchronous device: the part of each step the host is busy
                         "host_share": 1 - timed.collect_s / dt if dev.type != "cpu" else None,
                         "network_calls": pred.calls}
            log(f"sweep {compile_mode} {key}: {fovs / dt:.0f} FOV steps/s")
        except Exception as exc:  # noqa: BLE001 (recorded; the sweep goes on)
            rows[key] = {"error": one_line(exc)}
            log(f"sweep {compile_mode} {key}: {one_line(exc)}")
    return {"canvas": [size] * 3, "window_s": window_s, "compile": compile_mode, "by_config": rows}


def sec_sweep(dev, deadline, args, ctx) -> dict:
    from floodfilling.model import load_model

    net, info = load_model(None, "cpu")
    res = sweep(dev, net, info, args.ks, args.precisions, "off", args.sweep_size, args.window, deadline)
    res["model"] = "bundled depth 12, FOV 33"
    ok = [r for r in res["by_config"].values() if "steps_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["steps_per_s"])
        res["best"] = {"K": best["K"], "precision": best["precision"], "steps_per_s": best["steps_per_s"]}
    return res


def flood_once(dev, net, info, size: int, steps_cap: int = 1000) -> np.ndarray:
    """The first objects of a FIB-25 crop (at most ``steps_cap`` FOV steps) on the
    device-resident path, K = 1: what the SYCL steps must reproduce voxel for voxel."""
    from throughput import _limited

    from floodfilling.config import InferenceConfig
    from floodfilling.inference import seeds
    from floodfilling.geometry import fov_margin
    from floodfilling.inference.engine import Job, make_predictor, run_jobs
    from floodfilling.inference.segment import normalise_image

    img = normalise_image(fib25_crop(size), 128, 33)
    sd = seeds.Peaks().seeds(img, fov_margin(info.fov_zyx))
    cfg = InferenceConfig(device=str(dev), resident="on")
    pred = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=dev, inflight=1, max_batch=1)
    out = run_jobs(_limited([Job(0, lambda: pred.new_canvas(img, sd, cfg, info.deltas_zyx))], steps_cap), pred,
                   inflight=1)
    return out[0].final_segmentation()


def sec_sycl(dev, deadline, args, ctx) -> dict:
    if dev.type not in ("xpu", "cpu"):
        return {"skipped": f"the SYCL FOV steps run on xpu and cpu devices, not {dev.type}"}
    from floodfilling import kernels
    from floodfilling.model import load_model

    selector = "gpu" if dev.type == "xpu" else "cpu"
    os.environ["FFN_SYCL_DEVICE"] = selector
    rep = kernels.report(selector)
    rep["sycl"].pop("devices", None)
    if "error" in rep["sycl"]:
        return {"skipped": rep["sycl"]["error"], "report": rep}
    net, info = load_model(None, "cpu")
    if args.quick:  # the bundled model takes minutes per sweep row on a CPU
        _, (net, info) = tiny_model(ctx["tmp"])
    ks = tuple(k for k in args.ks if k <= 16)
    torch_ops = sweep(dev, net, info, ks, ("fp32",), "off", args.sweep_size, args.window, deadline)
    with kernels.launcher("sycl"):
        with_sycl = sweep(dev, net, info, ks, ("fp32",), "off", args.sweep_size, args.window, deadline)
        seg_sycl = flood_once(dev, net, info, args.sweep_size)
    seg_torch = flood_once(dev, net, info, args.sweep_size)
    ratios = {}
    for key, row in with_sycl["by_config"].items():
        base = torch_ops["by_config"].get(key, {})
        if "steps_per_s" in row and "steps_per_s" in base:
            ratios[key] = row["steps_per_s"] / base["steps_per_s"]
    micro = {}
    out = ctx["tmp"] / "kernels-sycl.json"
    left = deadline - time.perf_counter()
    if left > 20:
        p = subprocess.run([sys.executable, str(HERE / "kernels.py"), "--sycl", "--quick", "--repeat", "3",
                            "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=left,
                           env=dict(os.environ, FFN_SYCL_DEVICE=selector))
        micro = json.loads(out.read_text())["results"] if p.returncode == 0 else {"error": one_line(p.stderr)}
    else:
        micro = {"skipped": "section budget spent"}
    return {"report": rep, "torch_ops": torch_ops, "sycl_steps": with_sycl, "sycl_vs_torch_steps": ratios,
            "same_segmentation": bool(np.array_equal(seg_sycl, seg_torch)),
            "objects": int(len(np.unique(seg_sycl)) - 1), "kernels": micro}


def sec_compile(dev, deadline, args, ctx) -> dict:
    import torch

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # one recompilation per K and precision
            setattr(torch._dynamo.config, name, 256)
    mode = "reduce-overhead" if dev.type == "cuda" else "default"
    if args.quick:  # compiling the depth-12 network on a CPU takes minutes: the tiny model at K=2
        _, (net, info) = tiny_model(ctx["tmp"])
        res = sweep(dev, net, info, (2,), ("fp32",), mode, 48, args.window, deadline)
        res["model"] = "tiny (FOV 9; --quick: the compile path only)"
        return res
    order = [k for k in (16, 64, 8, 32, 4, 1, 2) if k in args.ks]
    from floodfilling.model import load_model

    net, info = load_model(None, "cpu")
    res = {"compile": mode, "model": "bundled depth 12, FOV 33", "by_config": {}}
    for k in order:
        part = sweep(dev, net, info, (k,), args.precisions, mode, args.sweep_size, args.window, deadline)
        res["by_config"].update(part["by_config"])
    return res


def child_train(spec: dict) -> dict:
    import contextlib

    import torch

    from floodfilling.training.train import TrainOptions, read_metrics, train

    rows, rank = {}, int(os.environ.get("RANK", "0"))
    for run in spec["runs"]:
        dev = run["device"]
        mine = torch.device(dev)  # this rank's device (train() picks the local rank's one, as here)
        if mine.type != "cpu" and mine.index is None:
            mine = torch.device(mine.type, int(os.environ.get("LOCAL_RANK", "0")))
        reset_peak(mine)
        ctx = (torch.autocast(mine.type, dtype=torch.bfloat16) if run["precision"] == "bf16"
               else contextlib.nullcontext())
        with ctx:
            res = train(TrainOptions(image=spec["image"], labels=spec["labels"], coords=spec["coords"], out=run["dir"],
                                     depth=spec["depth"], features=spec["features"], fov=tuple(spec["fov"]),
                                     deltas=tuple(spec["deltas"]), batch=run["batch"], max_steps=spec["steps"],
                                     optimizer="adam", device=dev, checkpoint_every=0, checkpoint_secs=0,
                                     log_every=max(1, spec["steps"] // 3), tensorboard=False))
        if rank:
            continue
        rates = [r["fov_per_s"] for r in read_metrics(Path(run["dir"]) / "metrics.csv")]
        rows[run["name"]] = {"batch": run["batch"], "precision": run["precision"], "steps": res.steps,
                             "fov_steps_per_s": float(np.median(rates[1:] or rates)),
                             "fov_steps_per_s_intervals": rates, "whole_loop_fov_steps_per_s": res.fov_per_s,
                             "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),  # torch's default: True
                             **peak_memory(mine)}
    return rows


def train_spec(dev, args, tmp: Path) -> dict:
    import h5py

    from floodfilling.training.partitions import prepare

    edge, (depth, fov, deltas) = (72, (2, 17, 4)) if args.quick else (128, (12, 33, 8))
    o = (250 - edge) // 2
    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw, lab = f["raw"][o:o + edge, o:o + edge, o:o + edge], f["labels"][o:o + edge, o:o + edge, o:o + edge]
    data = tmp / "train.h5"
    with h5py.File(data, "w") as f:
        f["raw"], f["labels"] = raw, lab
    coords = tmp / "coords.h5"
    if not coords.exists():
        prepare(f"{data}:labels", str(coords), radius_zyx=fov // 2 + deltas, min_size=2000)
    return {"image": f"{data}:raw", "labels": f"{data}:labels", "coords": str(coords), "depth": depth,
            "features": 8 if args.quick else 32, "fov": [fov] * 3, "deltas": [deltas] * 3,
            "steps": 6 if args.quick else 30, "crop": [edge] * 3}


def sec_training(dev, deadline, args, ctx) -> dict:
    spec = train_spec(dev, args, ctx["tmp"])
    spec["runs"] = [{"name": f"batch {b} {p}", "batch": b, "precision": p, "device": str(dev),
                     "dir": str(ctx["tmp"] / f"train-{b}-{p}")} for b in (4, 16) for p in ("fp32", "bf16")]
    rows = run_child("train", spec, deadline, ctx["tmp"])
    return {"model": {k: spec[k] for k in ("depth", "features", "fov", "deltas")}, "crop": spec["crop"],
            "steps": spec["steps"], "bf16": "torch.autocast around training.train (it has no precision option)",
            "by_config": rows}


def sec_ddp(dev, deadline, args, ctx) -> dict:
    import shutil

    import torch

    count = getattr(torch, dev.type).device_count() if dev.type in ("cuda", "xpu") else 0
    if count < 2:
        return {"skipped": f"{count} {dev.type} device(s) visible: a 2-rank DDP run needs two"}
    spec = train_spec(dev, args, ctx["tmp"])
    spec["runs"] = [{"name": "2 ranks batch 16 fp32", "batch": 16, "precision": "fp32", "device": dev.type,
                     "dir": str(ctx["tmp"] / "ddp")}]
    runner = shutil.which("torchrun")
    launcher = [runner] if runner else [sys.executable, "-m", "torch.distributed.run"]
    rows = run_child("train", spec, deadline, ctx["tmp"], [*launcher, "--standalone", "--nproc_per_node", "2"])
    return {"ranks": 2, "by_config": rows, "note": "fov_steps_per_s counts both ranks' FOVs"}


# ---------------------------------------------------------------- main


SECTIONS = [("tests", sec_tests), ("sweep", sec_sweep), ("host", sec_host), ("blocks", sec_blocks),
            ("training", sec_training), ("ddp", sec_ddp), ("sycl", sec_sycl), ("compile", sec_compile)]


def summary(doc: dict) -> str:
    lines = [f"gpu_check {doc['device']['device']} ({doc['device'].get('name')}), {doc['kind']}"]
    for name, s in doc["sections"].items():
        head = f"  {name:9s} {s.get('status', '?'):7s} {s.get('seconds', 0):6.1f} s"
        if s.get("status") == "error":
            lines.append(f"{head}  {s['error']}")
            continue
        if name == "tests":
            head += f"  {s.get('counts')} pytest {s.get('pytest_seconds')} s"
        elif name in ("sweep", "compile"):
            best = {}
            for key, r in s.get("by_config", {}).items():
                if "steps_per_s" in r:
                    best[r["precision"]] = max(best.get(r["precision"], (0, 0)), (r["steps_per_s"], r["K"]))
            head += "  best " + ", ".join(f"{p} {v:.0f} FOV/s at K={k}" for p, (v, k) in best.items())
        elif name == "host":
            head += f"  {s.get('host_seconds_per_voxel', 0) * 1e9:.0f} ns/voxel; device Sobel+Gauss: " \
                    f"{s.get('sobel_gaussian_on_device', {}).get('faster')}"
        elif name == "blocks":
            runs = s.get("volume", {}).get("runs", [])
            head += "  " + "; ".join(f"{r['name']}: {r['voxels_per_s'] / 1e6:.2f} M vox/s, host wait "
                                     f"{r['per_rank'][0]['host_wait_seconds']:.2f} s" for r in runs)
            head += f"; prefetch identical {s.get('small', {}).get('prefetch_identical')}"
        elif name in ("training", "ddp"):
            head += "  " + (s.get("skipped") or ", ".join(f"{k} {r['fov_steps_per_s']:.1f}"
                                                          for k, r in s.get("by_config", {}).items()))
        mem = s.get("peak_memory", {})
        lines.append(head + (f"  [peak {mem['device_max_allocated_mib']:.0f} MiB]" if "device_max_allocated_mib"
                             in mem else ""))
    hk = doc.get("host_keeps_up", {})
    if "host_core_seconds_per_device_second" in hk:
        lines.append(f"  host keeps up: {hk['host_core_seconds_per_device_second']:.2f} host core-s per device s at "
                     f"3 M vox/s, {hk['prefetch_threads']} prefetch thread(s): steady-state wait "
                     f"{hk['steady_state_wait_fraction']:.1%} (goal < 5 %)")
    lines.append(f"  written: {doc['path']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(Path(sys.argv[3]).read_text())
        res = child_blocks(spec) if sys.argv[2] == "blocks" else child_train(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("device", help="cuda, cuda:N, xpu, xpu:N or cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small sizes, tiny models (minutes)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default all)")
    ap.add_argument("--print", choices=["json", "summary"], default="json", dest="show", help="what to print")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/gpu-check-<device>[...].json)")
    args = ap.parse_args(argv)
    import torch

    from floodfilling.distributed.worker import prefetch_on
    from floodfilling.model import select_device

    dev = select_device(args.device)
    q = args.quick
    args.ks = (1, 2, 4) if q else (1, 2, 4, 8, 16, 32, 64)
    args.precisions = ("fp32", "bf16")
    args.sweep_size, args.window = (80, 3.0) if q else (160, 2.0)
    args.edge, args.small_edge, args.block = (96, 72, (48, 48, 48)) if q else (512, 72, (128, 256, 256))
    args.host_block = 96 if q else 256
    args.prefetch = prefetch_on(torch.device("cuda"))  # the cuda/xpu default, on every device here
    args.block_inflight = None
    budgets = QUICK_BUDGETS if q else BUDGETS
    slug = re.sub(r"[^a-z0-9]+", "-", str(dev).lower()).strip("-")
    dest = Path(args.out) if args.out else HERE / "results" / (f"gpu-check-{slug}-quick-{machine_id()}.json" if q
                                                                else f"gpu-check-{slug}.json")
    doc = {"benchmark": "gpu_check", "kind": "CPU smoke run (--quick): checks the script, not a GPU figure"
           if q and dev.type == "cpu" else ("quick run" if q else "full run"),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_id(), "device": device_info(dev),
           "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}, "budgets_s": budgets,
           "load_before": list(os.getloadavg()), "sections": {},
           "path": str(dest.resolve().relative_to(REPO)) if dest.resolve().is_relative_to(REPO) else str(dest)}
    only = set(args.only.split(",")) if args.only else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ffn-gpu-check-") as tmp:
        ctx = {"tmp": Path(tmp)}
        for name, fn in SECTIONS:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            deadline = min(t0 + budgets[name], start + TOTAL_S)
            log(f"{name}: budget {deadline - t0:.0f} s")
            reset_peak(dev)
            try:
                res = {"status": "ok", **fn(str(dev) if name == "tests" else dev, deadline, args, ctx)}
                if res.get("skipped"):
                    res["status"] = "skipped"
                elif name == "tests" and not res["ok"]:
                    res["status"] = "failed"
            except Exception as exc:  # noqa: BLE001 (recorded; the next section runs)
                res = {"status": "error", "error": one_line(exc), "traceback": traceback.format_exc().splitlines()[-4:]}
            res["seconds"] = time.perf_counter() - t0
            res["budget_s"] = deadline - t0
            res["peak_memory"] = peak_memory(dev)
            doc["sections"][name] = res
            doc["host_keeps_up"] = host_keeps_up(doc, args.prefetch)
            doc["total_s"] = time.perf_counter() - start
            doc["load_after"] = list(os.getloadavg())
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmpf = dest.with_suffix(".tmp")
            tmpf.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            tmpf.replace(dest)
            log(f"{name}: {res['status']} in {res['seconds']:.1f} s")
    print(summary(doc) if args.show == "summary" else json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
