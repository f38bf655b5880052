"""The training loop: FOV-moving examples, sigmoid cross-entropy, checkpoints, resume, DDP.

Directory layout of a run (``out``)::

    metrics.csv           one row per log_every steps (loss, precision/recall/F1 at 0.9, moves)
    metrics.png           the same, plotted (loss; precision, recall, F1)
    checkpoint/model.npz  the latest weights + meta (loadable by load_model(out/"checkpoint"))
    checkpoint/state.pt   step, weights, optimizer, every rank's example stream and RNG states
    tensorboard/          event files, when torch.utils.tensorboard imports

Both checkpoint files are replaced atomically (temporary file + rename); ``state.pt`` is the
one a resume reads. A resumed run continues the exact same computation: the example stream is
a function of (seed, example number) plus the in-flight canvases saved in ``state.pt``, so on
the CPU a run killed at any point and resumed ends with the same parameters as one that was
never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import disk, volumes
from ..model import ConvStack3D, ModelError, load_model
from . import distributed
from .examples import (MOVE_THRESHOLD, SEED_INIT, SEED_PAD, Counts, ExampleSource, ExampleStream, Geometry,
                       run_sequences)
from .checkpoints import (CHECKPOINT_DIR, MODEL_FILE, RESUME_KEYS, STATE_FILE, check_resume_key,  # noqa: F401
                          load_checkpoint,
                          rng_state, save_checkpoint, set_rng_state)
from .metrics import (METRICS_CSV, METRICS_PNG, TensorBoard, append_metrics, read_metrics,  # noqa: F401
                      save_plot, write_metrics)
from .options import TrainError, TrainOptions, check_options, fmt_value
from .partitions import build_coordinates, compute_partitions, read_attrs

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    steps: int
    seconds: float
    fov_per_s: float
    last: dict[str, float] = field(default_factory=dict)
    out: Path = Path(".")
    net: ConvStack3D | None = field(default=None, repr=False)  # the trained network (this rank's copy)


# -- data -------------------------------------------------------------------------------------

def intensity_stats(raw: np.ndarray) -> tuple[float, float, list[float]]:
    """Mean, standard deviation and the 101 quantiles (0, 1, ..., 100 %) of ``raw``."""
    a = np.asarray(raw)
    if a.dtype == np.uint8:  # exact, fast: from the histogram
        hist = np.bincount(a.ravel(), minlength=256).astype(np.float64)
        v = np.arange(256, dtype=np.float64)
        n = hist.sum()
        mean = float((hist * v).sum() / n)
        std = float(np.sqrt((hist * (v - mean) ** 2).sum() / n))
    else:
        mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
    q = np.quantile(a, np.linspace(0.0, 1.0, 101)).astype(np.float64)
    return mean, std, [float(x) for x in q]


def _read(spec: str, what: str) -> tuple[np.ndarray, str]:
    with volumes.open_volume(spec) as v:
        return v.read(), str(v.spec)


def load_coordinates(spec: str, shape, labels: np.ndarray | None = None,
                     labels_src: str = "the training labels") -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates (N, 3) zyx from an ``ffn prepare`` file (``file.h5`` or ``file.h5:dataset``).

    With ``labels``, the digest ``ffn prepare`` recorded of the labels it read (attribute
    ``labels_digest``) must be theirs: coordinates of another label volume of the same shape
    are refused; a file without the attribute (older ``ffn prepare``) is accepted with a warning."""
    import h5py

    try:
        path, ds = volumes.parse_volume_spec(spec, default_dataset="coords")
    except ValueError as exc:
        raise TrainError(f"coords={spec}: {exc}") from None
    if not os.path.isfile(path):
        raise TrainError(f"coords={spec}: no such file")
    try:
        with h5py.File(path, "r") as f:
            if ds not in f:
                raise TrainError(f"coords={spec}: no dataset {ds!r} (is it an `ffn prepare` output?)")
            d = f[ds]
            coords = d[...]
            attrs = read_attrs(d)
    except OSError as exc:
        raise TrainError(f"coords={spec}: cannot read HDF5 file ({exc})") from None
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.dtype.kind not in "iu":
        raise TrainError(f"coords={spec}: expected an (N, 3) integer array, got {coords.shape} {coords.dtype}")
    vshape = attrs.get("volume_shape")
    if vshape is not None and tuple(vshape) != tuple(shape):
        raise TrainError(f"coords={spec} was prepared for a volume of shape {tuple(vshape)}, "
                         f"the labels have shape {tuple(shape)}")
    if labels is not None:
        from .partitions import labels_digest

        recorded = attrs.get("labels_digest")
        if recorded is None:
            log.warning("coords=%s records no labels_digest (written by an older ffn prepare): cannot check that "
                        "it was prepared from %s", spec, labels_src)
        else:
            have = labels_digest(labels)
            if str(recorded) != have:
                raise TrainError(f"coords={spec} was prepared from labels {attrs.get('source_labels', '?')} "
                                 f"(labels_digest {recorded}), not from the training labels {labels_src} "
                                 f"(labels_digest {have}); rerun ffn prepare on {labels_src}")
    return coords.astype(np.int64), attrs


def _read_pair(image_spec: str, labels_spec: str, geometry: Geometry, what: str = ""):
    """(raw, labels, image source, labels source), checked to fit together and the FOV."""
    raw, image_src = _read(image_spec, "image")
    labels, labels_src = _read(labels_spec, "labels")
    if raw.shape != labels.shape:
        raise TrainError(f"{what}image {image_src} has shape {raw.shape} but {what}labels {labels_src} have shape "
                         f"{labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TrainError(f"{what}labels {labels_src}: expected integer ids, got dtype {labels.dtype}")
    try:
        geometry.check_fits(raw.shape, f"volume {image_src}")
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return raw, labels, image_src, labels_src


def load_data(opts: TrainOptions, geometry: Geometry):
    """(raw, labels, coords, info) with every check the user can act on."""
    raw, labels, image_src, labels_src = _read_pair(opts.image, opts.labels, geometry)
    info: dict[str, Any] = {}
    if opts.coords:
        coords, attrs = load_coordinates(opts.coords, labels.shape, labels, labels_src)
        info["coords"] = {"source": opts.coords, **{k: attrs[k] for k in ("radius_zyx", "margin_zyx", "min_size")
                                                    if k in attrs}}
    else:
        parts = compute_partitions(labels, geometry.margin, opts.thresholds, opts.min_size, source=labels_src)
        coords = build_coordinates(parts, geometry.margin, seed=opts.seed, source=labels_src)
        info["coords"] = {"source": "computed", "radius_zyx": list(geometry.margin), "min_size": opts.min_size}
    m = np.array(geometry.margin)
    mt = tuple(int(x) for x in m)
    ok = np.all((coords >= m) & (coords < np.array(labels.shape) - m), axis=1)
    if not ok.any():
        raise TrainError(f"no training coordinate is at least {mt} from the border (fov + 2*deltas = "
                         f"{geometry.patch}); rerun `ffn prepare` with margin_zyx={','.join(map(str, m))}")
    if not ok.all():
        log.warning("dropping %d of %d coordinates closer than %s to the border", int((~ok).sum()), len(coords), mt)
        coords = coords[ok]
    return raw, labels, coords, info


# -- model / optimizer ------------------------------------------------------------------------

def resolve_architecture(opts: TrainOptions) -> tuple[TrainOptions, ConvStack3D | None]:
    """Fills depth/features/fov/deltas from ``init``'s model (or the defaults); checks they agree."""
    init_net = None
    defaults: dict[str, Any] = {"depth": 12, "features": 32, "fov": (33, 33, 33), "deltas": (8, 8, 8)}
    if opts.init:
        init_net, info = load_model(opts.init, "cpu")
        have = {"depth": info.depth, "features": info.features, "fov": tuple(info.fov_zyx),
                "deltas": tuple(info.deltas_zyx)}
        for k, v in have.items():
            mine = getattr(opts, k)
            if mine is not None and tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(v)):
                raise ModelError(f"init={opts.init}: the model has {k} {fmt_value(v)}, but {k}={fmt_value(mine)} was "
                                 "requested (another architecture)")
        defaults = have
    kw = {k: (getattr(opts, k) if getattr(opts, k) is not None else defaults[k]) for k in defaults}
    kw["fov"] = tuple(int(x) for x in kw["fov"])
    kw["deltas"] = tuple(int(x) for x in kw["deltas"])
    return TrainOptions(**{**asdict(opts), **kw}), init_net


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


def model_meta(opts: TrainOptions, stats: dict[str, Any], step: int, world: int, info: dict[str, Any]) -> dict:
    return {
        "fov_zyx": list(opts.fov),
        "deltas_zyx": list(opts.deltas),
        "intensity": {"mean": stats["mean"], "std": stats["std"], "quantiles": stats["quantiles"]},
        "inference_settings": {"init_activation": SEED_INIT, "pad_value": SEED_PAD, "move_threshold": MOVE_THRESHOLD,
                               "segment_threshold": 0.6, "min_segment_size": 1000,
                               "image_mean": stats["mean"], "image_stddev": stats["std"]},
        "trained_steps": int(step),
        "source": "floodfilling training",
        "training": {"image": opts.image, "labels": opts.labels, "batch": opts.batch, "world": world,
                     "optimizer": opts.optimizer, "lr": opts.lr, "lr_scaling": opts.lr_scaling, "seed": opts.seed,
                     "init": opts.init, **info},
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
    raw, labels, image_src, labels_src = _read_pair(opts.val_image, opts.val_labels, geometry, "validation ")
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
    opts, init_net = resolve_architecture(opts)
    try:
        geometry = Geometry(opts.fov, opts.deltas)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if opts.depth < 1 or opts.features < 1:
        raise TrainError(f"depth={opts.depth}, features={opts.features}: both must be >= 1")
    if (ckdir / STATE_FILE).exists() and not opts.resume:
        raise TrainError(f"{ckdir} holds a checkpoint; pass resume=True to continue it, or another out=DIR")
    dinfo = distributed.setup(opts.device, out)
    if opts.threads <= 0 and dinfo.world > 1 and dinfo.device.type == "cpu":
        # ranks, not threads, share the cores: split them instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // distributed.local_size(dinfo.world)))
    ok = False
    try:
        res = _train(opts, geometry, init_net, dinfo, out, ckdir, t_start)
        ok = True
        return res
    finally:
        distributed.teardown(dinfo, ok)


def _absolute_spec(spec: str | None) -> str | None:
    if not spec:
        return spec
    try:
        path, ds = volumes.parse_volume_spec(spec)
    except ValueError:
        path, ds = spec, None
    return os.path.abspath(path) + (f":{ds}" if ds else "")


def _train(opts, geometry, init_net, dinfo, out, ckdir, t_start) -> TrainResult:
    rank, world = dinfo.rank, dinfo.world
    raw, labels, coords, data_info = load_data(opts, geometry)
    val = load_validation(opts, geometry)
    mean, std, quantiles = intensity_stats(raw)
    if opts.image_mean is not None:
        mean = float(opts.image_mean)
    if opts.image_std is not None:
        std = float(opts.image_std)
    if not std > 0:
        raise TrainError(f"image {opts.image}: intensity standard deviation is {std}; cannot normalise")
    stats = {"mean": mean, "std": std, "quantiles": quantiles}
    image = ((raw.astype(np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)
    del raw

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
    opt = make_optimizer(opts, net.parameters())
    source = ExampleSource(image, labels, coords, geometry, seed=opts.seed, rank=rank, world=world,
                           augment=opts.augment)
    stream = ExampleStream(source, opts.batch)
    resume_key = {**{k: getattr(opts, k) for k in RESUME_KEYS if hasattr(opts, k)}, "world": world}
    for k in ("image", "labels", "coords"):  # the same files, wherever the run is resumed from
        resume_key[k] = _absolute_spec(resume_key[k])
    resume_key = json.loads(json.dumps(resume_key))

    step = 0
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
        log.info("resuming %s at step %d", ckdir, step)
    elif opts.resume:
        log.info("no checkpoint in %s: starting from step 0", ckdir)

    metrics_path = out / METRICS_CSV
    rows: list[dict[str, float]] = []
    if dinfo.is_main:
        with disk.disk_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        for stale in list(ckdir.glob(f"{STATE_FILE}.tmp-*")) + list(ckdir.glob(f"{MODEL_FILE}.tmp-*")):
            stale.unlink(missing_ok=True)  # left by a run killed while writing a checkpoint
        rows = [r for r in read_metrics(metrics_path) if r["step"] <= step] if step > 0 else []
        write_metrics(metrics_path, rows)
    tb = TensorBoard(out / "tensorboard", opts.tensorboard and dinfo.is_main)

    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[dinfo.device.index] if dinfo.device.type in ("cuda", "xpu") else None)

    bar = None
    if opts.progress and dinfo.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=opts.max_steps, initial=step, unit="step", desc="train", dynamic_ncols=True)

    def checkpoint() -> None:
        ranks = _gather({"stream": stream.state_dict(), "counts": stream.counts.vector(), "rng": rng_state()}, dinfo)
        if dinfo.is_main:
            save_checkpoint(ckdir, net, opt, step, ranks, resume_key,
                            model_meta(opts, stats, step, world, data_info))
            log.info("checkpoint at step %d", step)

    t_last_ck = time.monotonic()
    t_log, step_log = time.perf_counter(), step
    last_row: dict[str, float] = {}
    t_loop = time.perf_counter()
    step0 = step
    net.train()
    try:
        while step < opts.max_steps:
            lr = learning_rate(opts, step, world)
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
                tot = Counts.from_vector(_all_reduce_sum(stream.counts.vector(), dinfo))
                stream.counts = Counts()
                now = time.perf_counter()
                row = {"step": float(step), "examples": float(step * opts.batch * world), "lr": lr,
                       **tot.summary(),
                       "fov_per_s": (step - step_log) * opts.batch * world / max(now - t_log, 1e-9),
                       "elapsed_s": now - t_start, **vrow}
                t_log, step_log = now, step
                last_row = row
                if dinfo.is_main:
                    append_metrics(metrics_path, row)
                    rows.append(row)
                    tb.add(row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", f1=f"{row['f1']:.3f}", refresh=False)
                    log.info("step %d: loss %.4f precision %.3f recall %.3f f1 %.3f moves/seq %.2f %.1f FOV/s",
                             step, row["loss"], row["precision"], row["recall"], row["f1"],
                             row["moves_per_sequence"], row["fov_per_s"])
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
    return TrainResult(steps=step, seconds=time.perf_counter() - t_start, fov_per_s=fps, last=last_row, out=out,
                       net=net)
