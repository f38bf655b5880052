"""The learned refinement (``--refine-model``) against the floor and the hand steps, leave one
out (issue 29): no figure comes from a model that saw that volume's labels.

    python bench/refine_learned.py [--workdir DIR] [--units dev-left,dev-right,cube-lo,cube-hi] [--bases cores,gap_cores]
                                   [--cube-flood reference|own] [--tag=-own]
    # writes bench/results/refine-learned-<machine>.json and prints a Markdown table
    python bench/refine_learned.py --train-bundled python/floodfilling/models/refine_cores_fib25_medulla.json

Units (each evaluated on its own: image, flood and labels cut likewise):
- ``dev-left`` / ``dev-right``: the medulla dev volume (50x100x200), x < 100 / x >= 100; gt 0
  (boundary, 7 %) ignored and counted. Flood: this package's, bundled model, default options
  (cached in DIR/dev/forward.h5, about 8 min on 2 loaded cores).
- ``cube-lo`` / ``cube-hi``: the FIB-25 cube (250^3), z < 125 / z >= 125, gt 0 counted. Flood
  (``--cube-flood``): ``reference``, the reference's published segmentation (ours equals it to VI
  0.0008 with ``--normalise fixed``), which records no overlaps, so the overlap feature is missing
  there and there is no rejoin row; or ``own``, this package's flood with ``--normalise fixed``
  (DIR/fib25-own/forward.h5, made by the command in :data:`OWN_CUBE_FLOOD`: 101 min on 2 idle
  EPYC cores, resumable), which records them (its hand markers cached in DIR/fib25-own).

Rows: ``forward`` (the flood), ``watershed`` (the plain seeded watershed of the flood: the
floor), the hand steps (``+rejoin``: rejoin then watershed, dev only; ``+gap_objects``: gap
objects then watershed; ``hand_refine``: ``--refine``'s default steps), and the learned
refinement with base "cores" and "gap_cores" (``--bases``; "watershed" too), trained on the other half of the same volume
(``learned_other_half``) and on every other unit (``learned_others``), plus for the dev halves a
model trained on the cube alone (``learned_cube``: what a model trained elsewhere does). The gap
floods of the hand rows are run once on the whole volume (DIR/<volume>/*_markers.npz: the
network sees the image only, no labels) and cut like the flood; each half's watershed is its own.
Threshold 0.5 (the classifier's own calibration; not tuned on any unit). The learned base's gap
cores are finer than the hand step's (``--core-radius 2 --min-core 30``, the default of ``ffn
train-refine``, against 3 / 100): chosen by comparing the two on the cube halves (each half's
model trained on the other), so for the cube rows that one choice was made with them in view.
The features (:data:`floodfilling.inference.contacts.FEATURES`) were chosen with all four units
in view: the Hessian statistics kept, three other additions dropped (README). Seconds: this machine,
2 cores shared with other jobs (inflated).
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

UNITS = {  # name: (volume, slice, gt_zero conventions)
    "dev-left": ("dev", np.s_[:, :, :100], ("ignore", "label")),
    "dev-right": ("dev", np.s_[:, :, 100:], ("ignore", "label")),
    "cube-lo": ("fib25", np.s_[:125], ("label",)),
    "cube-hi": ("fib25", np.s_[125:], ("label",)),
}
# this package's own flood of the cube (``--cube-flood own``): equal to the reference's to VI 0.0008, and it
# records the overlaps between objects (the overlap feature, the hand rejoin step)
OWN_CUBE_FLOOD = ("PYTHONPATH=python python -m floodfilling.cli segment {shared}/data/fib25_train_250.h5:raw "
                  "{out}:seg --normalise fixed")
OTHER_HALF = {"dev-left": "dev-right", "dev-right": "dev-left", "cube-lo": "cube-hi", "cube-hi": "cube-lo"}
METRICS = ("vi", "vi_split", "vi_merge", "are", "seg_objects")


def load_volume(name: str, workdir: Path, cube_flood: str = "reference"):
    """(raw, labels, flood, overlaps or None, {marker name: whole-volume markers}) of a volume;
    ``cube_flood`` (fib25): "reference" (the published segmentation, no overlaps) or "own"
    (DIR/fib25-own/forward.h5, made by :data:`OWN_CUBE_FLOOD`; its overlaps recorded)."""
    import h5py

    from floodfilling.results import overlaps_dict

    if name == "dev":
        d = workdir / "dev"
        if not (d / "forward.h5").exists():  # the flood, once (bench/accuracy.py's files)
            import accuracy

            accuracy.forward("dev", accuracy.volume_files("dev", workdir), False)
        with h5py.File(d / "image.h5", "r") as f:
            raw, labels = f["raw"][:], f["labels"][:]
    else:
        d = workdir / ("fib25-own" if cube_flood == "own" else name)
        if cube_flood == "own" and not (d / "forward.h5").exists():
            raise SystemExit(f"{d / 'forward.h5'}: missing; make it first (~100 min on 2 cores, resumable):\n"
                             + OWN_CUBE_FLOOD.format(shared=SHARED, out=d / "forward.h5"))
        with h5py.File(SHARED / "data" / "fib25_train_250.h5", "r") as f:
            raw, labels = f["raw"][:], f["labels"][:]
    if name == "dev" or cube_flood == "own":  # this package's flood: its overlaps recorded
        with h5py.File(d / "forward.h5", "r") as f:
            flood, overlaps = f["seg"][:], overlaps_dict(f["seg_overlaps"][:])
        names = {"+rejoin": "rejoin_markers", "+gap_objects": "gap_markers", "hand_refine": "rejoin_gap_markers"}
    else:  # the reference's published segmentation: no overlaps, no rejoin
        with np.load(SHARED / "reference" / "google_ffn_fib25_training_sample2.npz") as z:
            flood = z["segmentation"].astype(np.uint32)
        overlaps = None
        names = {"+gap_objects": "gap_markers", "hand_refine": "gap_markers"}
    markers = {}
    for row, fname in names.items():
        if not (d / f"{fname}.npz").exists():
            make_markers(d / f"{fname}.npz", raw, flood, overlaps,
                         ("rejoin",) if fname == "rejoin_markers" else
                         ("rejoin", "gap_objects") if fname == "rejoin_gap_markers" else ("gap_objects",))
        with np.load(d / f"{fname}.npz") as z:
            markers[row] = (z["markers"], float(z["seconds"]), json.loads(str(z["counters"])))
    return raw, labels, flood, overlaps, markers


def make_markers(path: Path, raw, flood, overlaps, steps) -> None:
    """The whole volume's flood after the hand ``steps`` (no watershed): the markers each half's
    watershed starts from, cached in ``path`` with the steps' seconds and counters."""
    import os

    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.inference.refine import FloodNetwork, refine_array
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.model import load_model

    net, info = load_model(None, "cpu")
    image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)
    t = time.perf_counter()
    r = refine_array(image, flood, RefineConfig(steps=steps), FloodNetwork(net, info, InferenceConfig(threads=1)),
                     overlaps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, markers=r.segmentation, seconds=time.perf_counter() - t, counters=json.dumps(r.counters))
    os.replace(tmp, path)


def crop_overlaps(overlaps, ids):
    if overlaps is None:
        return None
    keep = set(int(i) for i in ids)
    return {k: v for k, v in overlaps.items() if k in keep}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/work/wt/refine-cache", help="floods and whole-volume gap markers (cached)")
    ap.add_argument("--units", default=",".join(UNITS), help="comma-separated held-out units, of " + ", ".join(UNITS))
    ap.add_argument("--bases", default="cores,gap_cores",
                    help="bases of the learned rows (cores, gap_cores, watershed)")
    ap.add_argument("--threshold", type=float, default=0.5, help="merge probability (not tuned on any unit)")
    ap.add_argument("--core-radius", type=float, default=2.0, help="learned base: gap core radius (hand step: 3)")
    ap.add_argument("--min-core", type=int, default=30, help="learned base: smallest gap core (hand step: 100)")
    ap.add_argument("--cube-flood", choices=("reference", "own"), default="reference",
                    help="the cube units' flood: the reference's published segmentation or this package's (overlaps)")
    ap.add_argument("--tag", default="", help="suffix of the default JSON name and of the cached models")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/refine-learned-<machine>.json)")
    ap.add_argument("--no-boundary-map", action="store_true",
                    help="learned rows without the boundary map (the base's watershed on the image; before 2026-12-07)")
    ap.add_argument("--train-bundled", default=None, metavar="OUT",
                    help="instead: train the bundled refine model on both volumes whole into OUT")
    args = ap.parse_args()
    if args.train_bundled:
        train_bundled(Path(args.workdir), args.train_bundled, args.cube_flood, not args.no_boundary_map)
        return 0

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.inference.learned import load_refine_model, learned_refine, save_refine_model
    from floodfilling.inference.refine import refine_array
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.inference.train_refine import LEARNED_BASE, TrainUnit, train_model
    from floodfilling.model import load_model

    workdir = Path(args.workdir)
    _, info = load_model(None, "cpu")
    cfg = RefineConfig(**{**LEARNED_BASE, "gap_core_radius": args.core_radius, "gap_min_core": args.min_core})
    vols = {}
    units: dict[str, TrainUnit] = {}
    hand: dict[str, dict] = {}
    for name, (vol, sl, _) in UNITS.items():
        if vol not in vols:
            raw, labels, flood, overlaps, markers = load_volume(vol, workdir, args.cube_flood)
            image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)  # as the flood saw it
            vols[vol] = (image, labels, flood, overlaps, markers)
        image, labels, flood, overlaps, markers = vols[vol]
        fl = np.ascontiguousarray(flood[sl])
        units[name] = TrainUnit(name, np.ascontiguousarray(image[sl]), fl, np.ascontiguousarray(labels[sl]),
                                crop_overlaps(overlaps, np.unique(fl)),
                                {"unit": name, "volume": vol, "slice": str(sl)})
        hand[name] = {row: (np.ascontiguousarray(m[sl]), s, c) for row, (m, s, c) in markers.items()}
        units[name].painted = (hand[name]["+gap_objects"][0], {}, {})  # base gap_cores: the cached gap floods

    models: dict[tuple, object] = {}

    def model_for(base: str, train: tuple[str, ...]):
        key = (base, train)
        if key not in models:
            own = "-own" if args.cube_flood == "own" and any(u.startswith("cube") for u in train) else ""
            bm = "" if args.no_boundary_map else "-bmap"  # never a cached model of the other recipe
            path = workdir / "models" / f"{base}-r{args.core_radius:g}-m{args.min_core}{own}{bm}-{'+'.join(train)}.json"
            if path.exists():
                models[key] = (load_refine_model(str(path)), None)
            else:
                t = time.perf_counter()
                m = train_model([units[u] for u in train], base, cfg, args.threshold,
                                progress=lambda s: print("  train:", s, flush=True),
                                settings={"trained_on_units": list(train)}, boundary=not args.no_boundary_map)
                secs = time.perf_counter() - t
                path.parent.mkdir(parents=True, exist_ok=True)
                save_refine_model(m, str(path), overwrite=True)
                models[key] = (m, secs)
        return models[key]

    result = {"benchmark": "refine-learned", "machine": machine_id(), "threshold": args.threshold,
              "cube_flood": args.cube_flood, "boundary_map": not args.no_boundary_map,
              "command": "python bench/refine_learned.py " + " ".join(sys.argv[1:]),
              "refine_learned_base": cfg.to_dict(), "units": {}}
    for name in args.units.split(","):
        u = units[name]
        conventions = UNITS[name][2]
        rows = result["units"][name] = {}

        def record(row, seg, secs, trained_on=None, extra=None):
            table = evaluation.contingency(seg, u.labels)
            r = rows[row] = {z: {k: evaluation.evaluate(None, None, gt_zero=z, table=table)[k] for k in METRICS}
                             for z in conventions}
            r["seconds"] = round(secs, 2)
            if trained_on is not None:
                r["trained_on"] = trained_on
            r.update(extra or {})
            print(name, row, json.dumps(r), flush=True)

        record("forward", u.flood, 0.0)
        t = time.perf_counter()
        floor = refine_array(u.image, u.flood, RefineConfig(steps=("watershed",))).segmentation
        record("watershed", floor, time.perf_counter() - t)
        for row, (m, gap_secs, counters) in hand[name].items():
            t = time.perf_counter()
            seg = refine_array(u.image, m, RefineConfig(steps=("watershed",))).segmentation
            record(row, seg, time.perf_counter() - t,
                   extra={"gap_floods_whole_volume_seconds": round(gap_secs, 1), "whole_volume_counters": counters})
        for base in args.bases.split(","):
            trainings = {"learned_other_half": (OTHER_HALF[name],),
                         "learned_others": tuple(k for k in UNITS if k != name)}
            if name.startswith("dev"):
                trainings["learned_cube"] = ("cube-lo", "cube-hi")
            for label, train in trainings.items():
                try:
                    m, train_secs = model_for(base, train)
                except ValueError as exc:  # e.g. no same-neuron pair to learn from
                    rows[f"{label}[{base}]"] = {"not_trainable": str(exc), "trained_on": list(train)}
                    print(name, label, base, "not trainable:", exc, flush=True)
                    continue
                t = time.perf_counter()
                r = learned_refine(u.image, u.flood, m, cfg, u.overlaps, painted=u.painted)
                record(f"{label}[{base}]", r.segmentation, time.perf_counter() - t, list(train),
                       {"train_seconds": None if train_secs is None else round(train_secs, 1),
                        "merges": r.counters["learned_merges"], "base_objects": r.counters["learned_base_objects"],
                        "train_examples": m.training.get("examples")})
    out = Path(args.out) if args.out else HERE / "results" / f"refine-learned{args.tag}-{machine_id()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


def train_bundled(workdir: Path, out: str, cube_flood: str = "reference", boundary: bool = True) -> None:
    """The bundled refine model (``--train-bundled OUT``): base cores, trained on both shipped
    volumes (dev: this package's flood; cube: ``cube_flood``, see :func:`load_volume`), whole, or
    with the boundary map as the four units of :data:`UNITS`; each volume's files, digests and
    flood recorded in the file."""
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.inference.learned import save_refine_model
    from floodfilling.normalise import resolve_normalisation
    from floodfilling.inference.train_refine import LEARNED_BASE, TrainUnit, train_model
    from floodfilling.model import load_model
    from floodfilling.results import image_digest

    _, info = load_model(None, "cpu")
    units = []
    floods = {"dev": "this package's flood: bundled FFN model, default inference options (fp32)",
              "fib25": "the reference's published segmentation (google_ffn_fib25_training_sample2.npz; this package's "
                       "flood equals it to VI 0.0008 with --normalise fixed); no overlaps"
                       if cube_flood == "reference" else
                       "this package's flood: bundled FFN model, --normalise fixed (the reference's normalisation), "
                       "fp32; overlaps recorded"}
    files = {"dev": "fib_medulla_dev_50x100x200.h5", "fib25": "fib25_train_250.h5"}
    for vol in ("dev", "fib25"):
        raw, labels, flood, overlaps, _ = load_volume(vol, workdir, cube_flood)
        image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)
        rec = {"image": f"{files[vol]}:raw", "labels": f"{files[vol]}:labels", "flood": floods[vol],
               "shape": list(raw.shape), "image_digest": image_digest(raw), "labels_digest": image_digest(labels),
               "labelled_fraction": round(float(np.mean(labels > 0)), 4),
               "flood_objects": int(len(np.unique(flood)) - 1), "flood_model": "bundled fib25_convstack3d_depth12.npz",
               "normalisation": "standardise (default)"}
        if not boundary:
            units.append(TrainUnit(vol, image, flood, labels, overlaps, rec))
            continue
        # with the boundary map: each volume as its two halves (UNITS), so that each half's
        # training base is made with a map fitted on the other three, its own volume's other half
        # among them (two whole volumes would each get the other volume's map only)
        for name, (v, sl, _) in UNITS.items():
            if v == vol:
                fl = np.ascontiguousarray(flood[sl])
                units.append(TrainUnit(name, np.ascontiguousarray(image[sl]), fl, np.ascontiguousarray(labels[sl]),
                                       crop_overlaps(overlaps, np.unique(fl)), {**rec, "unit": name, "slice": str(sl)}))
    m = train_model(units, "cores", RefineConfig(**LEARNED_BASE), progress=print, boundary=boundary,
                    settings={"trained_by": "ffn-refine bundled model: bench data, whole volumes (shared/data)",
                              "evidence": "bench/results/refine-learned" + ("-own" if cube_flood == "own" else "")
                                          + ("-bmap" if boundary else "") + "-amd-epyc-2c.json (leave one out)"})
    save_refine_model(m, out, overwrite=True)


def markdown(result: dict) -> str:
    lines = []
    for name, rows in result["units"].items():
        conv = UNITS[name][2]
        lines.append(f"\n{name}\n")
        lines.append("| row | " + " | ".join(f"gt 0 {'ignored' if z == 'ignore' else 'counted'}" for z in conv)
                     + " | objects | seconds | trained on |")
        lines.append("|---" * (len(conv) + 4) + "|")
        for row, r in rows.items():
            if "not_trainable" in r:
                lines.append(f"| {row} | not trainable: {r['not_trainable']} |")
                continue
            cells = [f"{r[z]['vi']:.3f} ({r[z]['vi_split']:.3f} / {r[z]['vi_merge']:.3f}), ARE {r[z]['are']:.3f}"
                     for z in conv]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {r[conv[0]]['seg_objects']} | {r['seconds']} | "
                         f"{', '.join(r.get('trained_on', [])) or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
