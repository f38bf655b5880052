"""Pictures without plotting dependencies: three orthogonal slices with object colours, PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .disk import atomic_write_bytes


def label_colours(labels: np.ndarray) -> np.ndarray:
    """A stable pseudo-random RGB colour per id (uint8, id 0 black)."""
    ids = labels.astype(np.uint64)
    h = (ids * np.uint64(2654435761) + np.uint64(12345)) & np.uint64(0xFFFFFF)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(0xFF) for s in (16, 8, 0)], axis=-1).astype(np.uint8)
    rgb = (rgb // 2 + 96).astype(np.uint8)  # bright, distinguishable
    rgb[labels == 0] = 0
    return rgb


def overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image (any dtype, 2-D) blended with label colours where labels != 0."""
    g = gray.astype(np.float32)
    lo, hi = np.percentile(g, [1, 99]) if g.size else (0.0, 1.0)
    span = float(hi - lo)  # relative to the data: an image in [0, 1e-10] keeps its contrast
    g = np.clip((g - lo) / span, 0, 1) * 255 if span > 0 else np.zeros_like(g)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    col = label_colours(labels).astype(np.float32)
    m = labels != 0
    rgb[m] = (1 - alpha) * rgb[m] + alpha * col[m]
    return rgb.astype(np.uint8)


def orthogonal_slices(raw: np.ndarray, labels: np.ndarray, center=None, gap: int = 4, zoom: int = 1) -> np.ndarray:
    """Side by side: the yx plane at z=c0, the zx plane at y=c1, the zy plane at x=c2
    (each enlarged ``zoom`` times, nearest neighbour)."""
    c = [s // 2 for s in raw.shape] if center is None else list(center)
    planes = [(raw[c[0]], labels[c[0]]), (raw[:, c[1]], labels[:, c[1]]), (raw[:, :, c[2]], labels[:, :, c[2]])]
    imgs = [overlay(r, l).repeat(zoom, axis=0).repeat(zoom, axis=1) for r, l in planes]
    h = max(i.shape[0] for i in imgs)
    w = sum(i.shape[1] for i in imgs) + gap * (len(imgs) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for i in imgs:
        out[: i.shape[0], x: x + i.shape[1]] = i
        x += i.shape[1] + gap
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encodes an (H, W, 3) uint8 image as PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"png: expected an (H, W, 3) image, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(rgb))
