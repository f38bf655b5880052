"""Training metrics: ``metrics.csv`` (one row per ``log_every`` steps), ``metrics.png`` (plotted)
and TensorBoard events."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np

from .. import disk

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
METRIC_COLUMNS = ["step", "examples", "lr", "loss", "precision", "recall", "f1", "accuracy", "sequences",
                  "moves_per_sequence", "patch_precision", "patch_recall", "fov_per_s", "elapsed_s",
                  "val_loss", "val_precision", "val_recall", "val_f1"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(METRIC_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r.get(c, float("nan"))) for c in METRIC_COLUMNS])
    disk.atomic_write_bytes(path, f.getvalue().encode())


def append_metrics(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(METRIC_COLUMNS)
        w.writerow([_fmt(row.get(c, float("nan"))) for c in METRIC_COLUMNS])


_COLOURS = {"loss": (200, 40, 40), "precision": (40, 90, 200), "recall": (30, 160, 60), "f1": (150, 60, 170),
            "val_loss": (240, 150, 40), "val_f1": (240, 150, 40)}


def _draw_line(img, x0, y0, x1, y1, colour) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w = img.shape[:2]
    for dy in (0, 1):
        ok = (ys + dy >= 0) & (ys + dy < h) & (xs >= 0) & (xs < w)
        img[ys[ok] + dy, xs[ok]] = colour


def plot_metrics(rows: list[dict[str, float]], width: int = 640, panel: int = 200) -> np.ndarray:
    """RGB image: top panel loss (own scale), bottom panel precision, recall, F1 on [0, 1];
    x is the step. Colours: loss red, precision blue, recall green, F1 purple, validation loss
    and F1 orange; grey grid at 0.25 steps of the bottom panel and at the loss panel's quarter
    heights."""
    pad = 10
    img = np.full((2 * panel + 3 * pad, width, 3), 255, dtype=np.uint8)
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    if len(steps) == 0:
        return img
    s0, s1 = steps.min(), max(steps.max(), steps.min() + 1)

    def xmap(s):
        return pad + (s - s0) / (s1 - s0) * (width - 2 * pad - 1)

    panels = [(["loss", "val_loss"], None), (["precision", "recall", "f1", "val_f1"], (0.0, 1.0))]
    for p, (keys, yr) in enumerate(panels):
        top = pad + p * (panel + pad)
        img[top:top + panel, pad - 1] = img[top:top + panel, width - pad] = 0
        img[top - 1, pad - 1:width - pad + 1] = img[top + panel, pad - 1:width - pad + 1] = 0
        for q in (0.25, 0.5, 0.75):
            img[top + int(panel * q), pad:width - pad:4] = 180
        vals = {k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64) for k in keys}
        if yr is None:
            allv = np.concatenate([v[np.isfinite(v)] for v in vals.values()] + [np.zeros(0)])
            if allv.size == 0:
                continue
            lo, hi = 0.0, float(allv.max()) * 1.05 or 1.0
        else:
            lo, hi = yr
        for k, v in vals.items():
            ys = top + panel - 1 - (np.clip(v, lo, hi) - lo) / (hi - lo) * (panel - 1)
            xs = xmap(steps)
            ok = np.isfinite(ys)
            pts = list(zip(xs[ok], ys[ok]))
            for (a, b), (c, d) in zip(pts[:-1], pts[1:]):
                _draw_line(img, a, b, c, d, _COLOURS[k])
            if len(pts) == 1:
                _draw_line(img, pts[0][0], pts[0][1], pts[0][0] + 1, pts[0][1], _COLOURS[k])
    return img


def save_plot(path: Path, rows: list[dict[str, float]]) -> None:
    from ..viz import write_png

    try:
        write_png(path, plot_metrics(rows))
    except Exception as exc:  # noqa: BLE001 - a plot must never stop training
        log.warning("could not write %s: %s", path, exc)


class TensorBoard:
    def __init__(self, logdir: Path, enabled: bool):
        self.w = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            return
        self.w = SummaryWriter(str(logdir))

    def add(self, row: dict[str, float]) -> None:
        if self.w is None:
            return
        for k, v in row.items():
            if k not in ("step",) and isinstance(v, float) and math.isfinite(v):
                tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                self.w.add_scalar(tag, v, int(row["step"]))
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
