"""Many subvolumes in flight: one FOV of each active canvas per batched network call.

Within one subvolume FFN inference is a chain (each step depends on the previous one), so
the parallelism that feeds a GPU is *across* subvolumes. The engine keeps up to ``K``
canvases active; every round it collects the next FOV centre of each, runs the network
once on the batch (or, with ``max_batch=1`` on CPU where batch 1 is fastest per FOV, once
per FOV), and sends each canvas its logits. A finished canvas is replaced by the next
waiting job. Each canvas only ever sees its own FOVs, so its result is the one it would
get alone (bit for bit whenever the network returns the same logits for a FOV regardless
of its batch-mates, as it does at batch 1 and in fp32 on the CPU).

No Python thread per canvas: canvases are generators (:meth:`Canvas.steps`). Whole volumes,
blocks and agglomeration boxes all become canvases through :func:`subvolume_canvas` and run
through :func:`run_jobs`, with ``K`` from :func:`inflight_on`.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..config import MAX_INFLIGHT, InferenceConfig
from ..model import ModelInfo
from ..boxes import ParameterError
from . import seeds as seeds_mod
from .canvas import Canvas, CanvasState
from ..geometry import fov_margin
from .predictor import Predictor

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One subvolume: ``make()`` builds its canvas when a slot frees (keeps memory ~K canvases)."""

    key: object
    make: Callable[[], Canvas]


def run_jobs(jobs: Iterable[Job], predictor: Predictor, inflight: int = 1,
             on_done: Callable[[object, Canvas], None] | None = None, progress=None) -> dict[object, Canvas]:
    """Runs every job to completion with up to ``inflight`` canvases active.

    ``on_done(key, canvas)`` is called as each canvas finishes (write its result there and
    drop it to keep memory at K canvases); returns {key: canvas} when ``on_done`` is None.

    With ``predictor.pipeline_groups(K) == 2`` (the device-resident path on an asynchronous
    device) the active canvases form two groups of up to ceil(K / 2): while the device runs
    one group's step, the host processes the other group's results (flood loop, commits)
    and launches its next step. A canvas belongs to one group and never has two steps in
    flight, so its results do not depend on the grouping.
    """
    check_inflight(inflight)
    waiting = deque(jobs)
    n_groups = max(1, min(int(predictor.pipeline_groups(inflight)), inflight))
    cap = -(-inflight // n_groups)
    groups: list[list[tuple[object, Canvas, object, tuple]]] = [[] for _ in range(n_groups)]
    pending: list[object] = [None] * n_groups  # launched, not yet collected
    results: dict[object, Canvas] = {}

    def finish(key, cv):
        cv.release()
        if progress is not None:
            progress.update(1)
        if on_done is not None:
            on_done(key, cv)
        else:
            results[key] = cv

    def admit(active):
        while len(active) < cap and waiting:
            job = waiting.popleft()
            cv = job.make()
            gen = cv.steps()
            try:
                c = next(gen)
            except StopIteration:
                finish(job.key, cv)
                continue
            active.append((job.key, cv, gen, c))

    for g in range(n_groups):
        admit(groups[g])
    while any(groups):
        for g in range(n_groups):
            active = groups[g]
            if pending[g] is not None:
                outs = predictor.collect(pending[g])
                pending[g] = None
                still = []
                for (key, cv, gen, _), out in zip(active, outs):
                    try:
                        still.append((key, cv, gen, gen.send(out)))
                    except StopIteration:
                        finish(key, cv)
                active[:] = still
                admit(active)
            if active:
                canvases = [a[1] for a in active]
                pending[g] = predictor.launch(canvases, [a[3] for a in active], canvases[0].t_pad)
    return results


def check_inflight(inflight: int | None) -> int | None:
    """``inflight`` (canvases in flight, K) checked: None (the default, :func:`inflight_on`)
    or 1..``MAX_INFLIGHT``; a :class:`~floodfilling.boxes.ParameterError` otherwise."""
    if inflight is not None and int(inflight) < 1:
        raise ParameterError("inflight", inflight, f"inflight={inflight}: must be >= 1")
    if inflight is not None and int(inflight) > MAX_INFLIGHT:
        raise ParameterError("inflight", inflight, f"inflight={inflight}: must be <= {MAX_INFLIGHT} (canvases in "
                                                   "flight, each holding a block's canvas)")
    return inflight


def inflight_on(device, inflight: int | None = None) -> int:
    """Canvases in flight on ``device`` (a torch.device): ``inflight``, by default 1 on a CPU
    (batch 1 is fastest per FOV) and 16 elsewhere (two alternating groups of 8: batch 8 keeps a
    GPU busy on 33^3 FOVs; unmeasured)."""
    if check_inflight(inflight) is not None:
        return int(inflight)
    return 1 if device.type == "cpu" else 16


def subvolume_canvas(predictor: Predictor, image: np.ndarray, cfg: InferenceConfig, info: ModelInfo,
                     resolution_zyx=(1, 1, 1), seeds: np.ndarray | None = None,
                     state: CanvasState | None = None) -> Canvas:
    """The canvas of one normalised (float32) subvolume ``image``: how segment, blocks and
    agglomeration alike turn a volume into a canvas. ``seeds``: (N, 3) in order (default: the
    config's seed policy at ``resolution_zyx``, inside the FOV margin); ``state``: a resumed
    canvas state."""
    if seeds is None:
        seeds = subvolume_seeds(image, cfg, info, resolution_zyx)
    return predictor.new_canvas(image, seeds, cfg, info.deltas_zyx, state=state)


def subvolume_seeds(image: np.ndarray, cfg: InferenceConfig, info: ModelInfo, resolution_zyx=(1, 1, 1)) -> np.ndarray:
    """The seeds :func:`subvolume_canvas` gives ``image`` by default (the config's seed policy
    inside the FOV margin), for callers that prepare them ahead (host work only, no predictor)."""
    return seeds_mod.policy_of(cfg).seeds(image, fov_margin(info.fov_zyx), resolution_zyx)


def make_predictor(net, fov_zyx, deltas_zyx, config, *, device=None, max_batch: int | None = None,
                   threads: int = 0, inflight: int = 1) -> Predictor:
    """The predictor for ``config`` on ``device`` (default ``config.device``): the host path
    (NumPy canvases, native kernels; batch 1, the fastest per FOV on CPU) or, with
    ``config.resident`` "on" or "auto" on cuda/xpu, the device-resident one
    (:mod:`floodfilling.inference.device`; its canvas pool grows to the canvases in flight)."""
    from ..model import select_device

    dev = select_device(device if device is not None else config.device)
    resident = config.resident == "on" or (config.resident == "auto" and dev.type != "cpu")
    if max_batch is None:
        max_batch = 1 if dev.type == "cpu" else max(1, int(inflight))
    if resident:
        from .device import DevicePredictor

        return DevicePredictor(net, fov_zyx, deltas_zyx, config, device=dev, precision=config.precision,
                               max_batch=max_batch, threads=threads,
                               compile=config.compile)
    return Predictor(net, fov_zyx, device=dev, precision=config.precision, max_batch=max_batch, threads=threads,
                     compile=config.compile)
