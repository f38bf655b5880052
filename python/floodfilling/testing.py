"""Small deterministic models for tests and benchmarks (no training, no downloads)."""

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
