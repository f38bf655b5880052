"""One subvolume: the flood-fill loop with the reference's exact semantics.

Geometry (all z, y, x)::

      volume  0 ............................................ shape
              |<- margin ->|  seeds / FOV centres allowed  |<- margin ->|
                            c - f//2 ........ c ........ c + f//2   (one FOV, f = 33)
                                   c-d ... c ... c+d                 (face-max box, d = 8)

A FOV centred at ``c`` covers ``c - f//2 .. c + f//2`` inclusive; a centre is valid only if
that box lies inside the volume (``c - margin >= 0`` and ``c + margin < shape``).

The canvas holds float32 logits (NaN = never predicted) and an int32 segmentation
(0 free, > 0 object ids, -1 a rejected seed that later objects may still claim).
:meth:`Canvas.steps` is a generator: it yields the FOV centre of the next network call
and receives the network's output logits for it, so one driver loop can run one canvas
or interleave many (:mod:`floodfilling.inference.engine`). Only a few numbers per step
are handled in Python; the FOV write and the face maxima are one native call.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..config import InferenceConfig
from ..geometry import fov_margin, smaller_than_fov
from ..results import Origin


def logit32(p: float) -> float:
    """logit(p) rounded to float32, as the reference stores its thresholds."""
    return float(np.float32(np.log(p / (1.0 - p))))


@dataclass
class CanvasState:
    """Everything needed to resume between objects (the canvas logits are not needed:
    every object starts from an all-NaN canvas)."""

    segmentation: np.ndarray
    seed_index: int = 0
    max_id: int = 0
    origins: dict[int, Origin] = field(default_factory=dict)
    overlaps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    fill_passes: int = 0  # seed_fill_passes done (their seeds are appended to the seed list)


COUNTER_NAMES = (
    "steps",  # network calls (FOV inference steps)
    "seeds_seen",  # seeds taken from the seed list
    "seeds_skipped",  # seed outside the margin or already segmented
    "seeds_too_close",  # seed within min_boundary_dist of an object (marked -1)
    "objects_attempted",  # floods started
    "rejected_weak_seed",  # seed fell below move_threshold during its flood
    "rejected_too_small",  # fewer than min_segment_size new voxels
    "objects",  # objects created
    "voxels_segmented",  # voxels given to objects
    "voxels_overlapping",  # voxels above segment_threshold that already had an id
    # FOV steps whose prediction was NaN on a movement face (face maxima take a NaN when the
    # face holds one, on the host and the device path alike; an all-NaN prediction always
    # counts): a model or an image that produces NaN (checked at the end of segment_array)
    "nan_steps",
)


def _filled(shape, dtype, value) -> np.ndarray:
    """A host array of ``value`` that the kernel launcher in use reads and writes in place
    (under ``kernels="sycl"``, USM shared memory: the canvas is not copied per step)."""
    a = kernels.empty(shape, dtype)
    a.fill(value)
    return a


class Canvas:
    """Flood-fill state of one subvolume (reference semantics, float32 canvas)."""

    def __init__(self, image: np.ndarray, seeds: np.ndarray, config: InferenceConfig,
                 fov_zyx=(33, 33, 33), deltas_zyx=(8, 8, 8), state: CanvasState | None = None):
        if image.ndim != 3:
            raise ValueError(f"image must be 3-D, got shape {image.shape}")
        self.image = np.ascontiguousarray(image, dtype=np.float32)
        self.shape = self.image.shape
        self.fov = np.asarray(fov_zyx, dtype=np.int64)
        if smaller_than_fov(self.shape, self.fov):
            raise ValueError(f"volume of shape {self.shape} is smaller than the FOV {tuple(fov_zyx)}")
        self.margin = fov_margin(fov_zyx)
        self.deltas = tuple(int(v) for v in deltas_zyx)
        self.seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 3)
        self.cfg = config
        self.t_init = logit32(config.init_activation)
        self.t_pad = logit32(config.pad_value)
        self.t_move = logit32(config.move_threshold)
        self.t_seg = logit32(config.segment_threshold)
        self.logits = self._alloc_logits()
        self.state = state or CanvasState(segmentation=_filled(self.shape, np.int32, 0))
        if self.state.segmentation.shape != self.shape:
            raise ValueError("resumed segmentation does not match the image shape")
        for k in COUNTER_NAMES:
            self.state.counters.setdefault(k, 0)
        self._dirty: tuple[slice, ...] | None = None
        self._one = [self.logits]  # update_fovs arguments of the host path
        self._centre = np.zeros((1, 3), dtype=np.int64)
        self.on_object_done = None  # optional callback(canvas) between objects

    # -- storage hooks (host arrays here; floodfilling.inference.device keeps the image and
    #    logits on a torch device and overrides these) ---------------------------------
    def _alloc_logits(self):
        return _filled(self.shape, np.float32, np.nan)

    def _start_object(self, pos) -> None:
        """Clears the previous object's FOV box to NaN and sets the seed to logit(init)."""
        if self._dirty is not None:
            self.logits[self._dirty] = np.nan
        self.logits[pos] = self.t_init

    def _value_getter(self):
        """Callable position -> current float32 canvas logit (for queued candidates and the seed)."""
        return self.logits.__getitem__

    def _track(self, pos, value) -> None:
        """Called for each candidate queued with its current logit (host: nothing to do)."""

    def _apply(self, c, out):
        """Writes the network output for centre ``c`` (disco rule) and returns the 6 face
        maxima and their offsets as lists."""
        self._centre[0] = c
        scores, offsets = kernels.update_fovs(
            self._one, out.reshape((1,) + out.shape), self._centre, move_threshold=self.t_move,
            deltas=self.deltas, disco_seed_threshold=self.cfg.disco_seed_threshold)
        return scores[0].tolist(), offsets[0].tolist()

    def _commit_logits(self, box):
        """(host float32 C-contiguous array, start of ``box`` in it) read at commit."""
        return self.logits, tuple(b.start for b in box)

    def release(self) -> None:
        """Frees device storage when the canvas is done (host: nothing to do)."""

    # -- public views ---------------------------------------------------------------
    @property
    def segmentation(self) -> np.ndarray:
        return self.state.segmentation

    @property
    def done(self) -> bool:
        return (self.state.seed_index >= len(self.seeds)
                and self.state.fill_passes >= int(self.cfg.seed_fill_passes))

    def fov_slices(self, c) -> tuple[slice, slice, slice]:
        m = self.margin
        return (slice(c[0] - m[0], c[0] + m[0] + 1), slice(c[1] - m[1], c[1] + m[1] + 1),
                slice(c[2] - m[2], c[2] + m[2] + 1))

    # -- the loop ---------------------------------------------------------------------
    def steps(self):
        """Generator over the whole subvolume: yields FOV centres, receives logits.

        Each value sent back must be the network output (float32 ``fov_zyx`` logits) for
        the centre just yielded. Objects are committed between yields.
        """
        st = self.state
        seg = st.segmentation
        cnt = st.counters
        shape = self.shape
        m = self.margin
        mbd = self.cfg.min_boundary_dist_zyx
        while st.seed_index < len(self.seeds) or self._next_fill_pass():
            pos = tuple(int(v) for v in self.seeds[st.seed_index])
            cnt["seeds_seen"] += 1
            if (any(p - mm < 0 or p + mm >= s for p, mm, s in zip(pos, m, shape)) or seg[pos] > 0):
                cnt["seeds_skipped"] += 1
            elif np.any(seg[tuple(slice(max(p - b, 0), p + b + 1) for p, b in zip(pos, mbd))] > 0):
                seg[pos] = -1
                cnt["seeds_too_close"] += 1
            else:
                t0 = time.perf_counter()
                cnt["objects_attempted"] += 1
                steps, box = yield from self._flood(pos)
                self._commit(pos, steps, box, time.perf_counter() - t0)
            st.seed_index += 1
            if self.on_object_done is not None:
                self.on_object_done(self)

    def _next_fill_pass(self) -> bool:
        """seed_fill_passes: appends the seeds of the next pass; False when none is left."""
        st = self.state
        while st.fill_passes < int(self.cfg.seed_fill_passes):
            from .seeds import fill_empty

            st.fill_passes += 1
            extra = fill_empty(st.segmentation, self.margin, float(self.cfg.seed_fill_min_radius))
            st.counters["fill_seeds"] = st.counters.get("fill_seeds", 0) + len(extra)
            if len(extra):
                self.seeds = np.concatenate([self.seeds, extra.astype(np.int64)])
                return True
        return False

    def _flood(self, pos):
        """Floods one object from ``pos``; returns (steps, bounding box of the FOV centres)."""
        seg = self.state.segmentation
        self._start_object(pos)
        value = self._value_getter()
        track = self._track
        t_move = self.t_move
        shape = self.shape
        m0, m1, m2 = self.margin
        s0, s1, s2 = shape
        d0, d1, d2 = self.deltas
        h0, h1, h2 = d0 // 2, d1 // 2, d2 // 2
        q0, q1, q2 = max(d0, 1), max(d1, 1), max(d2, 1)
        p0, p1, p2 = pos
        queue = deque([(2 * t_move, pos)])
        done = set()
        lo = list(pos)
        hi = list(pos)
        steps = 0
        nan_steps = 0
        while True:
            c = None
            while queue:
                _, cand = queue.popleft()
                z, y, x = cand
                key = ((z - p0 + h0) // q0, (y - p1 + h1) // q1, (x - p2 + h2) // q2)
                if key in done:
                    continue
                if value(cand) < t_move:
                    continue
                if z - m0 < 0 or y - m1 < 0 or x - m2 < 0 or z + m0 >= s0 or y + m1 >= s1 or x + m2 >= s2:
                    continue
                if seg[cand] > 0:
                    continue
                c = cand
                break
            if c is None:
                break
            if value(pos) < t_move:  # the seed got too weak
                break
            out = yield c
            scores, offsets = self._apply(c, out)
            done.add(key)
            steps += 1
            if any(s != s for s in scores):  # NaN face maximum: six floats already on the host
                nan_steps += 1
            for i in range(3):
                if c[i] < lo[i]:
                    lo[i] = c[i]
                if c[i] > hi[i]:
                    hi[i] = c[i]
            cands = set()
            for s, (o0, o1, o2) in zip(scores, offsets):
                if not (s < t_move):
                    cands.add((s, (o0, o1, o2)))
            for s, (o0, o1, o2) in sorted(cands, reverse=True):
                p = (z + o0, y + o1, x + o2)  # (z, y, x) is c
                queue.append((s, p))
                track(p, s)
        box = tuple(slice(max(a - mm, 0), b + mm + 1) for a, b, mm in zip(lo, hi, self.margin))
        self._dirty = box
        if nan_steps:
            self.state.counters["nan_steps"] = self.state.counters.get("nan_steps", 0) + nan_steps
        return steps, box

    def _commit(self, pos, steps: int, box, seconds: float) -> None:
        st = self.state
        seg = st.segmentation
        cnt = st.counters
        cnt["steps"] += steps
        if steps <= 0:
            return
        if self._value_getter()(pos) < self.t_move:
            if seg[pos] == 0:
                seg[pos] = -1
            cnt["rejected_weak_seed"] += 1
            return
        new_id = st.max_id + 1
        while new_id in st.origins:
            new_id += 1
        start = tuple(b.start for b in box)
        size = tuple(b.stop - b.start for b in box)
        lg, lstart = self._commit_logits(box)
        actual, ids, counts = kernels.commit_object(lg, lstart, seg, start, size, seg_threshold=self.t_seg,
                                                    min_size=self.cfg.min_segment_size, new_id=new_id)
        if actual < self.cfg.min_segment_size:
            if seg[pos] == 0:
                seg[pos] = -1
            cnt["rejected_too_small"] += 1
            return
        st.max_id = new_id
        st.origins[st.max_id] = Origin(tuple(int(v) for v in pos), steps, seconds)
        st.overlaps[st.max_id] = (ids, counts)  # int64 from commit_object
        cnt["objects"] += 1
        cnt["voxels_segmented"] += actual
        cnt["voxels_overlapping"] += int(counts.sum())

    def flood_one(self, pos, predict) -> int:
        """Floods a single object from ``pos`` with ``predict(canvas, centre) -> logits``
        and commits it with the usual rules (for tests and parity checks). Returns steps."""
        gen = self._flood(tuple(int(v) for v in pos))
        t0 = time.perf_counter()
        try:
            c = next(gen)
            while True:
                c = gen.send(predict(self, c))
        except StopIteration as stop:
            steps, box = stop.value
        self._commit(tuple(int(v) for v in pos), steps, box, time.perf_counter() - t0)
        return steps

    def final_segmentation(self) -> np.ndarray:
        """The segmentation with rejected-seed marks (-1) cleared, as uint32."""
        seg = self.state.segmentation
        out = seg.astype(np.uint32)
        out[seg < 0] = 0
        return out
