"""Small deterministic models and volumes for tests and benchmarks (no training, no downloads)."""

from __future__ import annotations

from pathlib import Path


def mean_flood_model(path: str | Path) -> Path:
    """Writes ConvStack3D(depth=1, features=4), FOV 9, deltas 2, with hand-set weights:
    logits = seed + 6 * mean3x3x3(normalised image), so it floods bright (above-mean) regions."""
    import torch

    from .model import ConvStack3D, save_model

    net = ConvStack3D(depth=1, features=4)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv0_a.weight[0, 0] = 1 / 27.0
        net.conv0_a.weight[1, 0] = -1 / 27.0
        net.conv0_b.weight[0, 0, 1, 1, 1] = 1
        net.conv0_b.weight[1, 1, 1, 1, 1] = 1
        net.conv_lom.weight[0, 0] = 6
        net.conv_lom.weight[0, 1] = -6
    save_model(path, net, {"fov_zyx": [9, 9, 9], "deltas_zyx": [2, 2, 2], "intensity": {"mean": 128, "std": 33}})
    return Path(path)


def voronoi_volume(shape=(30, 32, 34), n: int = 12, seed: int = 0):
    """(raw uint8, labels uint32): ``n`` Voronoi cells as objects, dark 1-voxel boundaries and
    bright noisy interiors (a tiny training or labelling case)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(0, s, n) for s in shape], 1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    d = ((grid[:, None, :] - pts[None]) ** 2).sum(-1)
    order = np.sort(d, 1)
    labels = (np.argmin(d, 1) + 1).reshape(shape).astype(np.uint32)
    edge = (np.sqrt(order[:, 1]) - np.sqrt(order[:, 0]) < 1.0).reshape(shape)
    raw = np.where(edge, 60, 170) + rng.normal(0, 12, shape)
    return np.clip(raw, 0, 255).astype(np.uint8), labels


def demo_crop(shape=(32, 48, 48)):
    """(raw uint8, labels uint32): the corner ``shape`` (z, y, x) of the bundled FIB-25 demo
    crop, a small real volume with labels."""
    import h5py
    import numpy as np

    from .demo import demo_crop_path

    box = tuple(slice(0, int(n)) for n in shape)
    with h5py.File(demo_crop_path(), "r") as src:
        return src["raw"][box].astype(np.uint8), src["labels"][box].astype(np.uint32)
