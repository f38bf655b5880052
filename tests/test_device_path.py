"""The device-resident path (image and canvases as torch tensors, one small device->host copy
per step) against the host path (NumPy canvases, native kernels).

Tests marked ``device`` run on the device lane's device (``test_device``: $FFN_TEST_DEVICE,
default cpu): the same torch code runs on cuda and xpu, where only the device differs. Every
comparison is exact (fp32); where a GPU may differ for a reason other than a bug, the test says
so.
"""

import numpy as np
import pytest
import torch

from floodfilling import kernels
from floodfilling.kernels_reference import gather_fovs_reference
from floodfilling.config import InferenceConfig
from floodfilling.evaluation import variation_of_information
from floodfilling.inference.canvas import Canvas, CanvasState
from floodfilling.inference.device import DeviceCanvas, DevicePredictor, SlotPool, disco_count_needed
from floodfilling.inference.engine import Job, make_predictor, run_jobs
from floodfilling.inference.predictor import Predictor

from device_lane import bf16_unsupported, report
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


@pytest.mark.device
@pytest.mark.parametrize("deltas", [(2, 2, 2), (1, 3, 2), (0, 2, 1)])
def test_step_equals_native_update(deltas, test_device):
    """Disco write, face maxima/argmaxes (ties: the first in C order; NaN: taken, at its first
    position) and candidate values equal kernels.update_fovs. No arithmetic but comparisons,
    so exact on every device."""
    rng = np.random.default_rng(1)
    fov = (5, 7, 9)
    cfg = InferenceConfig(min_segment_size=1)
    net = FixedNet()
    pred = DevicePredictor(net, fov, deltas, cfg, device=test_device, max_batch=4, slots=4)
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
        pred.pool.logits[d.slot, :shp[0], :shp[1], :shp[2]] = torch.from_numpy(lg).to(test_device)
        host.append(h)
        dev.append(d)
    nan_faces = 0
    for trial in range(6):
        centers = [tuple(int(rng.integers(f // 2, s - f // 2)) for f, s in zip(fov, cv.shape)) for cv in host]
        # rounded values: many equal face maxima (first in C order must win); some FOVs
        # mostly above the move threshold (disco rule on), some not
        out = np.round(rng.standard_normal((4, 1) + fov) * 2).astype(np.float32)
        out[trial % 4] += 4.0
        if trial == 5:  # NaN predictions: on faces (face maximum NaN), and a whole FOV
            out[1, 0][rng.random(fov) < 0.05] = np.nan
            out[2] = np.nan
        net.out = torch.from_numpy(out).to(test_device)
        for d, c in zip(dev, centers):  # track a few positions inside and outside the FOV
            d._rows.clear()
            for p in [c, tuple(v + 1 for v in c), (0, 0, 0)]:
                if all(0 <= v < s for v, s in zip(p, d.shape)):
                    d._track(p, 0.0)
        want_seed = gather_fovs_reference([h.logits for h in host], np.asarray(centers), fov, pred.t_pad)
        recs = pred.predict(dev, centers)
        assert np.array_equal(net.seen[-1].cpu().numpy(), want_seed)  # NaN -> logit(pad) network input
        want_scores, want_offsets = kernels.update_fovs(
            [h.logits for h in host], out[:, 0].copy(), np.asarray(centers), move_threshold=pred.t_move,
            deltas=deltas, disco_seed_threshold=cfg.disco_seed_threshold)
        for i, (h, d, rec) in enumerate(zip(host, dev, recs)):
            got = d.device_logits()
            assert np.array_equal(got, h.logits, equal_nan=True), (trial, i)
            scores, offsets, qvals = rec
            live = [a for a in range(6) if deltas[a // 2] > 0]
            assert np.array_equal([scores[a] for a in live], want_scores[i, live], equal_nan=True)
            assert [offsets[a] for a in live] == want_offsets[i, live].tolist()
            assert all(scores[a] == -np.inf for a in range(6) if a not in live)
            nan_faces += int(np.isnan(want_scores[i, live]).sum())
            d._apply(centers[i], rec)
            for p, row in d._rows.items():
                if all(abs(a - b) <= f // 2 for a, b, f in zip(p, centers[i], fov)):
                    assert np.array_equal(d._qval[row], h.logits[p], equal_nan=True)
    assert nan_faces >= 2  # the NaN cases really ran


def run_blocks(blocks, predictor_factory, k):  # noqa: F811
    cfg = InferenceConfig(min_segment_size=50)
    pred = predictor_factory(cfg, k)
    jobs = [Job(i, (lambda b=b: pred.new_canvas(b[0], b[1], cfg, DELTAS))) for i, b in enumerate(blocks)]
    res = run_jobs(jobs, pred, inflight=k)
    out = {i: (cv.final_segmentation(), {o: (v.seed_zyx, v.steps) for o, v in cv.state.origins.items()},
               cv.state.counters) for i, cv in res.items()}
    return out, pred


@pytest.mark.device
def test_device_path_equals_host_path_k1_k8_and_pipelined(blocks, test_device):  # noqa: F811
    """8 blocks on the device path at K = 1, 8 (one group, batches of 8), 8 and 5 (two
    alternating groups) == the host path at K = 1 (network on the same device, batch 1).
    K = 1 is exact on any device (the same network calls on the same inputs). With K > 1 the
    network runs on batches: exact on the CPU; on a GPU it also needs per-FOV logits that do
    not depend on the batch size (cuDNN may pick another algorithm for another batch size;
    deterministic mode is on): a difference only at K > 1 on a GPU points there, not at the
    flood."""
    net = bright_flood_net()
    host, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device=test_device), 1)
    assert sum(r[2]["steps"] for r in host.values()) > 50
    def factory(k, pipeline):
        def make(cfg, k):
            pred = make_predictor(net, FOV, DELTAS, InferenceConfig(min_segment_size=50, resident="on"),
                                  device=test_device, max_batch=k, inflight=k)
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


@pytest.mark.device
def test_bf16_device_path_equals_bf16_host_path(blocks, test_device):  # noqa: F811
    """--precision bf16 on the device path (autocast around the batched call) gives the host
    path's bf16 result at batch 1: the same forward, so the same voxels and steps."""
    reason = bf16_unsupported(test_device)
    if reason:
        pytest.skip(reason)
    net = bright_flood_net()
    host, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device=test_device, precision="bf16"), 1)
    dev, pred = run_blocks(blocks, lambda cfg, k: make_predictor(
        net, FOV, DELTAS, InferenceConfig(min_segment_size=50, resident="on", precision="bf16"), device=test_device,
        max_batch=1, inflight=1), 1)
    assert isinstance(pred, DevicePredictor) and pred.precision == "bf16"
    for i in host:
        assert np.array_equal(host[i][0], dev[i][0]), i
        assert host[i][1] == dev[i][1] and host[i][2] == dev[i][2]
    if test_device.type == "cpu":  # bf16 really ran (elsewhere: test_bf16_parity_report)
        fp32, _ = run_blocks(blocks, lambda cfg, k: Predictor(net, FOV, device=test_device), 1)
        assert any(not np.array_equal(fp32[i][0], host[i][0]) for i in host)


def conv_dtypes(net: torch.nn.Module) -> set:
    """A set that collects the output dtype of every Conv3d call of ``net`` (bfloat16 under
    bf16 autocast; the network's own output is float32 either way: seed + update)."""
    seen = set()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    return seen


def _bf16_figures(runs: dict) -> dict:
    """fp32 vs bf16 segmentations (lists of arrays, same order): objects identical?, VI."""
    a, b = (np.stack([s.astype(np.int64) + i * (1 << 32) for i, s in enumerate(runs[p])]) for p in ("fp32", "bf16"))
    vi = variation_of_information(b, a, gt_zero="label")
    return {"identical": bool(np.array_equal(a, b)), "vi": vi["vi"], "vi_split": vi["vi_split"],
            "vi_merge": vi["vi_merge"], "objects_fp32": [int(s.max()) for s in runs["fp32"]],
            "objects_bf16": [int(s.max()) for s in runs["bf16"]],
            "voxels_differing": int((a != b).sum()), "voxels": int(a.size)}


@pytest.mark.device
def test_bf16_parity_report(blocks, test_device, request, fib25):  # noqa: F811
    """Reports bf16 against fp32 on the device path (objects identical?, variation of
    information fp32 -> bf16) without failing on a difference (bf16 is not the exact mode):
    the figures go to record_property, stdout and $FFN_TEST_REPORT (JSON). It asserts that
    bf16 ran (its convolutions gave bfloat16) and gave segmentations of the right shape.
    On cpu: the 8 blocks with the small network (the bundled model would take minutes); on a
    GPU also the bundled FIB-25 model on a 48 x 80 x 80 crop of the cube."""
    reason = bf16_unsupported(test_device)
    if reason:
        pytest.skip(reason)
    figures = {"device": str(test_device)}
    runs = {}
    for prec in ("fp32", "bf16"):
        net = bright_flood_net()
        dtypes = conv_dtypes(net)
        res, pred = run_blocks(blocks, lambda cfg, k: make_predictor(
            net, FOV, DELTAS, InferenceConfig(min_segment_size=50, resident="on", precision=prec), device=test_device,
            max_batch=8, inflight=8), 8)
        assert pred.precision == prec
        assert dtypes == {torch.bfloat16 if prec == "bf16" else torch.float32}
        assert all(res[i][0].shape == blocks[i][0].shape and res[i][0].dtype == np.uint32 for i in res)
        runs[prec] = [res[i][0] for i in sorted(res)]
    figures["blocks_small_net"] = _bf16_figures(runs)
    if test_device.type != "cpu":
        from floodfilling.inference.segment import segment_array
        from floodfilling.model import load_model

        raw = fib25[0][100:148, 90:170, 90:170]
        runs = {}
        for prec in ("fp32", "bf16"):
            net, info = load_model(None, "cpu")
            dtypes = conv_dtypes(net)
            cfg = InferenceConfig(device=str(test_device), resident="on", precision=prec)
            r = segment_array(raw, config=cfg, net_and_info=(net, info))
            assert dtypes == {torch.bfloat16 if prec == "bf16" else torch.float32}
            assert r.segmentation.shape == raw.shape
            runs[prec] = [r.segmentation]
        figures["fib25_crop_bundled_model"] = _bf16_figures(runs)
    report(request, "bf16_parity", figures)


@pytest.mark.device
def test_pool_grows_and_keeps_contents(test_device):
    pool = SlotPool(test_device, 1, (4, 4, 4))
    a = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    s0 = pool.acquire(a)
    pool.logits[s0, 1, 2, 3] = 7.0
    b = np.ones((6, 3, 5), np.float32)
    s1 = pool.acquire(b)  # larger and no free slot: grows both ways
    assert pool.slots == 2 and pool.shape == (6, 4, 5) and s1 != s0
    assert torch.equal(pool.image[s0, :4, :4, :4].cpu(), torch.from_numpy(a))
    assert float(pool.logits[s0, 1, 2, 3]) == 7.0
    assert torch.equal(pool.image[s1, :6, :3, :5].cpu(), torch.from_numpy(b))
    assert bool(torch.isnan(pool.logits[s1, :6, :3, :5]).all())
    pool.release(s0)
    assert pool.acquire(a) == s0


@pytest.mark.device
@pytest.mark.parametrize("k", [16, 5])
def test_device_object_parity_with_reference(k, fib25_image, reference, bundled_device, test_device):  # noqa: F811
    """Reference objects flooded on the device path: same voxels, same steps (on a GPU: see
    test_object_parity about float32 near-ties)."""
    ref, origins = reference
    net, info = bundled_device
    state = CanvasState(segmentation=(ref * ((ref > 0) & (ref < k))).astype(np.int32), max_id=k - 1)
    cfg = InferenceConfig()
    pred = DevicePredictor(net, info.fov_zyx, info.deltas_zyx, cfg, device=test_device, max_batch=1)
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
