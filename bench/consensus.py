"""The reference pipeline's consensus on real data with the bundled FIB-25 model: a forward
run, a rerun seeded from its origins in reverse order (seed_policy=invert_origins), and their
split consensus; each evaluated against the labels (VI split/merge, adapted Rand error).

    python bench/consensus.py [--volume dev|fib25-128] [--workdir DIR] [--min-size 0,1000] [--fill-passes N] [--agglomerate]
    # writes bench/results/consensus-<volume>-<machine>.json; runs found in DIR are reused

fp32 (exact mode), default options otherwise. Consensus trades merges for splits: VI merge
should fall and VI split rise; the sum tells whether it pays on this volume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", choices=["dev", "fib25-128"], default="dev",
                    help="dev: the 50x100x200 dev volume; fib25-128: the central 128^3 of the FIB-25 cube")
    ap.add_argument("--workdir", default="/tmp/ffn-consensus-bench", help="segmentations (reused when present)")
    ap.add_argument("--min-size", default="0,1000", help="consensus min_size values to report, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    ap.add_argument("--fill-passes", type=int, default=0,
                    help="also a forward run with this many seed_fill_passes (gaps seeded after the peaks)")
    ap.add_argument("--fill-min-radius", type=float, default=4.0, help="seed_fill_min_radius of that run")
    ap.add_argument("--agglomerate", action="store_true",
                    help="also agglomerate each consensus (FFN resegmentation of the pieces of one forward object)")
    args = ap.parse_args()

    import h5py

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig
    from floodfilling.consensus import consensus
    from floodfilling.inference.segment import segment

    wd = Path(args.workdir) / args.volume
    wd.mkdir(parents=True, exist_ok=True)
    img = wd / "image.h5"
    if not img.exists():
        name = "fib_medulla_dev_50x100x200.h5" if args.volume == "dev" else "fib25_train_250.h5"
        with h5py.File(SHARED / "data" / name, "r") as f:
            sl = (slice(None),) * 3 if args.volume == "dev" else (slice(61, 189),) * 3
            raw, labels = f["raw"][sl], f["labels"][sl]
        with h5py.File(img, "w") as f:
            f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [10, 10, 10]
            f["labels"] = labels
    with h5py.File(img, "r") as f:
        labels = f["labels"][:]
    cfg = InferenceConfig(threads=args.threads)
    runs = {"forward": (wd / "a.h5", cfg),
            "inverted": (wd / "b.h5", cfg.with_overrides(seed_policy="invert_origins",
                                                         seed_origins=f"{wd / 'a.h5'}:seg"))}
    if args.fill_passes > 0:
        runs[f"forward_fill{args.fill_passes}"] = (
            wd / f"fill{args.fill_passes}-r{args.fill_min_radius:g}.h5",
            cfg.with_overrides(seed_fill_passes=args.fill_passes, seed_fill_min_radius=args.fill_min_radius))
    out = {"benchmark": "consensus", "machine": machine_id(), "volume": args.volume, "precision": "fp32",
           "command": f"python bench/consensus.py --volume {args.volume}", "gt_zero": "ignore", "runs": {}}

    def report(name: str, path: Path, extra: dict) -> None:
        with h5py.File(path, "r") as f:
            seg = f["seg"][:]
        ev = evaluation.evaluate(seg, labels, gt_zero="ignore")
        out["runs"][name] = {**extra, "objects": ev["seg_objects"], "gt_objects": ev["gt_objects"],
                             **{k: ev[k] for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall")}}
        print(name, json.dumps(out["runs"][name]), flush=True)

    for name, (path, c) in runs.items():
        t = time.perf_counter()
        if not path.exists():
            r = segment(f"{img}:raw", f"{path}:seg", config=c)
            extra = {"fov_steps": int(r.counters["steps"]), "seconds": time.perf_counter() - t}
        else:
            with h5py.File(path, "r") as f:
                extra = {"fov_steps": int(json.loads(f["seg"].attrs["counters"])["steps"]), "seconds": None}
        report(name, path, extra)
    for ms in (int(v) for v in args.min_size.split(",")):
        t = time.perf_counter()
        cp = wd / f"consensus-{ms}.h5"
        consensus(f"{wd / 'a.h5'}:seg", f"{wd / 'b.h5'}:seg", f"{cp}:seg", min_size=ms, overwrite=True)
        report(f"consensus_min_size_{ms}", cp, {"seconds": time.perf_counter() - t})
        if args.agglomerate:
            from floodfilling.agglomerate import AgglomerationOptions, agglomerate

            t = time.perf_counter()
            ap_ = wd / f"agglomerated-{ms}.h5"
            if ap_.exists():  # reused, like the runs
                with h5py.File(ap_, "r") as f:
                    tab, secs = f["seg_agglomeration"][:], None
            else:
                tab = agglomerate(f"{img}:raw", f"{cp}:seg", f"{ap_}:seg", config=cfg,
                                  opts=AgglomerationOptions(within=f"{wd / 'a.h5'}:seg"))
                secs = time.perf_counter() - t
            report(f"consensus_min_size_{ms}_agglomerated", ap_,
                   {"seconds": secs, "candidates": len(tab), "merged": int(tab["merged"].sum())})
    text = json.dumps(out, indent=2)
    (HERE / "results" / f"consensus-{args.volume}-{machine_id()}.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
