"""The multi-subvolume engine: K canvases in flight give exactly what each gives alone."""

import numpy as np
import pytest
import torch

from floodfilling.config import InferenceConfig
from floodfilling.inference import seeds
from floodfilling.inference.canvas import Canvas
from floodfilling.inference.engine import Job, run_jobs
from floodfilling.inference.predictor import Predictor
from floodfilling.inference.segment import normalise_image
from floodfilling.model import ConvStack3D

FOV = (9, 9, 9)
DELTAS = (4, 4, 4)


def bright_flood_net() -> ConvStack3D:
    """A real ConvStack3D (depth 1, 4 features) with hand-set weights: update ~ 4 * image + 2
    plus small fixed random weights, so it floods bright regions and exercises every layer."""
    torch.manual_seed(0)
    net = ConvStack3D(depth=1, features=4)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.05)
        net.conv0_a.weight[0, 0, 1, 1, 1] += 1.0  # +image
        net.conv0_a.weight[1, 0, 1, 1, 1] -= 1.0  # -image
        net.conv0_b.weight[0, 0, 1, 1, 1] += 1.0
        net.conv0_b.weight[1, 1, 1, 1, 1] += 1.0
        net.conv_lom.weight[0, 0] += 4.0
        net.conv_lom.weight[0, 1] -= 4.0
        net.conv_lom.bias += 2.0
    return net.eval()


@pytest.fixture(scope="module")
def blocks(fib25):
    """8 overlapping 32^3 subvolumes of the FIB-25 cube (2 x 2 x 2, 8-voxel overlaps)."""
    raw = fib25[0][100:156, 100:156, 100:156]
    img = normalise_image(raw, 128, 33)
    out = []
    for z in (0, 24):
        for y in (0, 24):
            for x in (0, 24):
                sub = np.ascontiguousarray(img[z:z + 32, y:y + 32, x:x + 32])
                out.append((sub, seeds.Peaks().seeds(sub, (4, 4, 4))))
    return out


def run(blocks, k, max_batch, device="cpu"):
    net = bright_flood_net()
    cfg = InferenceConfig(min_segment_size=50)
    pred = Predictor(net, FOV, device=device, max_batch=max_batch)
    jobs = [Job(i, (lambda b=b: Canvas(b[0], b[1], cfg, FOV, DELTAS))) for i, b in enumerate(blocks)]
    res = run_jobs(jobs, pred, inflight=k)
    return {i: (cv.final_segmentation(), {o: (v.seed_zyx, v.steps) for o, v in cv.state.origins.items()},
                cv.state.counters["steps"]) for i, cv in res.items()}, pred


@pytest.mark.device
def test_k8_equals_k1_voxel_for_voxel_and_step_for_step(blocks, test_device):
    """The host path with the network on the lane's device. Batches of 8 are exact on the CPU;
    on a GPU they also need batch-size-independent logits (see
    test_device_path_equals_host_path_k1_k8_and_pipelined)."""
    alone, p1 = run(blocks, 1, 1, test_device)
    assert sum(r[2] for r in alone.values()) > 50  # it really floods
    assert all(len(r[1]) >= 1 for r in alone.values()) and sum(len(r[1]) for r in alone.values()) >= 12
    together, p8 = run(blocks, 8, 1, test_device)
    assert p8.calls == p1.calls  # batch 1: one call per FOV either way
    batched, pb = run(blocks, 8, 8, test_device)
    assert pb.calls < p1.calls  # FOVs of different canvases shared network calls
    for i in alone:
        for other in (together, batched):
            assert np.array_equal(alone[i][0], other[i][0])
            assert alone[i][1] == other[i][1]
            assert alone[i][2] == other[i][2]


def test_bad_inflight(blocks):
    with pytest.raises(ValueError, match="inflight"):
        run_jobs([], Predictor(bright_flood_net(), FOV, device="cpu"), inflight=0)
    with pytest.raises(ValueError, match="max_batch"):
        Predictor(bright_flood_net(), FOV, device="cpu", max_batch=0)
    with pytest.raises(ValueError, match="device"):
        Predictor(bright_flood_net(), FOV, device="cuda:7" if not torch.cuda.is_available() else "tpu")
