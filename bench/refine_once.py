"""What `--refine` no longer makes twice, measured: the normalised image and the predictor.

Before commit 1f8421b, `ffn segment --refine` normalised the whole image a second time (a second
float32 copy) and built a second predictor (with `--compile`, compiled a second time) for the gap
floods. Two parts:

1. **End to end** (`--tree-before DIR`: a checkout of the code before, e.g.
   `git worktree add /tmp/before 1f8421b~1` with `_kernels*.so` copied into its python/floodfilling):
   `ffn segment IMAGE OUT --refine` on the bundled demo crop (FIB-25, 64x112x112, the bundled
   model), run by each tree in turn (`--repeats` pairs, interleaved, so both see the same load):
   wall seconds and the child's peak RSS (`wait4`), the two results checked equal voxel for voxel.
2. **The 250^3 FIB-25 cube** (a whole `--refine` run of it takes hours on a 2-core CPU): what
   the run now makes once, at today's code: the normalised copy (bytes, seconds) and the
   predictor (seconds; `--compile default` too with `--compile`), with the peak RSS of
   a process that holds the raw cube and one normalised copy vs two.

    python bench/refine_once.py --tree-before /tmp/before [--tree-before-blocks /tmp/before_blocks]
        [--repeats 1] [--compile] [--out FILE]

3. **Block refine** (``--tree-before-blocks DIR``: a checkout of 4f20764~1, before a rank kept
   the tile windows it read): ``ffn segment --block --refine`` of the cube's lower half with
   the tiny model of ``floodfilling.testing`` (a cheap flood: the refinement dominates).

Prints JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, cpu_model, machine_id  # noqa: E402

AFTER = HERE.parent
HAND = {"after": ["--refine-model", "hand"], "before": []}  # the hand steps (today's default is the learned model)


def run_tree(tree: Path, argv: list[str], env_extra: dict[str, str] | None = None) -> dict:
    """``python -m floodfilling.cli ARGV`` with ``tree``'s package: wall seconds, peak RSS (MiB)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "floodfilling.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: ffn {' '.join(argv)} failed:\n{err[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def same_results(a_path: Path, b_path: Path) -> dict[str, bool]:
    """Each dataset of two results equal (tables: every column but the seconds each object took)."""
    import h5py

    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        out = {}
        for ds in sorted(set(a) | set(b)):
            if ds not in a or ds not in b:
                out[ds] = False
                continue
            x, y = a[ds][:], b[ds][:]
            names = [n for n in (x.dtype.names or ()) if n != "seconds"]
            out[ds] = bool(all(np.array_equal(x[n], y[n]) for n in names) if names else np.array_equal(x, y))
        return out


def pairs(before: Path, repeats: int, argv: list[str]) -> tuple[dict, dict[str, bool], dict]:
    """``ffn ARGV --refine`` (the hand steps; ``{out}`` in ARGV is the output) by each tree in
    turn, ``repeats`` interleaved pairs: every run's figures, the two results compared, medians."""
    rows: dict[str, list] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for r in range(repeats):
            for name, tree in (("before", before), ("after", AFTER)):
                out = Path(tmp) / f"{name}{r}.h5"
                rows[name].append(run_tree(tree, [a.format(out=out) for a in argv] + ["--refine", *HAND[name]]))
                outs[name] = out
        same = same_results(outs["before"], outs["after"])
    summary = {name: {k: float(np.median([x[k] for x in v])) for k in v[0]} for name, v in rows.items()}
    return rows, same, summary


def block_refine(before: Path, repeats: int, threads: int, model: Path) -> dict:
    """``ffn segment --block --refine`` of the cube's lower half with a tiny model (the flood is
    cheap, so the refinement's reading shows), before the tile windows were kept vs today."""
    img = SHARED / "data" / "fib25_train_250.h5"
    rows, same, summary = pairs(before, repeats, ["segment", f"{img}:raw", "{out}:seg", "--model", str(model),
                                                  "--block", "64,128,128", "--bbox", "0,0,0:128,250,250",
                                                  "--threads", str(threads)])
    return {"volume": "FIB-25 cube z < 128 (128x250x250), blocks 64,128,128 (8 tiles), the tiny mean-flood model "
            "of floodfilling.testing", "runs": rows, "median": summary,
            "wall_ratio_after_over_before": round(summary["after"]["wall_s"] / summary["before"]["wall_s"], 3),
            "peak_rss_added_mib": round(summary["after"]["peak_rss_mib"] - summary["before"]["peak_rss_mib"], 1),
            "same_result": same}


def end_to_end(before: Path, repeats: int, threads: int) -> dict:
    crop = AFTER / "python" / "floodfilling" / "data" / "fib25_demo_crop.h5"
    rows, same, summary = pairs(before, repeats, ["segment", f"{crop}:raw", "{out}:seg", "--threads", str(threads)])
    return {"volume": "bundled demo crop (FIB-25, 64x112x112 uint8)", "command": "ffn segment CROP:raw OUT:seg "
            f"--refine --threads {threads} (today: --refine-model hand, the same steps)", "runs": rows,
            "median": summary,
            "peak_rss_saved_mib": round(summary["before"]["peak_rss_mib"] - summary["after"]["peak_rss_mib"], 1),
            "wall_ratio_after_over_before": round(summary["after"]["wall_s"] / summary["before"]["wall_s"], 3),
            "same_result": same}


def cube_parts(compile_too: bool) -> dict:
    """The parts `--refine` makes once now, on the 250^3 cube, at today's code."""
    import resource

    import h5py

    sys.path.insert(0, str(AFTER / "python"))
    from floodfilling.config import InferenceConfig
    from floodfilling.inference.engine import make_predictor
    from floodfilling.model import load_model
    from floodfilling.normalise import resolve_normalisation

    with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
        raw = f["raw"][:]
    net, info = load_model(None, "cpu")
    cfg = InferenceConfig().validate()
    norm = resolve_normalisation(cfg, info, raw, "cube")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    first = norm.apply(raw, "cube")
    t_norm = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    second = norm.apply(raw, "cube")  # what the run before made for the refinement
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert np.array_equal(first, second)
    out = {"volume": "FIB-25 250^3 cube (shared/data/fib25_train_250.h5)",
           "normalised_copy_mib": round(first.nbytes / 2**20, 1), "normalise_s": round(t_norm, 3),
           "peak_rss_mib_one_copy": round(rss1 / 1024, 1), "peak_rss_mib_two_copies": round(rss2 / 1024, 1),
           "peak_rss_mib_before_copies": round(rss0 / 1024, 1)}
    t0 = time.perf_counter()
    make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg)
    out["predictor_s"] = round(time.perf_counter() - t0, 3)
    if compile_too:  # the first call of a compiled predictor compiles (the run before did it twice)
        import torch

        pred = make_predictor(net, info.fov_zyx, info.deltas_zyx, InferenceConfig(compile="default").validate())
        img = torch.zeros((1, 1, *info.fov_zyx))
        t0 = time.perf_counter()
        with torch.no_grad():
            pred.forward(img, img.clone())
        out["compile_first_call_s"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree-before", type=Path, required=True, help="a checkout of the code before (1f8421b~1)")
    ap.add_argument("--tree-before-blocks", type=Path, help="a checkout before block refine kept its tile windows "
                    "(4f20764~1): also time --block --refine")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved before/after pairs")
    ap.add_argument("--threads", type=int, default=2, help="--threads of each run")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile's first call on the cube part")
    ap.add_argument("--skip-end-to-end", action="store_true", help="only the cube part")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    res = {"machine": machine_id(), "cpu": cpu_model(), "before": "1f8421b~1 (normalised twice, two predictors)",
           "after": subprocess.run(["git", "-C", str(AFTER), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()}
    if not args.skip_end_to_end:
        res["end_to_end"] = end_to_end(args.tree_before, args.repeats, args.threads)
    if args.tree_before_blocks:
        with tempfile.TemporaryDirectory() as tmp:
            sys.path.insert(0, str(AFTER / "python"))
            from floodfilling.testing import mean_flood_model

            res["block_refine"] = block_refine(args.tree_before_blocks, args.repeats, args.threads,
                                               mean_flood_model(Path(tmp) / "tiny.npz"))
    res["cube"] = cube_parts(args.compile)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
