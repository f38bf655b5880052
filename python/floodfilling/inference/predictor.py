"""Runs the network on FOVs cut from canvases.

Input assembly per FOV: the image crop and the canvas crop (NaN -> logit(pad_value)),
both ``fov_zyx``; output: float32 logits of the same shape (``seed + update``).
On CPU the buffers are NumPy arrays shared with torch (no copies). This host path on cuda/xpu
copies each batch of FOVs to the device and the logits back; the default there is the
device-resident path (:mod:`floodfilling.inference.device`), which keeps image and canvases
on the device.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from .. import kernels
from ..config import check_choice
from ..model import ConvStack3D, prepare_for_inference, select_device
from . import transfer

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True when the CPU advertises AVX512_BF16 or AMX-BF16 (fast bf16 matrix work)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Predictor:
    """Batched network calls on FOVs; ``max_batch`` FOVs at most per call."""

    def __init__(self, net: ConvStack3D, fov_zyx, *, device="cpu", precision: str = "fp32",
                 max_batch: int = 1, threads: int = 0, compile: str = "off"):
        self.device = select_device(device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        check_choice("precision", precision, "precision")
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            raise ValueError("precision bf16 on this CPU: it lacks AVX512_BF16/AMX, where bf16 runs "
                             "many times slower than fp32; use fp32")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.precision = precision
        if self.device.type == "cuda" and precision == "fp32":
            # Exact mode: no TF32 tensor-core convolutions (torch allows them in cuDNN by
            # default; they round inputs to 10-bit mantissas and change the segmentation).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.net = prepare_for_inference(net, self.device)
        check_choice("compile", compile, "compile")
        self._compiled = None
        if compile != "off":
            self._compiled = torch.compile(self.net, mode=None if compile == "default" else compile,
                                           dynamic=False)
        self.fov = tuple(int(v) for v in fov_zyx)
        self.max_batch = int(max_batch)
        shape = (self.max_batch, 1) + self.fov
        self._img = np.zeros(shape, dtype=np.float32)
        self._seed = np.zeros(shape, dtype=np.float32)
        self._img_t = torch.from_numpy(self._img)
        self._seed_t = torch.from_numpy(self._seed)
        self.calls = 0
        self.fovs = 0

    def new_canvas(self, image, seeds, config, deltas_zyx, state=None):
        """A canvas this predictor can drive (host arrays here)."""
        from .canvas import Canvas

        return Canvas(image, seeds, config, self.fov, deltas_zyx, state)

    def forward(self, img: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """The network on a batch (compiled: padded to a power of two, at most max_batch)."""
        if self._compiled is None:
            return self.net(img, seed)
        n = img.shape[0]
        m = min(1 << (n - 1).bit_length(), max(self.max_batch, n))
        if m > n:  # padding rows: any valid input, their outputs are dropped
            img = torch.cat([img, img[:1].expand((m - n,) + tuple(img.shape[1:]))])
            seed = torch.cat([seed, seed[:1].expand((m - n,) + tuple(seed.shape[1:]))])
            img = img.contiguous(memory_format=torch.channels_last_3d)
            seed = seed.contiguous(memory_format=torch.channels_last_3d)
        return self._compiled(img, seed)[:n]

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, n: int) -> np.ndarray:
        """Runs the network on the first ``n`` FOVs of the input buffers; (n, *fov) float32.
        Returns after the logits' copy has arrived (its event), so the buffers may be refilled."""
        img, seed = self._img_t[:n], self._seed_t[:n]
        if self.device.type != "cpu":
            img = img.to(self.device, non_blocking=True)
            seed = seed.to(self.device, non_blocking=True)
        img = img.contiguous(memory_format=torch.channels_last_3d)
        seed = seed.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), self._autocast():
            out = self.forward(img, seed)
        self.calls += 1
        self.fovs += n
        return transfer.to_host_async(out[:, 0].float()).wait()  # waits for the copy's event

    def predict(self, canvases, centers, pad_logit: float) -> np.ndarray:
        """Logits for FOV ``centers[k]`` of ``canvases[k]`` (each has .image and .logits)."""
        n = len(centers)
        out = []
        for a in range(0, n, self.max_batch):
            b = min(n, a + self.max_batch)
            for k in range(a, b):
                cv, c = canvases[k], centers[k]
                sl = cv.fov_slices(c)
                np.copyto(self._img[k - a, 0], cv.image[sl])
            kernels.gather_fovs([cv.logits for cv in canvases[a:b]], np.asarray(centers[a:b], dtype=np.int64),
                                self.fov, pad_logit, self._seed[: b - a, 0])
            out.append(self.run(b - a))
        return out[0] if len(out) == 1 else np.concatenate(out)

    # The engine's interface (floodfilling.inference.engine): on the host path a launched
    # step is already done, and there is one group of canvases.
    def launch(self, canvases, centers, pad_logit: float):
        return self.predict(canvases, centers, pad_logit)

    def collect(self, handle):
        return handle

    def pipeline_groups(self, inflight: int) -> int:
        return 1

    def __call__(self, canvas, center):
        """Single-FOV convenience: logits (fov) for ``center`` of ``canvas``."""
        return self.predict([canvas], [center], canvas.t_pad)[0]
