"""The device-resident path (image and canvases as torch tensors, one small device->host copy
per step) against the host path (NumPy canvases, native kernels).

Run here on torch's cpu device: the same torch code runs on cuda and xpu, where only the
device differs. Every comparison is exact (fp32).
"""

import numpy as np
import pytest
import torch

from floodfilling import kernels
from floodfilling.kernels_reference import gather_fovs_reference
from floodfilling.config import InferenceConfig
from floodfilling.inference.canvas import Canvas, CanvasState
from floodfilling.inference.device import DeviceCanvas, DevicePredictor, SlotPool, disco_count_needed
from floodfilling.inference.engine import Job, make_predictor, run_jobs
from floodfilling.inference.predictor import Predictor

from test_engine import DELTAS, FOV, blocks, bright_flood_net  # noqa: F401  (fixture)
from test_inference_parity import reference  # noqa: F401  (fixture)


class FixedNet(torch.nn.Module):
    """Returns preset logits (n, 1, *fov) whatever the input: tests the write and the faces."""

    def __init__(self):
        super().__init__()
        self.out = None
        self.seen = []

    def forward(self, image, seed):
        self.seen.append(seed[:, 0].clone())
        return self.out[: image.shape[0]].clone()


def test_disco_count_needed_matches_mean_rule():
    for n in (1, 2, 3, 7, 27, 35937):
        for t in (0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0, 2.0):
            need = disco_count_needed(n, t)
            want = next((c for c in range(n + 1) if c / n > t), n + 1)
            assert need == want, (n, t)


@pytest.mark.parametrize("deltas", [(2, 2, 2), (1, 3, 2), (0, 2, 1)])
def test_step_equals_native_update(deltas):
    """Disco write, face maxima/argmaxes and candidate values equal kernels.update_fovs."""
    rng = np.random.default_rng(1)
    fov = (5, 7, 9)
    cfg = InferenceConfig(min_segment_size=1)
    net = FixedNet()
    pred = DevicePredictor(net, fov, deltas, cfg, device="cpu", max_batch=4, slots=4)
    shapes = [(9, 11, 13), (12, 10, 15), (5, 7, 9), (9, 11, 13)]
    host, dev = [], []
    for i, shp in enumerate(shapes):
        img = rng.standard_normal(shp).astype(np.float32)
        h = Canvas(img, np.zeros((0, 3)), cfg, fov, deltas)
        d = pred.new_canvas(img, np.zeros((0, 3)), cfg, deltas)
        # a partly predicted canvas: NaN, negative and positive logits, ties on the faces
        lg = np.round(rng.standard_normal(shp) * 3).astype(np.float32)
        lg[rng.random(shp) < 0.3] = np.nan
        h.logits[...] = lg
        pred.pool.logits[d.slot, :shp[0], :shp[1], :shp[2]] = torch.from_numpy(lg)
        host.append(h)
        dev.append(d)
    for trial in range(6):
        centers = [tuple(int(rng.integers(f // 2, s - f // 2)) for f, s in zip(fov, cv.shape)) for cv in host]
        # rounded values: many equal face maxima (first in C order must win); some FOVs
        # mostly above the move threshold (disco rule on), some not
        out = np.round(rng.standard_normal((4, 1) + fov) * 2).astype(np.float32)
        out[trial % 4] += 4.0
        net.out = torch.from_numpy(out)
        for d, c in zip(dev, centers):  # track a few positions inside and outside the FOV
            d._rows.clear()
            for p in [c, tuple(v + 1 for v in c), (0, 0, 0)]:
                if all(0 <= v < s for v, s in zip(p, d.shape)):
                    d._track(p, 0.0)
        want_seed = gather_fovs_reference([h.logits for h in host], np.asarray(centers), fov, pred.t_pad)
        recs = pred.predict(dev, centers)
        assert np.array_equal(net.seen[-1].numpy(), want_seed)  # NaN -> logit(pad) network input
        want_scores, want_offsets = kernels.update_fovs(
            [h.logits for h in host], out[:, 0].copy(), np.asarray(centers), move_threshold=pred.t_move,
            deltas=deltas, disco_seed_threshold=cfg.disco_seed_threshold)
        for i, (h, d, rec) in enumerate(zip(host, dev, recs)):
            got = d.device_logits()
            assert np.array_equal(got, h.logits, equal_nan=True), (trial, i)
            scores, offsets, qvals = rec
            live = [a for a in range(6) if deltas[a // 2] > 0]
            assert [scores[a] for a in live] == want_scores[i, live].tolist()
            assert [offsets[a] for a in live] == want_offsets[i, live].tolist()
            assert all(scores[a] == -np.inf for a in range(6) if a not in live)
            d._apply(centers[i], rec)
            for p, row in d._rows.items():
                if all(abs(a - b) <= f // 2 for a, b, f in zip(p, centers[i], fov)):
                    assert d._qval[row] == h.logits[p]


def run_blocks(blocks, predictor_factory, k):  # noqa: F811
    cfg = InferenceConfig(min_segment_size=50)
    pred = predictor_factory(cfg, k)
    jobs = [Job(i, (lambda b=b: pred.new_canvas(b[0], b[1], cfg, DELTAS))) for i, b in enumerate(blocks)]
    res = run_jobs(jobs, pred, inflight=k)
    out = {i: (cv.final_segmentation(), {o: (v.seed_zyx, v.steps) for o, v in cv.state.origins.items()},
               cv.state.counters) for i, cv in res.items()}
    return out, pred


def test_device_path_equals_host_path_k1_k8_and_pipelined(blocks):  # noqa: F811
    net = bright_flood_net()
    host, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device="cpu"), 1)
    assert sum(r[2]["steps"] for r in host.values()) > 50
    def factory(k, pipeline):
        def make(cfg, k):
            pred = make_predictor(net, FOV, DELTAS, InferenceConfig(min_segment_size=50, resident="on"),
                                  device="cpu", max_batch=k, inflight=k)
            pred.pipeline = pipeline  # two alternating groups (the cuda/xpu default)
            return pred
        return make

    for k, pipeline in ((1, False), (8, False), (8, True), (5, True)):
        dev, pred = run_blocks(blocks, factory(k, pipeline), k)
        assert isinstance(pred, DevicePredictor)
        assert pred.pipeline_groups(k) == (2 if pipeline else 1)
        if k > 1:
            assert pred.calls < sum(r[2]["steps"] for r in host.values())  # batched calls
        assert sorted(pred.pool.free) == list(range(pred.pool.slots))  # every slot given back
        for i in host:
            assert np.array_equal(host[i][0], dev[i][0]), (k, i)
            assert host[i][1] == dev[i][1]
            assert host[i][2] == dev[i][2]


@pytest.mark.skipif(not __import__("floodfilling.inference.predictor", fromlist=["x"]).cpu_has_bf16(),
                    reason="bf16 needs AVX512_BF16/AMX on this CPU")
def test_bf16_device_path_equals_bf16_host_path(blocks):  # noqa: F811
    """--precision bf16 on the device path (autocast around the batched call) gives the host
    path's bf16 result at batch 1: the same forward, so the same voxels and steps."""
    net = bright_flood_net()
    host, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device="cpu", precision="bf16"), 1)
    dev, pred = run_blocks(blocks, lambda cfg, k: make_predictor(
        net, FOV, DELTAS, InferenceConfig(min_segment_size=50, resident="on", precision="bf16"), device="cpu",
        max_batch=1, inflight=1), 1)
    assert isinstance(pred, DevicePredictor) and pred.precision == "bf16"
    for i in host:
        assert np.array_equal(host[i][0], dev[i][0]), i
        assert host[i][1] == dev[i][1] and host[i][2] == dev[i][2]
    fp32, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device="cpu"), 1)
    assert any(not np.array_equal(fp32[i][0], host[i][0]) for i in host)  # bf16 really ran


def test_pool_grows_and_keeps_contents():
    pool = SlotPool(torch.device("cpu"), 1, (4, 4, 4))
    a = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    s0 = pool.acquire(a)
    pool.logits[s0, 1, 2, 3] = 7.0
    b = np.ones((6, 3, 5), np.float32)
    s1 = pool.acquire(b)  # larger and no free slot: grows both ways
    assert pool.slots == 2 and pool.shape == (6, 4, 5) and s1 != s0
    assert torch.equal(pool.image[s0, :4, :4, :4], torch.from_numpy(a))
    assert float(pool.logits[s0, 1, 2, 3]) == 7.0
    assert torch.equal(pool.image[s1, :6, :3, :5], torch.from_numpy(b))
    assert bool(torch.isnan(pool.logits[s1, :6, :3, :5]).all())
    pool.release(s0)
    assert pool.acquire(a) == s0


@pytest.mark.parametrize("k", [16, 5])
def test_device_object_parity_with_reference(k, fib25_image, reference, bundled):  # noqa: F811
    """Reference objects flooded on the device path: same voxels, same steps."""
    ref, origins = reference
    net, info = bundled
    state = CanvasState(segmentation=(ref * ((ref > 0) & (ref < k))).astype(np.int32), max_id=k - 1)
    cfg = InferenceConfig()
    pred = DevicePredictor(net, info.fov_zyx, info.deltas_zyx, cfg, device="cpu", max_batch=1)
    cv = pred.new_canvas(fib25_image, np.zeros((0, 3)), cfg, info.deltas_zyx, state=state)
    assert isinstance(cv, DeviceCanvas)
    steps = cv.flood_one(tuple(origins[k]["seed_zyx"]), pred)
    assert steps == origins[k]["steps"]
    assert np.array_equal(cv.segmentation == k, ref == k)


def test_device_errors():
    cfg = InferenceConfig()
    with pytest.raises(ValueError, match="deltas"):
        DevicePredictor(FixedNet(), (5, 5, 5), (3, 1, 1), cfg, device="cpu")
    pred = DevicePredictor(FixedNet(), (5, 5, 5), (1, 1, 1), cfg, device="cpu")
    with pytest.raises(ValueError, match="deltas"):
        pred.new_canvas(np.zeros((8, 8, 8), np.float32), np.zeros((0, 3)), cfg, (2, 2, 2))
    with pytest.raises(ValueError, match="smaller than the FOV"):
        pred.new_canvas(np.zeros((4, 8, 8), np.float32), np.zeros((0, 3)), cfg, (1, 1, 1))
    with pytest.raises(ValueError, match="slots"):
        SlotPool(torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="resident"):
        InferenceConfig(resident="yes").validate()


def test_compiled_forward_pads_batches_to_powers_of_two(blocks):  # noqa: F811
    """compile != "off": batches go to the compiled network padded to 1, 2, 4, ... (at most
    max_batch) and the results are those of the eager network. The compiled callable is
    replaced by a recorder around the eager network (compiling every size would take
    minutes on this CPU; test_torch_compile_matches_eager compiles one)."""
    net = bright_flood_net()
    cfg = InferenceConfig(min_segment_size=50, resident="on", compile="default")
    pred = make_predictor(net, FOV, DELTAS, cfg, device="cpu", max_batch=6, inflight=6)
    sizes = []

    def recorder(img, seed):
        sizes.append(img.shape[0])
        assert img.is_contiguous(memory_format=torch.channels_last_3d)
        return pred.net(img, seed)

    pred._compiled = recorder
    jobs = [Job(i, (lambda b=b: pred.new_canvas(b[0], b[1], cfg, DELTAS))) for i, b in enumerate(blocks)]
    got = run_jobs(jobs, pred, inflight=6)
    assert set(sizes) <= {1, 2, 4, 6} and 4 in sizes  # 3 -> 4, 5 -> 6 (max_batch)
    host, _ = run_blocks(blocks, lambda c, k: Predictor(net, FOV, device="cpu"), 1)
    for i, cv in got.items():
        assert np.array_equal(cv.final_segmentation(), host[i][0])


def test_torch_compile_matches_eager():
    net = bright_flood_net()
    pred = Predictor(net, FOV, device="cpu", max_batch=2, compile="default")
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.standard_normal((2, 1) + FOV).astype(np.float32))
    seed = torch.from_numpy(rng.standard_normal((2, 1) + FOV).astype(np.float32))
    img = img.contiguous(memory_format=torch.channels_last_3d)
    seed = seed.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        got = pred.forward(img, seed)
        want = pred.net(img, seed)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compile"):
        Predictor(net, FOV, device="cpu", compile="fast")
    with pytest.raises(ValueError, match="compile"):
        InferenceConfig(compile="fast").validate()
