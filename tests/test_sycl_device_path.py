"""The device-resident flood under ``kernels="sycl"``: the FOV gather and update run as SYCL
kernels in place on the pool's memory (torch tensors on xpu, on torch's own queue; on the cpu
device, tensors in USM shared memory on the CPU's SYCL device) instead of the chain of torch
ops, with the same results as the torch ops and the host path.

The device lane runs them on its device (``test_device``: cpu here; xpu where one exists;
cuda keeps its torch ops and skips them). Skipped without the SYCL runtime outside CI, failed
under ``CI``.
"""

from __future__ import annotations


import numpy as np
import pytest

from floodfilling import kernels
from floodfilling.inference.device import DevicePredictor
import test_device_path as torch_ops  # the torch-op step's checks, rerun under kernels="sycl"
from test_engine import blocks  # noqa: F401
from test_inference_parity import reference  # noqa: F401


@pytest.fixture
def sycl_steps(monkeypatch, test_device):
    """Runs the test under kernels="sycl" and counts the SYCL FOV steps it launched."""
    from kernel_helpers import sycl_backend_or_skip

    if test_device.type not in ("cpu", "xpu"):
        pytest.skip(f"the SYCL FOV steps run on cpu and xpu devices, not {test_device.type}")
    sb = sycl_backend_or_skip()
    if test_device.type == "cpu":
        sb.select_device("cpu")
    calls = {"gather": 0, "update": 0, "torch_steps": 0}
    for name in ("gather", "update"):
        orig = getattr(sb.FovSteps, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(sb.FovSteps, name, spy)
    torch_launch = DevicePredictor._launch_one

    def launch(self, canvases, centers):
        if self._steps is None:
            calls["torch_steps"] += 1
        return torch_launch(self, canvases, centers)

    monkeypatch.setattr(DevicePredictor, "_launch_one", launch)
    with kernels.launcher("sycl"):
        yield calls
    sb.select_device(None)
    assert calls["update"] > 0 and calls["gather"] == 2 * calls["update"]
    assert calls["torch_steps"] == 0  # every step of the test went through SYCL


@pytest.mark.device
@pytest.mark.parametrize("deltas", [(2, 2, 2), (1, 3, 2), (0, 2, 1)])
def test_sycl_step_equals_native_update(deltas, test_device, sycl_steps):
    """Disco write, faces (ties, NaN), candidate values and the network's seed input, as the
    torch-op step is checked (test_device_path.py)."""
    torch_ops.test_step_equals_native_update(deltas, test_device)


@pytest.mark.device
def test_sycl_device_path_equals_host_path(blocks, test_device, sycl_steps):  # noqa: F811
    """K = 1, 8, 8 and 5 in two alternating groups == the host path."""
    torch_ops.test_device_path_equals_host_path_k1_k8_and_pipelined(blocks, test_device)


@pytest.mark.device
@pytest.mark.parametrize("k", [16])
def test_sycl_device_object_parity_with_reference(k, fib25_image, reference, bundled_device, test_device,  # noqa: F811
                                                  sycl_steps):
    torch_ops.test_device_object_parity_with_reference(k, fib25_image, reference, bundled_device, test_device)


def test_pool_in_usm_shared_memory_on_cpu():
    """(cpu) the pool the SYCL steps write lives in USM shared memory of the backend's device."""
    from kernel_helpers import sycl_backend_or_skip

    sb = sycl_backend_or_skip()
    import torch

    from floodfilling.config import InferenceConfig

    sb.select_device("cpu")
    try:
        with kernels.launcher("sycl"):
            pred = DevicePredictor(torch.nn.Identity(), (5, 5, 5), (1, 1, 1), InferenceConfig(),
                                   device="cpu", slots=2)
            cv = pred.new_canvas(np.zeros((7, 7, 7), np.float32), np.zeros((0, 3)), InferenceConfig(), (1, 1, 1))
            b = sb.backend()
            assert pred._steps is not None
            assert b.is_usm_shared(pred.pool.logits.data_ptr()) and b.is_usm_shared(pred.pool.image.data_ptr())
            assert np.isnan(pred.pool.logits[cv.slot].numpy()).all()
        pred = DevicePredictor(torch.nn.Identity(), (5, 5, 5), (1, 1, 1), InferenceConfig(), device="cpu")
        assert pred._steps is None  # the OpenMP launcher: torch ops
    finally:
        sb.select_device(None)
