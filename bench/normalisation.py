"""The bundled FIB-25 model on the dev volume (FIB-SEM of the same tissue, other contrast)
under each normalisation: objects and quality against its labels.

    python bench/normalisation.py      # writes bench/results/normalisation-<machine>.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine_id  # noqa: E402


def main() -> int:
    import h5py

    from floodfilling import evaluation
    from floodfilling.config import InferenceConfig
    from floodfilling.inference.segment import segment_array

    with h5py.File(SHARED / "data" / "fib_medulla_dev_50x100x200.h5", "r") as f:
        raw, labels = f["raw"][:], f["labels"][:]
    out = {"benchmark": "normalisation", "machine": machine_id(), "volume": "fib_medulla_dev_50x100x200.h5",
           "command": "python bench/normalisation.py", "gt_zero": "ignore", "modes": {}}
    for mode in ("fixed", "standardise", "histogram"):
        t = time.perf_counter()
        r = segment_array(raw, config=InferenceConfig(normalise=mode))
        ev = evaluation.evaluate(r.segmentation, labels, gt_zero="ignore")
        out["modes"][mode] = {
            "normalisation": {k: r.normalisation[k] for k in ("method", "mean", "std")},
            "objects": ev["seg_objects"], "gt_objects": ev["gt_objects"], "fov_steps": int(r.counters["steps"]),
            "largest_object_fraction": float((r.segmentation == r.segmentation[r.segmentation > 0].max()).mean())
            if r.segmentation.any() else 0.0,
            **{k: ev[k] for k in ("vi", "vi_split", "vi_merge", "are", "precision", "recall")},
            "seconds": time.perf_counter() - t,
        }
    text = json.dumps(out, indent=2)
    print(text)
    (HERE / "results" / f"normalisation-{machine_id()}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
