"""What the learned refinement costs on the whole FIB-25 cube (issue 29: at most 25 % of the
flood), in memory as one tile and tiled as the default block (the blocks of ``ffn segment
--block --refine``: the same result, tested), with a refine model (default: the bundled one).

    python bench/refine_learned_cost.py [--model bundled] [--cube-flood own] [--workdir DIR] [--out FILE]

The flood is read, not run (``bench/refine_learned.py``'s cache; its cost is recorded there:
own flood 25,803 FOV steps, 6,051 s on 2 idle EPYC cores). Prints JSON: seconds, objects and
VI (gt 0 counted; the bundled model was trained on this cube, so the VI shows that tiling
changes nothing, not accuracy).
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
from common import machine_id  # noqa: E402
from refine_learned import load_volume  # noqa: E402

BLOCK = (128, 256, 256)  # ffn segment --block's default


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled", help="refine model file (default: the bundled one)")
    ap.add_argument("--cube-flood", choices=("reference", "own"), default="own", help="see bench/refine_learned.py")
    ap.add_argument("--workdir", default="/work/wt/refine-cache", help="bench/refine_learned.py's cache")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/refine-learned-cost-<machine>.json)")
    args = ap.parse_args()

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.inference.learned import learned_refine, load_refine_model
    from floodfilling.model import load_model
    from floodfilling.normalise import resolve_normalisation

    _, info = load_model(None, "cpu")
    m = load_refine_model(args.model)
    raw, labels, flood, overlaps, _ = load_volume("fib25", Path(args.workdir), args.cube_flood)
    image = resolve_normalisation(InferenceConfig(), info, raw).apply(raw)
    result = {"benchmark": "refine-learned-cost", "machine": machine_id(), "model": m.source,
              "boundary_map": bool(m.boundary), "cube_flood": args.cube_flood,
              "command": "python bench/refine_learned_cost.py " + " ".join(sys.argv[1:]), "runs": {}}
    segs = {}
    for name, tile in (("whole", (0, 0, 0)), ("tiled_default_block", BLOCK)):
        t = time.perf_counter()
        r = learned_refine(image, flood, m, RefineConfig(), overlaps, tile=tile)
        secs = time.perf_counter() - t
        segs[name] = r.segmentation
        ev = evaluation.evaluate(r.segmentation, labels, gt_zero="label")
        result["runs"][name] = {"tile": list(tile), "seconds": round(secs, 1),
                                "objects": int(len(np.unique(r.segmentation)) - 1),
                                **{k: round(float(ev[k]), 4) for k in ("vi", "vi_split", "vi_merge", "are")}}
        print(name, json.dumps(result["runs"][name]), flush=True)
    result["tiled_voxels_differing_from_whole"] = int(np.count_nonzero(segs["whole"] != segs["tiled_default_block"]))
    out = Path(args.out) if args.out else HERE / "results" / f"refine-learned-cost-{machine_id()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
