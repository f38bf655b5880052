"""Device-resident flood filling: image and canvas logits live on a torch device.

For cuda and xpu (and, for tests, any torch device including cpu). The flood-fill loop is
the host :class:`~floodfilling.inference.canvas.Canvas` loop, unchanged: only its storage
hooks differ. Per batched step, for the ``n`` canvases in flight, everything runs on the
device in a fixed number of kernels regardless of ``n``:

1. one flat index per FOV voxel (slot, z, y, x) -> gather image and canvas FOVs;
2. the network on the batch (NaN canvas -> logit(pad_value) as seed input);
3. the disco rule and the write back (scatter through the same index);
4. the 6 face maxima and argmaxes, and the current logits at the canvas's *query*
   positions (queued move candidates and the seed that lie inside the FOV just written);
5. ONE device -> host copy of ``n x (6 + 6 + Q)`` numbers (scores, face argmaxes, query
   values), asynchronous into pinned memory; the step's inputs (slot, FOV origin, query
   indices per canvas) go up as one small pinned array, also without a stream sync.

On cuda/xpu the engine alternates two groups of canvases (:meth:`DevicePredictor.launch` /
:meth:`DevicePredictor.collect`): while the device runs one group's step, the host runs the
flood loop on the other group's results, so the host's per-step Python (~80 us per canvas
step measured on this project's CPU) hides behind the network. An object commit copies its
box on a side stream, so it does not wait for the other group's step.

The host never reads canvas logits per step: it keeps the value of every queued candidate
(its face-maximum score when queued, refreshed from the query results whenever a later
FOV overwrites it), which is all the loop needs (``value(cand) < move_threshold`` when a
candidate is popped, ``value(seed)`` for the weak-seed test). At each object commit the
object's box of logits is copied to the host once; the segmentation stays on the host.

Storage: a :class:`SlotPool` holds ``slots`` canvases as one ``(slots, Z, Y, X)`` tensor
for the logits and one for the image, ``Z, Y, X`` the largest canvas shape seen (it grows
when a larger canvas arrives); a canvas occupies ``[slot, :z, :y, :x]`` and gives its slot
back when it finishes, so memory is ``2 x 4 bytes x slots x block voxels``.

Synchronisation (every device -> host read goes through :mod:`.transfer`, whose
``Pending.wait`` is the only way to read a copy; the device runs its streams asynchronously
of the host):

- step results: :meth:`DevicePredictor._launch_one` enqueues the step on the current (main)
  stream, then :func:`~.transfer.to_host_async` copies its ``n x (12 + Q)`` results and records
  event E_step after the copy. :meth:`DevicePredictor._collect_one` calls ``wait`` (blocks on
  E_step) before the host reads any number of the step. Each canvas of the batch remembers
  that Pending as its last step (``DeviceCanvas._last_step``).
- object commits: :meth:`DeviceCanvas._commit_logits` copies the object's box on the pool's
  side stream. That stream first waits for E_step of the canvas's last step
  (``wait_event``), which follows every main-stream write of this canvas (the object's
  start, every FOV write), and not for anything queued later on the main stream (the other
  group's step); an event recorded after the copy on the side stream guards the read
  (``wait``). The host waits before it returns, so the next object's writes of this canvas
  (queued on the main stream after the commit) cannot overtake the copy.
- :meth:`DeviceCanvas.device_logits` (tests) and the host path's
  :meth:`~floodfilling.inference.predictor.Predictor.run` copy on the current stream and
  wait at once.
- host -> device uploads (the image at :meth:`SlotPool.acquire`, the step's small index
  array from pinned memory) are ordered by the stream that uses them; they are not reads.

On the cpu device every torch operation is done when it returns, so there are no events
and the "copies" are the tensors themselves; tests/test_transfer.py replaces the transfer
with a fake asynchronous one (the buffer holds garbage until ``wait``) to check that every
read waits.

Exactness: the disco decision counts voxels >= move_threshold and compares the count with
the smallest count that makes ``count / n > disco_seed_threshold`` in double precision (as
the native kernel); face maxima take the first maximum in C order of each face (as
``torch.max`` returns). In fp32 the results equal the host path's whenever the network
returns the same logits for a FOV (tests: torch cpu device vs the native host path).
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from .. import kernels
from ..config import InferenceConfig
from . import transfer
from .canvas import Canvas, CanvasState, logit32
from .predictor import Predictor

log = logging.getLogger(__name__)


def disco_count_needed(n: int, t: float) -> int:
    """Smallest count c in [0, n] with c / n > t (double precision); n + 1 when none."""
    if not (t < 1.0):
        return n + 1
    c = int(t * n)
    while c > 0 and (c - 1) / n > t:
        c -= 1
    while c <= n and not (c / n > t):
        c += 1
    return c


def _filled(device: torch.device, shape, value: float, usm: bool) -> torch.Tensor:
    """A float32 tensor of ``value`` on ``device``; ``usm``: on the cpu device, in memory that
    the SYCL launcher's device reads and writes in place (:func:`floodfilling.kernels.empty`)."""
    if usm:
        return torch.from_numpy(kernels.empty(tuple(shape), np.float32)).fill_(value)
    return torch.full(tuple(shape), value, dtype=torch.float32, device=device)


class SlotPool:
    """``slots`` canvases (image + logits) stacked in two device tensors; grows on demand.
    ``usm``: the tensors live in USM shared memory (the SYCL FOV steps on the cpu device)."""

    def __init__(self, device: torch.device, slots: int, shape=(0, 0, 0), usm: bool = False):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = device
        self.usm = usm
        self.slots = int(slots)
        self.shape = tuple(int(v) for v in shape)
        self.image = _filled(device, (self.slots,) + self.shape, 0.0, usm)
        self.logits = _filled(device, (self.slots,) + self.shape, float("nan"), usm)
        self.free = list(range(self.slots))[::-1]
        self._side = None  # the side stream of object commits (side_stream())

    def _grow(self, shape, slots) -> None:
        new_shape = tuple(max(a, int(b)) for a, b in zip(self.shape, shape))
        img = _filled(self.device, (slots,) + new_shape, 0.0, self.usm)
        lg = _filled(self.device, (slots,) + new_shape, float("nan"), self.usm)
        z, y, x = self.shape
        img[: self.slots, :z, :y, :x] = self.image
        lg[: self.slots, :z, :y, :x] = self.logits
        self.free = list(range(slots - 1, self.slots - 1, -1)) + self.free
        self.image, self.logits, self.shape, self.slots = img, lg, new_shape, slots
        log.debug("slot pool grown to %d x %s", slots, new_shape)

    def acquire(self, image: np.ndarray) -> int:
        """Copies ``image`` into a free slot (growing the pool if needed); returns the slot."""
        if any(s > p for s, p in zip(image.shape, self.shape)):
            self._grow(image.shape, self.slots)
        if not self.free:
            self._grow(self.shape, self.slots * 2)
        slot = self.free.pop()
        z, y, x = image.shape
        self.image[slot, :z, :y, :x] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        self.logits[slot, :z, :y, :x] = float("nan")
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def side_stream(self):
        """The pool's second stream of the device for object commits (cuda/xpu; made on
        first use), None on cpu."""
        if self._side is None:
            self._side = transfer.new_stream(self.device)
        return self._side

    def nbytes(self) -> int:
        return 2 * 4 * self.slots * int(np.prod(self.shape))


class DeviceCanvas(Canvas):
    """A :class:`Canvas` whose image and logits live in a :class:`SlotPool` slot."""

    def __init__(self, pool: SlotPool, image: np.ndarray, seeds: np.ndarray, config: InferenceConfig,
                 fov_zyx=(33, 33, 33), deltas_zyx=(8, 8, 8), state: CanvasState | None = None):
        self.pool = pool
        self.slot = None
        super().__init__(image, seeds, config, fov_zyx, deltas_zyx, state)
        self.slot = pool.acquire(self.image)
        self.image = None  # the device copy is the only one needed
        # Queued candidates (and the seed) with their current logits: row i of _qpos/_qval.
        self._rows: dict[tuple, int] = {}
        self._qpos = np.zeros((64, 3), np.int64)
        self._qval = np.zeros(64, np.float64)
        self._pending = None  # rows queried by the step in flight
        self._last_step = None  # transfer.Pending of this canvas's last launched step (its event)
        self._strides = np.array([self.fov[1] * self.fov[2], self.fov[2], 1], np.int64)

    def _alloc_logits(self):
        return None  # in the pool

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        z, y, x = self.shape
        return t[self.slot, :z, :y, :x]

    def _start_object(self, pos) -> None:
        lg = self._view(self.pool.logits)
        if self._dirty is not None:
            lg[self._dirty] = float("nan")
        lg[pos] = self.t_init
        self._rows.clear()
        self._track(pos, self.t_init)

    def _value_getter(self):
        rows = self._rows
        return lambda p: self._qval[rows[p]]  # _qval may be reallocated as it grows

    def _track(self, pos, value) -> None:
        i = self._rows.get(pos)
        if i is None:
            i = len(self._rows)
            if i == len(self._qval):
                self._qpos = np.concatenate([self._qpos, np.zeros_like(self._qpos)])
                self._qval = np.concatenate([self._qval, np.zeros_like(self._qval)])
            self._rows[pos] = i
            self._qpos[i] = pos
        self._qval[i] = value

    def queries(self, c) -> np.ndarray:
        """Flat FOV indices of the tracked positions inside the FOV at ``c`` (remembered for
        :meth:`_apply`)."""
        n = len(self._rows)
        rel = self._qpos[:n] - np.asarray(c, np.int64) + np.asarray(self.margin, np.int64)
        inside = np.all((rel >= 0) & (rel < self.fov), axis=1)
        self._pending = np.flatnonzero(inside)
        return rel[self._pending] @ self._strides

    def _apply(self, c, out):
        scores, offsets, qvals = out
        self._qval[self._pending] = qvals
        self._pending = None
        return scores, offsets

    def _commit_logits(self, box):
        # On a side stream: the device may still be running the other group's step on the
        # main stream, which a copy there would wait for. The side stream waits for the
        # event of this canvas's last step (after every write of this canvas), and the host
        # waits for the copy before the next object of this canvas writes anything.
        # (no step yet: the copy queues on the main stream, behind this canvas's writes)
        side = self.pool.side_stream() if self._last_step is not None else None
        pending = transfer.to_host_async(self._view(self.pool.logits)[box], stream=side, after=self._last_step)
        return np.ascontiguousarray(pending.wait()), (0, 0, 0)

    def release(self) -> None:
        if self.slot is not None:
            self.pool.release(self.slot)
            self.slot = None

    def device_logits(self) -> np.ndarray:
        """Host copy of the canvas logits (for tests)."""
        return transfer.to_host_async(self._view(self.pool.logits)).wait()


def _sycl_steps(device: torch.device, fov):
    """The SYCL FOV steps of the device-resident flood under ``kernels="sycl"``: on xpu on
    torch's own queue (the current stream's ``sycl_queue``), on cpu on the SYCL backend's
    device with the pool in USM shared memory; None otherwise (another launcher, or cuda,
    which keeps its torch ops)."""
    if kernels.launcher_name() != "sycl" or device.type not in ("xpu", "cpu"):
        return None
    sb = importlib.import_module("floodfilling.sycl_backend")  # only under kernels="sycl"
    if device.type == "xpu":
        b = sb.backend_for_queue(int(torch.xpu.current_stream(device).sycl_queue))
    else:
        b = sb.backend()
    log.info("device-resident flood on %s: FOV gather and update as SYCL kernels on %s", device,
             b.device["name"])
    return sb.FovSteps(b, fov)


class DevicePredictor(Predictor):
    """Runs whole flood steps on the device for :class:`DeviceCanvas` objects.

    ``predict(canvases, centers, pad)`` returns, per canvas, ``(scores, offsets, qvals)``
    as lists (what :meth:`DeviceCanvas._apply` expects), after writing each FOV.
    """

    def __init__(self, net, fov_zyx, deltas_zyx, config: InferenceConfig, *, device="cuda",
                 precision: str = "fp32", max_batch: int = 8, slots: int | None = None, threads: int = 0,
                 compile: str = "off"):
        super().__init__(net, fov_zyx, device=device, precision=precision, max_batch=max_batch, threads=threads,
                         compile=compile)
        dev = self.device
        self.cfg = config
        self.deltas = tuple(int(v) for v in deltas_zyx)
        f = self.fov
        if any(not 0 <= d <= ff // 2 for d, ff in zip(self.deltas, f)):
            raise ValueError(f"deltas {self.deltas}: each must lie in [0, fov // 2] for FOV {f}")
        # the FOV gather and update as SYCL kernels on the pool's memory (kernels="sycl" on xpu,
        # or on cpu with the pool in USM shared memory), instead of the chain of torch ops
        self._steps = _sycl_steps(dev, f)
        # initial slots (default 1): the pool doubles when a canvas finds none free, so it
        # holds as many canvases as are ever in flight at once, not K when fewer jobs exist
        self.pool = SlotPool(dev, slots or 1, usm=self._steps is not None and dev.type == "cpu")
        self.t_move, self.t_pad = logit32(config.move_threshold), logit32(config.pad_value)  # as Canvas
        n = int(np.prod(f))
        t = float(config.disco_seed_threshold)
        self.disco_need = disco_count_needed(n, t) if t >= 0 else n + 1
        self._ar = [torch.arange(v, device=dev, dtype=torch.int64) for v in f]
        # Face tables: flat FOV index of each face voxel (C order of the plane), padded with
        # n (an extra -inf column), and the (dz, dy, dx) offset of each entry.
        c = [v // 2 for v in f]
        strides = (f[1] * f[2], f[2], 1)
        faces, offs = [], []
        for a in range(3):
            for sign in (-1, 1):
                if self.deltas[a] == 0:
                    faces.append([])
                    offs.append([])
                    continue
                rng = [range(-self.deltas[b], self.deltas[b] + 1) for b in range(3)]
                rng[a] = [sign * self.deltas[a]]
                o = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
                faces.append(((o + c) @ np.asarray(strides)).tolist())
                offs.append(o.tolist())
        width = max(1, max(len(x) for x in faces))
        face_idx = np.full((6, width), n, np.int64)
        face_off = np.zeros((6, width, 3), np.int64)
        for i, (fi, fo) in enumerate(zip(faces, offs)):
            face_idx[i, : len(fi)] = fi
            if fo:
                face_off[i, : len(fo)] = fo
        self._face_idx = torch.from_numpy(face_idx.reshape(-1)).to(dev)
        # alternate two groups of canvases on asynchronous devices (see pipeline_groups)
        self.pipeline = dev.type != "cpu"
        self._face_off = face_off
        self._face_w = width

    def new_canvas(self, image, seeds, config, deltas_zyx, state=None) -> DeviceCanvas:
        if tuple(int(v) for v in deltas_zyx) != self.deltas:
            raise ValueError(f"deltas {tuple(deltas_zyx)} differ from this predictor's {self.deltas}")
        return DeviceCanvas(self.pool, image, seeds, config, self.fov, self.deltas, state)

    def _upload(self, arr: np.ndarray) -> torch.Tensor:
        """A small int64 host array on the device without a stream sync (pinned source,
        non-blocking; torch's pinned-memory cache keeps the buffer until the copy is done)."""
        t = torch.from_numpy(arr)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _launch_one(self, canvases, centers):
        """Enqueues one batched step (everything on the device); returns a handle."""
        n = len(centers)
        qs = [cv.queries(c) for cv, c in zip(canvases, centers)]
        qmax = max(len(q) for q in qs)
        if self._steps is not None:
            return self._launch_sycl(canvases, centers, qs, qmax)
        # one upload: slot, box origin (z, y, x) and the query indices of each canvas
        host = np.zeros((n, 4 + qmax), np.int64)
        host[:, 0] = [cv.slot for cv in canvases]
        host[:, 1:4] = np.asarray(centers, np.int64) - np.asarray(self.fov, np.int64) // 2
        for i, q in enumerate(qs):
            host[i, 4:4 + len(q)] = q
        dev_arr = self._upload(host)
        _, Z, Y, X = self.pool.logits.shape
        s, c = dev_arr[:, 0], dev_arr[:, 1:4]
        z = (c[:, 0:1] + self._ar[0]) * (Y * X)
        y = (c[:, 1:2] + self._ar[1]) * X
        x = c[:, 2:3] + self._ar[2]
        idx = ((s * (Z * Y * X))[:, None, None, None] + z[:, :, None, None] + y[:, None, :, None]
               + x[:, None, None, :])
        lg_flat = self.pool.logits.view(-1)
        old = lg_flat[idx]
        img = self.pool.image.view(-1)[idx]
        seed = torch.nan_to_num(old, nan=self.t_pad)
        img = img[:, None].contiguous(memory_format=torch.channels_last_3d)
        seed = seed[:, None].contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), self._autocast():
            out = self.forward(img, seed)
        new = out[:, 0].float()
        self.calls += 1
        self.fovs += n
        if self.disco_need <= new[0].numel():
            # (a float32 tensor against a Python float compares in float32; t_move is one)
            active = (new >= self.t_move).flatten(1).sum(1) >= self.disco_need
            keep = active[:, None, None, None] & (old < 0) & (new > old)
            new = torch.where(keep, old, new)
        lg_flat[idx] = new
        flat = new.reshape(n, -1)
        ext = torch.cat([flat, torch.full((n, 1), float("-inf"), device=self.device)], 1)
        faces = ext[:, self._face_idx].view(n, 6, self._face_w)
        scores, arg = faces.max(dim=2)
        parts = [scores, arg.to(torch.float32)]
        if qmax:
            parts.append(flat.gather(1, dev_arr[:, 4:]))
        # the one device -> host copy of the step (asynchronous; its event guards the read)
        pending = transfer.to_host_async(torch.cat(parts, 1))
        for cv in canvases:
            cv._last_step = pending
        return pending, [len(q) for q in qs]

    def _device_buffer(self, shape, dtype=torch.float32) -> torch.Tensor:
        """Uninitialised memory the SYCL steps' device uses: a device tensor, or on cpu a
        tensor in USM shared memory."""
        if self.device.type == "cpu":
            return torch.from_numpy(kernels.empty(tuple(shape), np.dtype(str(dtype).split(".")[-1])))
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def _launch_sycl(self, canvases, centers, qs, qmax):
        """:meth:`_launch_one` with the FOV gather and update as SYCL kernels
        (:class:`floodfilling.sycl_backend.FovSteps`) on the pool's memory, ordered with
        torch's work on the device's queue (xpu) or waited for (cpu)."""
        n, f, steps = len(centers), tuple(int(v) for v in self.fov), self._steps
        sync = self.device.type == "cpu"
        _, Z, Y, X = self.pool.logits.shape
        slot_bytes = 4 * Z * Y * X
        # one upload: FOV targets of the logits and of the image canvases, then the queries
        host = np.zeros(14 * n + n * qmax, np.int64)
        t = host[: 14 * n].reshape(2, n, 7)
        slots = np.asarray([cv.slot for cv in canvases], np.int64)
        t[0, :, 0] = (np.uint64(self.pool.logits.data_ptr()) + slots.astype(np.uint64) * np.uint64(slot_bytes)).view(
            np.int64)
        t[1, :, 0] = (np.uint64(self.pool.image.data_ptr()) + slots.astype(np.uint64) * np.uint64(slot_bytes)).view(
            np.int64)
        t[:, :, 1:4] = (Z, Y, X)
        t[:, :, 4:7] = np.asarray(centers, np.int64)
        q = host[14 * n:].reshape(n, qmax)
        for i, qi in enumerate(qs):
            q[i, : len(qi)] = qi
        if sync:  # (cpu: a USM copy of the host array the kernels read)
            buf = kernels.empty(host.shape, np.int64)
            buf[...] = host
            dev_arr = torch.from_numpy(buf)
        else:
            dev_arr = self._upload(host)
        targets_lg, targets_img = dev_arr.data_ptr(), dev_arr.data_ptr() + 8 * 7 * n
        img = self._device_buffer((n, 1) + f)
        seed = self._device_buffer((n, 1) + f)
        steps.gather(targets_img, n, img.data_ptr(), 0.0, wait=sync)
        steps.gather(targets_lg, n, seed.data_ptr(), self.t_pad, wait=sync)
        with torch.inference_mode(), self._autocast():
            out = self.forward(img.contiguous(memory_format=torch.channels_last_3d),
                               seed.contiguous(memory_format=torch.channels_last_3d))
        new = self._device_buffer((n,) + f)
        new.copy_(out[:, 0])  # float32, C order, memory the kernels reach
        self.calls += 1
        self.fovs += n
        scores = self._device_buffer((n, 6))
        offsets = self._device_buffer((n, 6, 3), torch.int64)
        steps.update(targets_lg, n, new.data_ptr(), move_threshold=self.t_move, deltas=self.deltas,
                     disco_seed_threshold=float(self.cfg.disco_seed_threshold), scores=scores.data_ptr(),
                     offsets=offsets.data_ptr(), wait=sync)
        parts = [scores, offsets.view(n, 18).to(torch.float32)]  # offsets are small: exact in float32
        if qmax:
            parts.append(new.view(n, -1).gather(1, dev_arr[14 * n:].view(n, qmax)))
        pending = transfer.to_host_async(torch.cat(parts, 1))
        for cv in canvases:
            cv._last_step = pending
        return pending, [len(qi) for qi in qs], True

    def _collect_one(self, handle) -> list:
        """Waits for one launched batch (its copy's event); per canvas (scores, offsets, qvals)."""
        pending, nq, *sycl = handle
        res = pending.wait()
        out = []
        rows = np.arange(6)
        for i in range(len(nq)):
            if sycl:  # offsets as (dz, dy, dx), then the queries
                offs = res[i, 6:24].astype(np.int64).reshape(6, 3).tolist()
                out.append((res[i, :6].tolist(), offs, res[i, 24:24 + nq[i]].tolist()))
                continue
            offs = self._face_off[rows, res[i, 6:12].astype(np.int64)].tolist()
            out.append((res[i, :6].tolist(), offs, res[i, 12:12 + nq[i]].tolist()))
        return out

    def pipeline_groups(self, inflight: int) -> int:
        """How many groups of canvases the engine alternates (2: the host works on one
        group's results while the device runs the other's step)."""
        return 2 if self.pipeline and inflight >= 2 else 1

    def launch(self, canvases, centers, pad_logit: float = None):
        """Enqueues the steps of these canvases (``max_batch`` FOVs per network call)."""
        return [self._launch_one(canvases[a:a + self.max_batch], centers[a:a + self.max_batch])
                for a in range(0, len(centers), self.max_batch)]

    def collect(self, handles) -> list:
        """Waits for launched steps; per canvas ``(scores, offsets, qvals)``."""
        out = []
        for h in handles:
            out.extend(self._collect_one(h))
        return out

    def predict(self, canvases, centers, pad_logit: float = None) -> list:
        return self.collect(self.launch(canvases, centers))

    def __call__(self, canvas, center):
        return self.predict([canvas], [center])[0]
