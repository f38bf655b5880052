"""``ffn demo``: segment the bundled FIB-25 crop with the bundled model and evaluate it.

The crop (64 x 112 x 112 voxels at 10 nm, z, y, x) is cut from the FIB-25 fly-medulla
"training_sample2" cube (janelia-flyem/neuroproof_examples, CC-BY) with its ground-truth
labels; the model is google/ffn's FIB-25 model (Apache-2.0). See floodfilling/data/NOTICE.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import disk, evaluation, locks, results, viz, volumes
from .config import InferenceConfig
from .model import bundled_model_path
from .inference.segment import SegmentResult, segment_array, write_result

DEMO_CROP = "fib25_demo_crop.h5"
LOCK_FILE = "demo.lock"  # OUT/demo.lock while a demo writes OUT (one demo per directory)


def demo_crop_path() -> Path:
    return Path(str(resources.files("floodfilling") / "data" / DEMO_CROP))


@dataclass
class DemoResult:
    segment: SegmentResult
    evaluation: dict
    segmentation_path: Path
    png_path: Path
    report_path: Path


def run_demo(out_dir: Path, device: str = "auto", threads: int = 0, progress: bool = True) -> DemoResult:
    out_dir = Path(out_dir)
    created = not out_dir.is_dir()
    with disk.disk_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with locks.file_lock(out_dir / LOCK_FILE, f"demo directory {out_dir}", {"command": "demo"}):
            return _run_demo(out_dir, device, threads, progress)
    except BaseException:
        if created:  # a failed first demo leaves no empty directory (its resume state keeps it)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _run_demo(out_dir: Path, device: str, threads: int, progress: bool) -> DemoResult:
    crop = demo_crop_path()
    with volumes.open_volume(f"{crop}:raw") as v:
        raw = v.read()
        res_nm = v.resolution_zyx_nm
    with volumes.open_volume(f"{crop}:labels") as v:
        labels = v.read()
    cfg = InferenceConfig(device=device, threads=threads)
    seg_path = out_dir / "demo_segmentation.h5"
    res = segment_array(raw, config=cfg, resolution_zyx=res_nm or (1, 1, 1), progress=progress,
                        state_path=out_dir / "demo_segmentation.h5.resume.npz", manifest={"demo": DEMO_CROP})
    ev = evaluation.evaluate(res.segmentation, labels, gt_zero="ignore")
    write_result(seg_path, "seg", res, attrs=results.ResultAttrs(
        resolution_zyx_nm=res_nm, bbox_zyx=((0, 0, 0), raw.shape), source_image=f"{crop}:raw",
        model=str(bundled_model_path()), config=cfg.to_dict(), normalisation=res.normalisation,
        counters=res.counters).to_dict(), overwrite=True)
    state = out_dir / "demo_segmentation.h5.resume.npz"
    if state.exists():
        state.unlink()
    png = out_dir / "demo_slices.png"
    viz.write_png(png, viz.orthogonal_slices(raw, res.segmentation, zoom=3))
    report = out_dir / "demo_evaluation.json"
    disk.atomic_write_bytes(report, (json.dumps({"counters": res.counters, "seconds": res.seconds,
                                                     "evaluation": ev}, indent=2) + "\n").encode())
    return DemoResult(res, ev, seg_path, png, report)
