"""The training loop: FOV-moving examples, sigmoid cross-entropy, checkpoints, resume, DDP.

Directory layout of a run (``out``)::

    metrics.csv           one row per log_every steps (loss, precision/recall/F1 at 0.9, moves)
    metrics.png           the same, plotted (loss; precision, recall, F1)
    checkpoint/model.npz  the latest weights + meta (loadable by load_model(out/"checkpoint"))
    checkpoint/state.pt   step, weights, optimizer, every rank's example stream and RNG states
    models/model-STEP.npz the weights every keep_every steps (kept; loadable like any model file)
    tensorboard/          event files, when torch.utils.tensorboard imports
    train.lock            while a training writes the directory (see rundir: one training per directory)

The model's metadata (``model.npz``'s ``__meta__``, also in ``state.pt``) records under
``training`` every training volume (files, coordinates, probability, the intensity mean/std it was
normalised with) and, when fine-tuned (``init``: a model file, a run directory or ``bundled``, whose
depth/features/FOV/deltas the run takes), the parent model: what was given, its file and sha256.

Both checkpoint files are replaced atomically (temporary file + rename); ``state.pt`` is the
one a resume reads. A run that fails leaves the directory as at its last checkpoint (metrics rows
after it dropped), or nothing it wrote when it reached none (:mod:`.rundir`). A resumed run
continues the exact same computation: the example stream is a function of (seed, example
number) plus the in-flight canvases saved in ``state.pt``, so on the CPU a run killed at any
point and resumed ends with the same parameters as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import disk, volumes
from ..model import ConvStack3D, ModelError, load_model, model_file
from ..results import file_digest
from . import distributed
from .examples import (MOVE_THRESHOLD, SEED_INIT, SEED_PAD, Counts, ExampleSource, ExampleStream, Geometry,
                       run_sequences)
from .checkpoints import (CHECKPOINT_DIR, MODEL_FILE, RESUME_KEYS, STATE_FILE, check_resume_key,  # noqa: F401
                          kept_model_path, load_checkpoint, rng_state, save_checkpoint, save_kept_model,
                          set_rng_state)
from .metrics import (METRICS_CSV, METRICS_PNG, TensorBoard, append_metrics, read_metrics,  # noqa: F401
                      save_plot, write_metrics)
from .options import TrainError, TrainOptions, check_options, fmt_value
from .partitions import build_coordinates, compute_partitions
from .rundir import LOCK_FILE, RunDir  # noqa: F401
from .volumes import LoadedVolume, intensity_stats, load_volumes, mixed_source, read_pair

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    steps: int
    seconds: float
    fov_per_s: float
    last: dict[str, float] = field(default_factory=dict)
    out: Path = Path(".")
    net: ConvStack3D | None = field(default=None, repr=False)  # the trained network (this rank's copy)


# -- model / optimizer ------------------------------------------------------------------------

BUNDLED = "bundled"  # init=bundled: the package's FIB-25 model (what load_model(None) loads)


def init_model(init: str) -> tuple[ConvStack3D, Any, dict[str, Any]]:
    """(network, ModelInfo, parent record) of ``init``: a model file, a directory holding one
    (a training run's), or :data:`BUNDLED`; the record names it and the sha256 of its file."""
    try:
        path = model_file(None if init == BUNDLED else init)
    except ModelError as exc:
        raise ModelError(f"init={init}: {exc}") from None
    with disk.disk_errors(path, "reading"):
        sha256 = file_digest(path, digits=None)
    net, info = load_model(path, "cpu")
    parent = {"model": BUNDLED if init == BUNDLED else os.path.abspath(init), "file": str(path.resolve()),
              "sha256": sha256, "intensity": {"mean": info.image_mean, "std": info.image_std}}
    return net, info, parent


def resolve_architecture(opts: TrainOptions) -> tuple[TrainOptions, ConvStack3D | None, dict[str, Any] | None]:
    """Fills depth/features/fov/deltas from ``init``'s model (or the defaults); checks they agree.
    Returns the options, ``init``'s network and its parent record (see :func:`init_model`)."""
    init_net, parent = None, None
    defaults: dict[str, Any] = {"depth": 12, "features": 32, "fov": (33, 33, 33), "deltas": (8, 8, 8)}
    if opts.init:
        init_net, info, parent = init_model(opts.init)
        have = {"depth": info.depth, "features": info.features, "fov": tuple(info.fov_zyx),
                "deltas": tuple(info.deltas_zyx)}
        for k, v in have.items():
            mine = getattr(opts, k)
            if mine is not None and tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(v)):
                raise ModelError(f"init={opts.init}: the model has {k} {fmt_value(v)}, but {k}={fmt_value(mine)} was "
                                 f"requested (another architecture; leave {k}= out to take the model's)")
        defaults = have
    kw = {k: (getattr(opts, k) if getattr(opts, k) is not None else defaults[k]) for k in defaults}
    kw["fov"] = tuple(int(x) for x in kw["fov"])
    kw["deltas"] = tuple(int(x) for x in kw["deltas"])
    return replace(opts, **kw), init_net, parent


def make_optimizer(opts: TrainOptions, params) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr)
    raise TrainError(f"optimizer={opts.optimizer!r}: expected sgd or adam")


def learning_rate(opts: TrainOptions, step: int, world: int) -> float:
    target = opts.lr * distributed.lr_scale(world, opts.lr_scaling)
    if opts.warmup_steps > 0 and step < opts.warmup_steps:
        return opts.lr + (target - opts.lr) * step / opts.warmup_steps
    return target


def model_meta(opts: TrainOptions, loaded: list[LoadedVolume], step: int, world: int,
               parent: dict[str, Any] | None) -> dict:
    """The model file's metadata: geometry, the intensity statistics inference uses for this model
    (the first volume's; every volume was normalised by its own, all listed under
    ``training.volumes``), the reference's inference settings and how it was trained (``training.
    init``: the parent model, its file and sha256, when fine-tuned)."""
    first = loaded[0]
    return {
        "fov_zyx": list(opts.fov),
        "deltas_zyx": list(opts.deltas),
        "intensity": {"mean": first.mean, "std": first.std, "quantiles": first.quantiles},
        "inference_settings": {"init_activation": SEED_INIT, "pad_value": SEED_PAD, "move_threshold": MOVE_THRESHOLD,
                               "segment_threshold": 0.6, "min_segment_size": 1000,
                               "image_mean": first.mean, "image_stddev": first.std},
        "trained_steps": int(step),
        "source": "floodfilling training",
        "training": {"image": first.info["image"], "labels": first.info["labels"], "batch": opts.batch,
                     "world": world, "optimizer": opts.optimizer, "lr": opts.lr, "lr_scaling": opts.lr_scaling,
                     "seed": opts.seed, "init": parent, "coords": first.info["coords"],
                     "volumes": [lv.info for lv in loaded]},
    }


# -- validation -------------------------------------------------------------------------------

@dataclass
class Validation:
    """A held-out volume (normalised by its own statistics, as inference's "standardise"
    does) and its coordinates: the first ``val_sequences`` examples, without augmentation."""

    image: np.ndarray
    labels: np.ndarray
    coords: np.ndarray


def load_validation(opts: TrainOptions, geometry: Geometry) -> Validation | None:
    if not opts.val_image and not opts.val_labels:
        return None
    if not (opts.val_image and opts.val_labels):
        given, missing = ("val_image", "val_labels=LABELS") if opts.val_image else ("val_labels", "val_image=IMAGE")
        raise TrainError(f"{given}={getattr(opts, given)}: needs {missing} too (the two go together)")
    raw, labels, image_src, labels_src = read_pair(opts.val_image, opts.val_labels, geometry,
                                                   ("val_image", "val_labels"))
    mean, std, _ = intensity_stats(raw)
    if not std > 0:
        raise TrainError(f"validation image {image_src}: intensity standard deviation is {std}; cannot normalise")
    image = ((raw.astype(np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)
    try:
        parts = compute_partitions(labels, geometry.margin, opts.thresholds, opts.val_min_size, source=labels_src)
        coords = build_coordinates(parts, geometry.margin, seed=VAL_SEED, source=labels_src)
    except ValueError as exc:
        raise TrainError(f"val_labels={opts.val_labels}: {exc}") from None
    return Validation(image, labels, coords)


VAL_SEED = 1  # order of the held-out coordinates (fixed: every validation sees the same sequences)


def validate(net, val: Validation, geometry: Geometry, opts: TrainOptions, dinfo) -> dict[str, float]:
    """Precision/recall/F1 at 0.9 and loss over the first ``val_sequences`` held-out move
    sequences (rank r runs sequences r, r + world, ...; counts summed over ranks)."""
    src = ExampleSource(val.image, val.labels, val.coords, geometry, seed=VAL_SEED, rank=dinfo.rank,
                        world=dinfo.world, augment=False)
    mine = len(range(dinfo.rank, opts.val_sequences, dinfo.world))
    counts = run_sequences(net, ExampleStream(src, opts.batch, max_examples=mine), dinfo.device)
    s = Counts.from_vector(_all_reduce_sum(counts.vector(), dinfo)).summary()
    return {f"val_{k}": float(s[k]) for k in ("loss", "precision", "recall", "f1")}


# -- the loop ---------------------------------------------------------------------------------

def _all_reduce_sum(vec: np.ndarray, dist_info) -> np.ndarray:
    if dist_info.world <= 1:
        return vec
    t = torch.from_numpy(vec.astype(np.float64)).to(dist_info.device)
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()


def _broadcast_flag(flag: bool, dist_info) -> bool:
    if dist_info.world <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dist_info.device)
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def _gather(obj: Any, dist_info) -> list[Any]:
    if dist_info.world <= 1:
        return [obj]
    out = [None] * dist_info.world if dist_info.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out  # type: ignore[return-value]


def train(opts: TrainOptions) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    t_start = time.perf_counter()
    opts = check_options(opts)  # before anything is created (no run directory for a bad option)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    ckdir = out / CHECKPOINT_DIR
    opts, init_net, parent = resolve_architecture(opts)
    try:
        geometry = Geometry(opts.fov, opts.deltas)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if opts.depth < 1 or opts.features < 1:
        raise TrainError(f"depth={opts.depth}, features={opts.features}: both must be >= 1")
    if (ckdir / STATE_FILE).exists() and not opts.resume:
        raise TrainError(f"{ckdir} holds a checkpoint; pass resume=True to continue it, or another out=DIR")
    run = RunDir(out)
    dinfo = distributed.setup(opts.device, out)
    if opts.threads <= 0 and dinfo.world > 1 and dinfo.device.type == "cpu":
        # ranks, not threads, share the cores: split them instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // distributed.local_size(dinfo.world)))
    ok = False
    try:
        _lock_run(run, dinfo)
        res = _train(opts, geometry, init_net, parent, dinfo, out, ckdir, t_start, run)
        ok = True
        return res
    finally:
        try:
            if dinfo.is_main:
                run.finish(ok)  # a failed run: back to its last checkpoint; the lock released
        finally:
            distributed.teardown(dinfo, ok)


def _lock_run(run: RunDir, dinfo) -> None:
    """Rank 0 takes the run directory's lock (:mod:`.rundir`); every rank stops when it cannot."""
    err: BaseException | None = None
    if dinfo.is_main:
        try:
            run.acquire()
        except BaseException as exc:  # noqa: BLE001 - raised below, after the other ranks know
            err = exc
    if not _broadcast_flag(err is None, dinfo):
        if err is not None:
            raise err
        raise TrainError(f"out={run.out}: rank 0 could not lock the run directory (see its error)")


def _absolute_spec(spec: str | None) -> str | None:
    if not spec:
        return spec
    try:
        path, ds = volumes.parse_volume_spec(spec)
    except ValueError:
        path, ds = spec, None
    return os.path.abspath(path) + (f":{ds}" if ds else "")


def resume_key_of(opts: TrainOptions, world: int, parent: dict[str, Any] | None) -> dict[str, Any]:
    """What a resume must share with the checkpoint (:data:`RESUME_KEYS`): the files by absolute
    path; ``volumes`` only for several volumes or weights (a single-volume key as before)."""
    first = opts.volumes[0]
    key = {**{k: getattr(opts, k) for k in RESUME_KEYS if hasattr(opts, k) and k != "volumes"}, "world": world,
           "image": _absolute_spec(first.image), "labels": _absolute_spec(first.labels),
           "coords": _absolute_spec(first.coords), "init": parent["sha256"] if parent else None, "volumes": None}
    if len(opts.volumes) > 1 or first.weight is not None:
        key["volumes"] = [[_absolute_spec(v.image), _absolute_spec(v.labels), _absolute_spec(v.coords), v.weight]
                          for v in opts.volumes]
    return json.loads(json.dumps(key))


def _make_net(opts: TrainOptions, init_net, dinfo) -> ConvStack3D:
    """The network to train (seeded; from ``init_net``'s weights when given) on the device."""
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    net = ConvStack3D(opts.depth, opts.features)
    if init_net is not None:
        net.load_state_dict(init_net.state_dict())
    # channels-last 3-D: about 2x faster convolutions on CPU (and on GPUs)
    net = net.to(dinfo.device, memory_format=torch.channels_last_3d)
    for p in net.parameters():  # 1x1x1 kernels: keep the strides their gradients get (DDP buckets)
        if p.dim() == 5 and p.shape[2:] == (1, 1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return net


def _resume(opts: TrainOptions, ckdir: Path, net, opt, stream: ExampleStream, rank: int, resume_key: dict,
            run: RunDir) -> int:
    """``--resume``: network, optimizer, this rank's example stream and random state from the
    checkpoint (whose resume key must match); the step to go on from (0 without one)."""
    if opts.resume and (ckdir / STATE_FILE).exists():
        st = load_checkpoint(ckdir)
        check_resume_key(st.get("resume_key", {}), resume_key, ckdir)
        try:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"{ckdir}: checkpoint does not fit this model ({str(exc).splitlines()[0]})") from None
        mine = st["ranks"][rank]
        stream.load_state_dict(mine["stream"])
        stream.counts = Counts.from_vector(mine["counts"])
        set_rng_state(mine["rng"])
        step = int(st["step"])
        run.checkpoint_step = step
        log.info("resuming %s at step %d", ckdir, step)
        return step
    if opts.resume:
        log.info("no checkpoint in %s: starting from step 0", ckdir)
    return 0


def _open_rundir(out: Path, ckdir: Path, metrics_path: Path, step: int, run: RunDir) -> list[dict[str, float]]:
    """Rank 0: the run directory made, a killed checkpoint write's temporaries gone, the metrics
    cut back to ``step``; those metrics rows."""
    run.writing = True  # from here a failure puts the directory back to its checkpoint (rundir)
    with disk.disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    for stale in list(ckdir.glob(f"{STATE_FILE}.tmp-*")) + list(ckdir.glob(f"{MODEL_FILE}.tmp-*")):
        stale.unlink(missing_ok=True)  # left by a run killed while writing a checkpoint
    rows = [r for r in read_metrics(metrics_path) if r["step"] <= step] if step > 0 else []
    write_metrics(metrics_path, rows)
    return rows


def _sgd_step(model, net, opt, stream: ExampleStream, opts: TrainOptions, dinfo, lr: float, step: int) -> None:
    """One optimizer step on the next batch at learning rate ``lr``; the batch's predictions go
    back to the stream (the FOVs move), its loss into the stream's counts."""
    for g in opt.param_groups:
        g["lr"] = lr
    img, seed, target = stream.next_batch()  # type: ignore[misc]
    img_t = torch.from_numpy(img).to(dinfo.device).contiguous(memory_format=torch.channels_last_3d)
    seed_t = torch.from_numpy(seed).to(dinfo.device).contiguous(memory_format=torch.channels_last_3d)
    target_t = torch.from_numpy(target).to(dinfo.device)
    logits = model(img_t, seed_t)
    loss = F.binary_cross_entropy_with_logits(logits, target_t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if opts.clip > 0:
        torch.nn.utils.clip_grad_value_(net.parameters(), opts.clip)
    opt.step()
    stream.write_back(logits.detach().float().cpu().numpy())
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise TrainError(f"loss became {lv} at step {step + 1}; lower lr={opts.lr}")
    stream.counts.loss_sum += lv * img.shape[0]
    stream.counts.loss_n += img.shape[0]


def _record(row: dict[str, float], metrics_path: Path, rows: list, tb: TensorBoard, bar) -> None:
    """Rank 0: a metrics row into the CSV, TensorBoard, the progress bar and the log."""
    append_metrics(metrics_path, row)
    rows.append(row)
    tb.add(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", f1=f"{row['f1']:.3f}", refresh=False)
    log.info("step %d: loss %.4f precision %.3f recall %.3f f1 %.3f moves/seq %.2f %.1f FOV/s", int(row["step"]),
             row["loss"], row["precision"], row["recall"], row["f1"], row["moves_per_sequence"], row["fov_per_s"])


def _train(opts, geometry, init_net, parent, dinfo, out, ckdir, t_start, run: RunDir) -> TrainResult:
    rank, world = dinfo.rank, dinfo.world
    loaded = load_volumes(opts)
    val = load_validation(opts, geometry)
    if len(loaded) > 1:
        log.info("training volumes: %s", "; ".join(f"{lv.info['image']} ({lv.info['coordinates']} coordinates, "
                                                     f"p={lv.info['probability']:.3f})" for lv in loaded))

    net = _make_net(opts, init_net, dinfo)
    opt = make_optimizer(opts, net.parameters())
    source = mixed_source(loaded, geometry, seed=opts.seed, rank=rank, world=world, augment=opts.augment)
    stream = ExampleStream(source, opts.batch)  # type: ignore[arg-type]
    resume_key = resume_key_of(opts, world, parent)
    step = _resume(opts, ckdir, net, opt, stream, rank, resume_key, run)
    metrics_path = out / METRICS_CSV
    rows = _open_rundir(out, ckdir, metrics_path, step, run) if dinfo.is_main else []
    tb = TensorBoard(out / "tensorboard", opts.tensorboard and dinfo.is_main)

    model = _wrap_ddp(net, dinfo)
    bar = _progress_bar(opts, dinfo, step)
    log_rows = _StepLog(opts, dinfo, stream, metrics_path, rows, tb, bar, t_start, step)

    def checkpoint() -> None:
        ranks = _gather({"stream": stream.state_dict(), "counts": stream.counts.vector(), "rng": rng_state()}, dinfo)
        if dinfo.is_main:
            save_checkpoint(ckdir, net, opt, step, ranks, resume_key,
                            model_meta(opts, loaded, step, world, parent))
            run.checkpoint_step = step
            log.info("checkpoint at step %d", step)

    t_last_ck = time.monotonic()
    t_loop = time.perf_counter()
    step0 = step
    net.train()
    try:
        while step < opts.max_steps:
            lr = learning_rate(opts, step, world)
            _sgd_step(model, net, opt, stream, opts, dinfo, lr, step)
            step += 1
            if bar is not None:
                bar.update(1)
            vrow: dict[str, float] = {}
            if val is not None and (step == opts.max_steps or (opts.val_every > 0 and step % opts.val_every == 0)):
                vrow = validate(net, val, geometry, opts, dinfo)
                if dinfo.is_main:
                    log.info("step %d: validation loss %.4f precision %.3f recall %.3f f1 %.3f", step,
                             vrow["val_loss"], vrow["val_precision"], vrow["val_recall"], vrow["val_f1"])
            if step % max(opts.log_every, 1) == 0 or step == opts.max_steps or vrow:
                log_rows.row(step, lr, vrow)
            if opts.keep_every > 0 and step % opts.keep_every == 0 and dinfo.is_main:
                # a model to choose by held-out segmentation (README, "Adapting to your data")
                run.kept.append((step, kept_model_path(out, step)))  # removed if the run fails before a checkpoint
                save_kept_model(out, step, net, model_meta(opts, loaded, step, world, parent))
            due = step == opts.max_steps or (opts.checkpoint_every > 0 and step % opts.checkpoint_every == 0)
            if opts.checkpoint_secs > 0 and not due:
                due = _broadcast_flag(time.monotonic() - t_last_ck >= opts.checkpoint_secs, dinfo)
            if due:
                checkpoint()
                if dinfo.is_main:
                    save_plot(out / METRICS_PNG, rows)
                t_last_ck = time.monotonic()
        if opts.max_steps == 0 and step == 0:
            checkpoint()  # max_steps=0: still leave a loadable (untrained) model
    finally:
        if bar is not None:
            bar.close()
        tb.close()
        del model  # the DDP wrapper holds the process group: gone before teardown destroys it
    secs = time.perf_counter() - t_loop
    fps = (step - step0) * opts.batch * world / secs if step > step0 and secs > 0 else 0.0
    return TrainResult(steps=step, seconds=time.perf_counter() - t_start, fov_per_s=fps, last=log_rows.last, out=out,
                       net=net)


def _wrap_ddp(net, dinfo):
    """``net`` wrapped for DistributedDataParallel when several ranks train (itself otherwise)."""
    if dinfo.world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[dinfo.device.index] if dinfo.device.type in ("cuda", "xpu") else None)


def _progress_bar(opts, dinfo, step: int):
    """The training's progress bar (main rank, ``opts.progress``), or None."""
    if not (opts.progress and dinfo.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=opts.max_steps, initial=step, unit="step", desc="train", dynamic_ncols=True)


class _StepLog:
    """The metrics rows of a training run: counts summed over ranks since the last row, speed
    since then; recorded by the main rank (CSV, TensorBoard, progress bar)."""

    def __init__(self, opts, dinfo, stream, metrics_path, rows, tb, bar, t_start: float, step: int):
        self.opts, self.dinfo, self.stream = opts, dinfo, stream
        self.metrics_path, self.rows, self.tb, self.bar = metrics_path, rows, tb, bar
        self.t_start = t_start
        self.t_log, self.step_log = time.perf_counter(), step  # the last row's time and step
        self.last: dict[str, float] = {}  # the last row

    def row(self, step: int, lr: float, vrow: dict[str, float]) -> None:
        """A row at ``step`` (collective: the counts are summed over ranks)."""
        world, batch = self.dinfo.world, self.opts.batch
        tot = Counts.from_vector(_all_reduce_sum(self.stream.counts.vector(), self.dinfo))
        self.stream.counts = Counts()
        now = time.perf_counter()
        self.last = {"step": float(step), "examples": float(step * batch * world), "lr": lr, **tot.summary(),
                     "fov_per_s": (step - self.step_log) * batch * world / max(now - self.t_log, 1e-9),
                     "elapsed_s": now - self.t_start, **vrow}
        self.t_log, self.step_log = now, step
        if self.dinfo.is_main:
            _record(self.last, self.metrics_path, self.rows, self.tb, self.bar)
