"""Throughput engine: FOV steps/s against K canvases in flight, memory, and the GPU arithmetic.

    python bench/throughput.py                      # every part this machine can run
    python bench/throughput.py --part ceiling       # one part (ceiling, device, real, gpu, model)
    python bench/throughput.py --part gpu --device cuda   # on a GPU machine

Results: bench/results/throughput-<machine>.json (parts merged into the existing file).

Parts:
  ceiling  host path (NumPy canvases + native kernels), a "network" that costs next to nothing
           but still floods (logits = seed + update, update = +6 on bright voxels, -6 on dark
           ones: it follows the membranes), one thread, K = 1, 8, 64 canvases of the central
           100^3 of the FIB-25 cube in flight (batch 1, round robin). FOV steps/s, peak traced
           memory, and whether every canvas equals the K = 1 result. Goal >= 5,000 steps/s at
           K = 64 on one core.
  device   the device-resident path (image + canvases as torch tensors, whole batched steps in
           torch, one device->host copy per step) with the same cheap network as a torch
           module, on --device (cpu here: this measures torch's per-op cost on the CPU, not a
           GPU), K = 1, 8, 64 at batch K.
  real     bundled depth-12 model, fp32, on the CPU: seconds per FOV at K = 1 and K = 8
           (batch 1 round robin, the default; and batch 8) on 8 overlapping 64^3 blocks of the
           cube; results must be identical.
  gpu      (cuda/xpu, or --device cpu for a smoke run) FOV steps/s against K (fp32 and bf16,
           eager and torch.compile with CUDA graphs) and voxels/s of block inference on a
           >= 512^3 volume (the FIB-25 cube mirrored).
  model    the arithmetic that predicts the GPU figure: FLOP per FOV (counted from the
           network), steps per voxel (the reference run of the cube), halo overhead per block
           size, and voxels/s for assumed sustained TFLOP/s.

Never run while another job uses the cores: it doubles every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, fib25_crop, machine_id  # noqa: E402

KS = (1, 8, 64)


# ---------------------------------------------------------------- cheap networks


from floodfilling.inference.predictor import Predictor  # noqa: E402


class CheapPredictor(Predictor):
    """Host-path Predictor whose network is a one-addition in NumPy (FOV gathering, launch
    and collect are Predictor's own)."""

    def __init__(self, fov, max_batch=1):  # no torch network to prepare
        self.fov = tuple(fov)
        self.max_batch = max_batch
        shape = (max_batch, 1) + self.fov
        self._img = np.zeros(shape, np.float32)
        self._seed = np.zeros(shape, np.float32)
        self._out = np.zeros((max_batch,) + self.fov, np.float32)
        self.calls = 0
        self.fovs = 0

    def run(self, n):
        self.calls += 1
        self.fovs += n
        # into a reused buffer: the caller consumes the logits before the next call
        return np.add(self._seed[:n, 0], self._img[:n, 0], out=self._out[:n])


def add_net():
    """The same one-addition network as a torch module (for the device path)."""
    import torch

    class AddNet(torch.nn.Module):
        def forward(self, image, seed):
            return seed + image

    return AddNet()


def cheap_setup(size):
    from floodfilling.config import InferenceConfig
    from floodfilling.inference import seeds
    from floodfilling.inference.segment import normalise_image

    img = normalise_image(fib25_crop(size), 128, 33)
    sd = seeds.Peaks().seeds(img, (16, 16, 16))
    update = np.where(img > -0.5, np.float32(6.0), np.float32(-6.0)).astype(np.float32)
    return update, sd, InferenceConfig(min_segment_size=100)


def _one_thread():
    import torch

    from floodfilling import kernels

    torch.set_num_threads(1)
    kernels.set_num_threads(1)


def run_k(make_pred, update, sd, cfg, k, memory: bool):
    """K copies of the same subvolume in flight; returns (steps, seconds, canvases, peak)."""
    from floodfilling.inference.engine import Job, run_jobs

    pred = make_pred(k)
    jobs = [Job(i, lambda: pred.new_canvas(update, sd, cfg, (8, 8, 8))) for i in range(k)]
    t0 = time.perf_counter()
    res = run_jobs(jobs, pred, inflight=k)
    dt = time.perf_counter() - t0
    peak = None
    if memory:  # a second, untimed run: NumPy reports its buffers to tracemalloc
        tracemalloc.start()
        pred2 = make_pred(k)
        run_jobs([Job(i, lambda: pred2.new_canvas(update, sd, cfg, (8, 8, 8))) for i in range(k)], pred2,
                 inflight=k)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return res, dt, pred, peak


def summarise(res, dt, k, ref_seg):
    steps = sum(int(cv.state.counters["steps"]) for cv in res.values())
    segs = [cv.final_segmentation() for cv in res.values()]
    return {"fov_steps": steps, "seconds": dt, "steps_per_s": steps / dt,
            "objects_per_canvas": int(res[0].state.counters["objects"]),
            "all_canvases_identical_to_k1": bool(all(np.array_equal(s, ref_seg) for s in segs))}, segs[0]


def bench_ceiling(size: int, ks=KS, repeats: int = 2) -> dict:
    _one_thread()
    update, sd, cfg = cheap_setup(size)
    out = {"path": "host (NumPy canvases, native kernels), batch 1 round robin", "volume": [size] * 3,
           "seeds": int(len(sd)), "threads": 1, "by_k": {}}
    ref = None
    for k in ks:
        rows = []
        for r in range(repeats):  # best of `repeats` (noise on a shared machine only slows)
            res, dt, _, peak = run_k(lambda kk: CheapPredictor((33, 33, 33)), update, sd, cfg, k, memory=r == 0)
            if ref is None:
                ref = res[0].final_segmentation()
            rows.append(summarise(res, dt, k, ref)[0])
            if peak is not None:
                mem = {"peak_traced_mib": peak / 2**20, "peak_traced_mib_per_canvas": peak / 2**20 / k}
        best = dict(max(rows, key=lambda row: row["steps_per_s"]), **mem)
        best["runs_steps_per_s"] = [row["steps_per_s"] for row in rows]
        best["all_canvases_identical_to_k1"] = all(row["all_canvases_identical_to_k1"] for row in rows)
        out["by_k"][str(k)] = best
        print(f"ceiling host K={k}: {best['steps_per_s']:.0f} steps/s, {mem['peak_traced_mib']:.0f} MiB",
              file=sys.stderr, flush=True)
    return out


def bench_device(size: int, device: str, ks=KS) -> dict:
    import torch

    from floodfilling.inference.device import DevicePredictor

    _one_thread()
    update, sd, cfg = cheap_setup(size)
    net = add_net()
    out = {"path": "device-resident (torch tensors), batch K", "device": device, "volume": [size] * 3,
           "threads": 1, "by_k": {}}
    ref = None
    for k in ks:
        make = lambda kk: DevicePredictor(net, (33, 33, 33), (8, 8, 8), cfg, device=device, max_batch=kk,  # noqa: E731
                                          slots=kk)
        res, dt, pred, _ = run_k(make, update, sd, cfg, k, memory=False)
        if ref is None:
            ref = res[0].final_segmentation()
        row, _ = summarise(res, dt, k, ref)
        row["pool_mib"] = pred.pool.nbytes() / 2**20
        row["network_calls"] = pred.calls
        if torch.device(device).type == "cuda":
            row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["by_k"][str(k)] = row
        print(f"ceiling device({device}) K={k}: {row['steps_per_s']:.0f} steps/s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- the real network


def bench_real(block: int = 64) -> dict:
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.inference import seeds
    from floodfilling.inference.engine import Job, run_jobs
    from floodfilling.inference.predictor import Predictor
    from floodfilling.inference.segment import normalise_image
    from floodfilling.model import load_model

    net, info = load_model(None)
    img = normalise_image(fib25_crop(250), 128, 33)
    cfg = InferenceConfig(device="cpu", min_segment_size=100)
    step = block - 16  # 16-voxel overlaps
    blocks = []
    o = 125 - block
    for z in (0, step):
        for y in (0, step):
            for x in (0, step):
                sub = np.ascontiguousarray(img[o + z:o + z + block, o + y:o + y + block, o + x:o + x + block])
                blocks.append((sub, seeds.Peaks().seeds(sub, (16, 16, 16))))
    out = {"threads": torch.get_num_threads(), "blocks": f"8 x {block}^3 (FIB-25 centre, 16-voxel overlaps)",
           "by_config": {}}
    ref = None
    for name, k, batch in (("K=1 batch 1", 1, 1), ("K=8 batch 1 (round robin, CPU default)", 8, 1),
                           ("K=8 batch 8", 8, 8)):
        pred = Predictor(net, info.fov_zyx, device="cpu", max_batch=batch)
        jobs = [Job(i, (lambda b=b: _block_canvas(pred, b, cfg, info))) for i, b in enumerate(blocks)]
        t0 = time.perf_counter()
        res = run_jobs(jobs, pred, inflight=k)
        dt = time.perf_counter() - t0
        segs = [res[i].final_segmentation() for i in range(len(blocks))]
        steps = sum(int(cv.state.counters["steps"]) for cv in res.values())
        if ref is None:
            ref = segs
        out["by_config"][name] = {"fov_steps": steps, "network_calls": pred.calls, "seconds": dt,
                                  "s_per_fov": dt / steps,
                                  "identical_to_k1": all(np.array_equal(a, b) for a, b in zip(segs, ref))}
        print(f"real {name}: {dt / steps:.3f} s/FOV ({steps} steps)", file=sys.stderr, flush=True)
    base = out["by_config"]["K=1 batch 1"]["s_per_fov"]
    for row in out["by_config"].values():
        row["relative_to_k1"] = row["s_per_fov"] / base
    return out


def _block_canvas(pred, b, cfg, info):
    return pred.new_canvas(b[0], b[1], cfg, info.deltas_zyx)


# ---------------------------------------------------------------- GPU (or smoke run)


def mirrored_volume(edge: int) -> np.ndarray:
    """The FIB-25 cube mirrored (reflect) to edge^3 voxels, uint8."""
    raw = fib25_crop(250)
    reps = math.ceil(edge / 250)
    tiles = raw
    for axis in range(3):
        parts = [np.flip(tiles, axis) if i % 2 else tiles for i in range(reps)]
        tiles = np.concatenate(parts, axis=axis)
    return np.ascontiguousarray(tiles[:edge, :edge, :edge])


def bench_gpu(device: str, edge: int, block: int, ks, precisions, sweep_size: int, max_steps: int,
              compiles=("off",)) -> dict:
    import h5py
    import torch

    from floodfilling.config import InferenceConfig
    from floodfilling.distributed.run import segment_blocks
    from floodfilling.inference import seeds
    from floodfilling.inference.engine import Job, make_predictor, run_jobs
    from floodfilling.inference.segment import normalise_image
    from floodfilling.model import load_model, select_device

    dev = select_device(device)
    net, info = load_model(None)
    out = {"device": str(dev), "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                                               str(dev)), "by_precision": {}}
    img = normalise_image(fib25_crop(sweep_size), 128, 33)
    sd = seeds.Peaks().seeds(img, (16, 16, 16))
    for prec, comp in [(p, c) for p in precisions for c in compiles]:
        cfg = InferenceConfig(device=str(dev), precision=prec, resident="on", compile=comp)
        sweep = {}
        for k in ks:
            pred = make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=dev, inflight=k, max_batch=k)
            # K copies of the sweep volume; stop after max_steps steps of canvas 0 (steady state)
            jobs = [Job(i, lambda: pred.new_canvas(img, sd, cfg, info.deltas_zyx)) for i in range(k)]
            # warm-up (cuDNN autotuning, compilation at batch K): a few steps of every canvas
            run_jobs(_limited(jobs, 3), pred, inflight=k)
            _sync(dev)
            calls0, fovs0 = pred.calls, pred.fovs
            t0 = time.perf_counter()
            run_jobs(_limited(jobs, max_steps), pred, inflight=k)
            _sync(dev)
            dt = time.perf_counter() - t0
            fovs = pred.fovs - fovs0
            sweep[str(k)] = {"fov_steps": fovs, "network_calls": pred.calls - calls0, "seconds": dt,
                             "steps_per_s": fovs / dt}
            print(f"gpu {prec} compile={comp} K={k}: {fovs / dt:.0f} steps/s", file=sys.stderr, flush=True)
        row = {"steps_per_s_by_k": sweep}
        if edge and comp == compiles[0]:
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "vol.h5"
                with h5py.File(src, "w") as f:
                    f.create_dataset("raw", data=mirrored_volume(edge), chunks=(64, 64, 64))
                kbest = max(sweep, key=lambda kk: sweep[kk]["steps_per_s"])
                t0 = time.perf_counter()
                res = segment_blocks(f"{src}:raw", f"{Path(tmp) / 'seg.h5'}:seg", block=(block,) * 3,
                                     workdir=str(Path(tmp) / "work"), config=cfg, inflight=int(kbest))
                dt = time.perf_counter() - t0
                row["volume"] = {"edge": edge, "block": block, "inflight": int(kbest), "seconds": dt,
                                 "voxels_per_s": edge ** 3 / dt, "objects": res.n_objects,
                                 "blocks": res.n_blocks}
                print(f"gpu {prec} {edge}^3: {edge ** 3 / dt / 1e6:.2f} M voxels/s", file=sys.stderr, flush=True)
        out["by_precision"][prec if comp == "off" else f"{prec}+compile={comp}"] = row
    return out


def _limited(jobs, max_steps, deadline=None):
    """Jobs whose canvases stop after max_steps FOV steps (seed list cut when reached) or, with
    ``deadline`` (a time.perf_counter() value), at the first step after it."""
    from floodfilling.inference.engine import Job

    def wrap(job):
        def make():
            cv = job.make()
            orig = cv.steps

            def steps():
                gen = orig()
                try:
                    c = next(gen)
                except StopIteration:
                    return
                for _ in range(max_steps):
                    out = yield c
                    if deadline is not None and time.perf_counter() > deadline:
                        return
                    try:
                        c = gen.send(out)
                    except StopIteration:
                        return

            cv.steps = steps
            return cv
        return Job(job.key, make)

    return [wrap(j) for j in jobs]


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu":
        torch.xpu.synchronize(dev)


# ---------------------------------------------------------------- arithmetic


def conv_flops(net, fov) -> float:
    """FLOP (2 per multiply-add) of one forward on one FOV ('same' padding)."""
    import torch

    n = int(np.prod(fov))
    total = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d):
            total += 2 * n * m.in_channels * m.out_channels * int(np.prod(m.kernel_size)) // m.groups
    return float(total)


def bench_model() -> dict:
    from floodfilling.model import load_model

    net, info = load_model(None)
    flop = conv_flops(net, info.fov_zyx)
    origins = json.loads((SHARED / "reference" / "google_ffn_fib25_origins.json").read_text())
    steps = sum(int(o["steps"]) for o in origins)
    # all FOV steps of the reference run of the cube, rejected objects included (DESIGN.md);
    # the committed objects alone account for `steps`
    total_steps = 25799
    spv = total_steps / 250 ** 3
    halo = info.fov_zyx[0] // 2 + info.deltas_zyx[0]
    blocks = {}
    for b in (128, 192, 256, 384, 512):
        blocks[str(b)] = {"halo": halo, "voxel_overhead": ((b + 2 * halo) / b) ** 3}
    predict = {}
    for tflops in (50, 100, 200, 300, 400):
        fov_s = tflops * 1e12 / flop
        predict[str(tflops)] = {"fov_steps_per_s": fov_s,
                                "voxels_per_s_no_halo": fov_s / spv,
                                "voxels_per_s_block256": fov_s / spv / blocks["256"]["voxel_overhead"]}
    return {"flop_per_fov": flop, "gflop_per_fov": flop / 1e9, "fov": list(info.fov_zyx),
            "reference_steps_on_cube": total_steps, "committed_objects_steps": steps,
            "steps_per_voxel": spv, "blocks": blocks, "predicted_by_sustained_tflops": predict,
            "h100_peaks_tflops": {"bf16_dense_sxm": 989, "tf32_dense_sxm": 495, "fp32_non_tensor": 67},
            "reference_gpu_voxels_per_s": 250 ** 3 / 394.0}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "ceiling", "device", "real", "gpu", "model"], default="all")
    ap.add_argument("--device", default=None, help="device for the device/gpu parts (default: cuda/xpu if "
                    "present, else cpu for 'device' and skip 'gpu')")
    ap.add_argument("--ceiling-size", type=int, default=100, help="edge of the FIB-25 crop of the ceiling parts")
    ap.add_argument("--ks", default="1,8,64", help="K values of the ceiling parts")
    ap.add_argument("--real-block", type=int, default=64, help="edge of the 8 blocks of the real part")
    ap.add_argument("--gpu-ks", default="1,8,16,32,64,128", help="K values of the gpu sweep")
    ap.add_argument("--gpu-edge", type=int, default=512, help="edge of the mirrored volume (0: skip)")
    ap.add_argument("--gpu-block", type=int, default=256, help="block edge of the volume run")
    ap.add_argument("--gpu-precisions", default="fp32,bf16")
    ap.add_argument("--gpu-compile", default="off,reduce-overhead", help="compile modes of the gpu sweep")
    ap.add_argument("--gpu-sweep-size", type=int, default=160, help="edge of each canvas of the K sweep")
    ap.add_argument("--gpu-max-steps", type=int, default=200, help="steps per canvas in the K sweep")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/throughput-<machine>.json)")
    args = ap.parse_args(argv)
    import torch

    from floodfilling.model import select_device

    auto = select_device("auto")
    device = args.device or str(auto)
    ks = tuple(int(v) for v in args.ks.split(","))
    parts = ["ceiling", "device", "real", "gpu", "model"] if args.part == "all" else [args.part]
    if args.part == "all" and args.device is None and auto.type == "cpu":
        parts.remove("gpu")
    dest = Path(args.out) if args.out else HERE / "results" / f"throughput-{machine_id()}.json"
    doc = json.loads(dest.read_text()) if dest.exists() else {"benchmark": "throughput"}
    doc.update({"machine": machine_id(), "cpu_count": os.cpu_count(), "torch": torch.__version__})
    for part in parts:
        t = time.strftime("%Y-%m-%d %H:%M:%S")
        if part == "ceiling":
            res = bench_ceiling(args.ceiling_size, ks)
        elif part == "device":
            res = bench_device(args.ceiling_size, device, ks)
        elif part == "real":
            res = bench_real(args.real_block)
        elif part == "gpu":
            res = bench_gpu(device, args.gpu_edge, args.gpu_block, tuple(int(v) for v in args.gpu_ks.split(",")),
                            args.gpu_precisions.split(","), args.gpu_sweep_size, args.gpu_max_steps,
                            tuple(args.gpu_compile.split(",")))
        else:
            res = bench_model()
        res["date"] = t
        res["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        key = part if part != "gpu" else f"gpu_{torch.device(device).type}"
        doc[key] = res
    text = json.dumps(doc, indent=2)
    print(text)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
