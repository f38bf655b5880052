"""Accuracy of the exact reference flood and of each refinement step added one at a time
(``ffn segment --refine``), against the labels of real volumes.

    python bench/accuracy.py [--volumes fib25,fib25-128,dev] [--workdir DIR] [--forward-from-reference]
    # writes bench/results/accuracy-<machine>.json and prints a Markdown table

Volumes and conventions:
- ``fib25``: the whole 250^3 FIB-25 cube, gt label 0 counted (the reference's convention; the
  cube is ~100 % labelled);
- ``fib25-128``: its central 128^3 crop, label 0 counted;
- ``dev``: the 50x100x200 medulla dev volume, reported with gt 0 ignored (its 0 = boundary
  voxels, 7 %) and counted.
The forward run uses the bundled model and default options (fp32, exact); runs found in DIR are
reused (the whole cube takes about an hour on 2 CPU cores). ``--forward-from-reference`` takes
the whole cube's forward from the reference's published segmentation instead (ours matches it
to VI 0.0008; see shared/reference/README.md). Each row adds one step to the previous row's
steps; "watershed" alone is the plain seeded watershed, the floor every step must beat. "+rejoin"
needs the forward run's overlaps, which the reference's published segmentation lacks: with
``--forward-from-reference`` the cube's row says "not measured".
Thresholds of the refinement (config.RefineConfig defaults) were chosen on the dev volume; the
FIB-25 rows are the held-out check. ``--tile z,y,x`` refines tile by tile (a ``--block`` run
refines with its blocks as tiles: this measures what that changes); ``--rows`` picks rows.
``--breakdown K`` also says where each row's VI sits: the K gt bodies and K objects with the
largest shares of the split and merge terms, and the VI if each of those K bodies alone were
segmented perfectly (its voxels one object of their own, taken from whichever objects held them).
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

VOLUMES = {  # name: (file in shared/data, crop per axis or None, gt_zero conventions reported)
    "fib25": ("fib25_train_250.h5", None, ("label",)),
    "fib25-128": ("fib25_train_250.h5", slice(61, 189), ("label",)),
    "dev": ("fib_medulla_dev_50x100x200.h5", None, ("ignore", "label")),
}
# Rows: cumulative refinement steps (empty: the forward run alone).
ROWS = {"forward": (), "+watershed": ("watershed",), "+gap_objects": ("gap_objects", "watershed"),
        "+rejoin": ("rejoin", "gap_objects", "watershed")}
METRICS = ("vi", "vi_split", "vi_merge", "are", "precision", "recall", "seg_objects")


def volume_files(name: str, workdir: Path) -> Path:
    """``workdir/name/image.h5`` with ``raw`` and ``labels`` (written once)."""
    import h5py

    fname, crop, _ = VOLUMES[name]
    img = workdir / name / "image.h5"
    if not img.exists():
        img.parent.mkdir(parents=True, exist_ok=True)
        sl = (crop,) * 3 if crop is not None else (slice(None),) * 3
        with h5py.File(SHARED / "data" / fname, "r") as f:
            raw, labels = f["raw"][sl], f["labels"][sl]
        with h5py.File(img.with_suffix(".tmp"), "w") as f:
            f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [10, 10, 10]
            f["labels"] = labels
        img.with_suffix(".tmp").rename(img)
    return img


def forward(name: str, img: Path, from_reference: bool, precision: str = "fp32"):
    """The forward segmentation at ``precision`` (run once, then reused), its seconds (None when
    reused) and its overlaps (None for the reference's, which does not record them)."""
    import h5py

    from floodfilling.config import InferenceConfig
    from floodfilling.inference.segment import segment

    if from_reference and name == "fib25" and precision == "fp32":
        with np.load(SHARED / "reference" / "google_ffn_fib25_training_sample2.npz") as z:
            return z["segmentation"].astype(np.uint32), None, None
    out = img.parent / ("forward.h5" if precision == "fp32" else f"forward-{precision}.h5")
    seconds = None
    if not out.exists():
        t = time.perf_counter()
        segment(f"{img}:raw", f"{out}:seg", config=InferenceConfig(precision=precision), progress=True)
        seconds = time.perf_counter() - t
    from floodfilling.results import overlaps_dict

    with h5py.File(out, "r") as f:
        return f["seg"][:], seconds, overlaps_dict(f["seg_overlaps"][:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", default="fib25,fib25-128,dev", help="comma-separated, of " + ", ".join(VOLUMES))
    ap.add_argument("--workdir", default="/tmp/ffn-accuracy-bench", help="volumes and forward runs (reused)")
    ap.add_argument("--forward-from-reference", action="store_true",
                    help="fib25: the reference's published segmentation as the forward run")
    ap.add_argument("--tile", default="0,0,0", help="refine tile z,y,x (0,0,0: one tile; a block run uses its "
                    "block, e.g. 128,256,256)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to measure, of " + ", ".join(ROWS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="of the forward flood and the gap floods (bf16: autocast, needs AVX512_BF16/AMX on CPU)")
    ap.add_argument("--breakdown", type=int, default=0, metavar="K",
                    help="per row: the K largest shares of the VI terms, and the VI with each of K bodies perfect")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/accuracy-<machine>.json, accuracy-bf16-<machine>.json)")
    args = ap.parse_args()

    import h5py

    from floodfilling import evaluation
    from floodfilling.config import RefineConfig
    from floodfilling.config import InferenceConfig
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.model import load_model
    from floodfilling.inference.refine import FloodNetwork, refine_array

    net, info = load_model(None, "cpu")
    network = FloodNetwork(net, info, InferenceConfig(precision=args.precision))

    tile = tuple(int(v) for v in args.tile.split(","))
    rows = {r: ROWS[r] for r in args.rows.split(",")}
    result = {"benchmark": "accuracy", "machine": machine_id(), "precision": args.precision,
              "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
              "refine": RefineConfig(tile=tile).to_dict(), "volumes": {}}
    for name in args.volumes.split(","):
        img = volume_files(name, Path(args.workdir))
        with h5py.File(img, "r") as f:
            raw, labels = f["raw"][:], f["labels"][:]
        seg, fwd_seconds, overlaps = forward(name, img, args.forward_from_reference, args.precision)
        image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)  # as the flood saw it
        vol = result["volumes"][name] = {"shape": list(raw.shape), "forward_seconds": fwd_seconds,
                                         "forward_from_reference": bool(args.forward_from_reference and name == "fib25"
                                                                       and args.precision == "fp32"),
                                         "rows": {}}
        for row, steps in rows.items():
            if "rejoin" in steps and overlaps is None:
                vol["rows"][row] = {"not_measured": "the reference's segmentation records no overlaps"}
                continue
            t = time.perf_counter()
            refined = (refine_array(image, seg, RefineConfig(steps=steps, tile=tile), network, overlaps)
                       if steps else None)
            out = refined.segmentation if refined is not None else seg
            secs = time.perf_counter() - t
            table = evaluation.contingency(out, labels)
            for gt_zero in VOLUMES[name][2]:
                ev = evaluation.evaluate(None, None, gt_zero=gt_zero, table=table)
                vol["rows"].setdefault(row, {})[gt_zero] = {k: ev[k] for k in METRICS}
            if args.breakdown > 0:
                vol["rows"][row]["breakdown"] = breakdown(out, labels, table, VOLUMES[name][2][0], args.breakdown)
            vol["rows"][row]["seconds"] = secs
            vol["rows"][row]["counters"] = refined.counters if refined is not None else {}
            print(name, row, json.dumps(vol["rows"][row]), flush=True)
    tag = "" if args.precision == "fp32" else f"{args.precision}-"
    out = Path(args.out) if args.out else HERE / "results" / f"accuracy-{tag}{machine_id()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


def breakdown(seg: np.ndarray, labels: np.ndarray, table, gt_zero: str, k: int) -> dict:
    """Where the VI of ``seg`` against ``labels`` sits (``--breakdown``): the ``k`` gt bodies
    with the largest shares of the split term and the ``k`` objects with the largest shares of
    the merge term ([id, voxels, bits]), and for each of those bodies the VI (total, split,
    merge) if it alone were segmented perfectly."""
    from floodfilling import evaluation

    ev = evaluation.evaluate(None, None, gt_zero=gt_zero, top=len(table), table=table)
    splits = sorted(ev["false_splits"], key=lambda e: -e["vi_split"])[:k]
    merges = sorted(ev["false_merges"], key=lambda e: -e["vi_merge"])[:k]
    perfect = []
    fresh = int(seg.max()) + 1
    for e in splits:
        fixed = np.where(labels == e["gt_id"], fresh, seg)
        vi = evaluation.variation_of_information(fixed, labels, gt_zero=gt_zero)
        perfect.append([e["gt_id"], round(vi["vi"], 4), round(vi["vi_split"], 4), round(vi["vi_merge"], 4)])
    return {"split_shares": [[e["gt_id"], e["voxels"], round(e["vi_split"], 4)] for e in splits],
            "merge_shares": [[e["seg_id"], e["voxels"], round(e["vi_merge"], 4)] for e in merges],
            "vi_if_body_perfect": perfect}


def markdown(result: dict) -> str:
    """The README's table: VI (split / merge) and adapted Rand error per volume and row."""
    cols = [(n, z) for n, v in result["volumes"].items() for z in VOLUMES[n][2]]
    head = "| step | " + " | ".join(f"{n} (gt 0 {'ignored' if z == 'ignore' else 'counted'})" for n, z in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for row in ROWS:
        cells = []
        for n, z in cols:
            m = result["volumes"][n]["rows"].get(row, {}).get(z)
            if m is None:
                cells.append("not measured")
                continue
            cells.append(f"{m['vi']:.3f} ({m['vi_split']:.3f} / {m['vi_merge']:.3f}), ARE {m['are']:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
