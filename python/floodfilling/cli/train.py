"""``ffn prepare`` and ``ffn train`` (added to the main ``ffn`` parser by :func:`add_parsers`)."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import fields

from .args import zyx_arg

log = logging.getLogger("floodfilling")

# TrainOptions fields whose flag is negated or named otherwise: --no-augment, --quiet, --no-tensorboard
_NEGATED = ("augment", "progress", "tensorboard")


def flags() -> dict[str, str]:
    """The library parameter each flag of prepare and train sets (how error messages become
    flag messages: :func:`floodfilling.cli.with_flags`): every :class:`TrainOptions` field has
    the flag of its name but the negated switches; prepare's geometry has ``_zyx`` names."""
    from ..training.options import TrainOptions

    table = {f.name: "--" + f.name.replace("_", "-") for f in fields(TrainOptions)
             if f.name not in _NEGATED and f.name != "volumes"}
    return {**table, "radius_zyx": "--radius", "margin_zyx": "--margin", "overwrite": "--overwrite",
            "volume_weights": "--volume-weights"}


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return vals


def cmd_prepare(args) -> int:
    from ..training.partitions import prepare

    r = prepare(args.labels, args.out, radius_zyx=args.radius, thresholds=args.thresholds, min_size=args.min_size,
                margin_zyx=args.margin, seed=args.seed, overwrite=args.overwrite)
    counts = ", ".join(f"{k}:{v}" for k, v in sorted(r["partition_counts"].items()))
    print(f"wrote {r['out']}: {r['coords']} coordinates; partitions computed in {r['partition_seconds']:.1f} s, "
          f"total {r['seconds']:.1f} s; partition counts {counts}")
    return 0


def _volume_options(args) -> dict:
    """The training volumes of ``ffn train`` as :class:`TrainOptions` fields: ``image``/``labels``/
    ``coords``/``image_mean``/``image_std`` for one volume, else ``volumes``. ``--image`` and
    ``--labels`` come in pairs; ``--coords``, ``--image-mean``, ``--image-std`` once per volume
    (in the same order) or not at all; ``--volume-weights`` one number per volume."""
    from ..training.options import TrainVolume

    images, labels = list(args.image), list(args.labels)
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"--image given {n} time(s) but --labels {len(labels)}: give them in pairs, "
                         f"--image IMAGE --labels LABELS per training volume")
    per = {"coords": args.coords, "image_mean": args.image_mean, "image_std": args.image_std}
    for name, vals in per.items():
        if vals and len(vals) != n:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} given {len(vals)} time(s) for {n} training volumes (--image): give it once "
                             f"per volume, in the same order, or not at all")
    weights = args.volume_weights
    if weights is not None and len(weights) != n:
        raise ValueError(f"--volume-weights {','.join(map(str, weights))}: {len(weights)} weight(s) for {n} "
                         f"training volumes (--image); give one per volume")
    col = {name: (list(vals) if vals else [None] * n) for name, vals in per.items()}
    if n == 1 and weights is None:
        return {"image": images[0], "labels": labels[0], **{name: col[name][0] for name in per}}
    w = list(weights) if weights is not None else [None] * n
    return {"volumes": tuple(TrainVolume(images[i], labels[i], col["coords"][i], w[i], col["image_mean"][i],
                                         col["image_std"][i]) for i in range(n))}


def cmd_train(args) -> int:
    from ..training.train import TrainOptions, train

    opts = TrainOptions(
        **_volume_options(args), out=args.out, depth=args.depth,
        features=args.features, fov=args.fov, deltas=args.deltas, batch=args.batch, max_steps=args.max_steps,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, clip=args.clip, seed=args.seed,
        device=args.device, threads=args.threads, min_size=args.min_size, thresholds=args.thresholds,
        augment=not args.no_augment,
        lr_scaling=args.lr_scaling, warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
        checkpoint_secs=args.checkpoint_secs, keep_every=args.keep_every, log_every=args.log_every,
        resume=args.resume, init=args.init,
        progress=not args.quiet, tensorboard=not args.no_tensorboard, val_image=args.val_image,
        val_labels=args.val_labels, val_every=args.val_every, val_sequences=args.val_sequences,
        val_min_size=args.val_min_size,
    )
    res = train(opts)
    from ..training.distributed import detect_rank_world

    if detect_rank_world()[0] == 0 and not args.quiet:
        last = res.last
        extra = (f"; last loss {last['loss']:.4f}, precision {last['precision']:.3f}, recall {last['recall']:.3f}"
                 if last else "")
        print(f"trained to step {res.steps} in {res.seconds:.1f} s ({res.fov_per_s:.1f} FOV/s){extra}; "
              f"model in {res.out / 'checkpoint'}")
    return 0


def add_parsers(sub) -> None:
    from ..training.partitions import DEFAULT_MIN_SIZE, DEFAULT_RADIUS_ZYX, DEFAULT_THRESHOLDS

    th = ",".join(str(t) for t in DEFAULT_THRESHOLDS)
    table = flags()
    p = sub.add_parser("prepare", help="partition a label volume and write balanced training coordinates")
    p.add_argument("labels", help="ground-truth labels: file.h5:dataset")
    p.add_argument("out", help="output HDF5 file (datasets 'partitions' and 'coords')")
    p.add_argument("--radius", type=zyx_arg, default=DEFAULT_RADIUS_ZYX,
                   help="half-size Z,Y,X of the box for the same-object fraction (use fov//2 + deltas; default 24)")
    p.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
                   help=f"increasing fraction thresholds separating the partitions (default {th})")
    p.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                   help="objects with fewer voxels count as background (default 10000)")
    p.add_argument("--margin", type=zyx_arg, default=None,
                   help="coordinates keep this distance Z,Y,X from the border (default: the radius)")
    p.add_argument("--seed", type=int, default=0, help="seed of the oversampling and shuffling (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_prepare, flags=table)

    p = sub.add_parser("train", help="train a flood-filling network (resumable; DDP under mpiexec)")
    p.add_argument("--image", required=True, action="append",
                   help="training image: file.h5:dataset (repeat, each with its --labels, for several volumes)")
    p.add_argument("--labels", required=True, action="append",
                   help="training labels (same shape), one per --image in the same order: file.h5:dataset")
    p.add_argument("--out", required=True, help="run directory: metrics.csv/png, checkpoint/ (model.npz, state.pt)")
    p.add_argument("--coords", default=None, action="append",
                   help="`ffn prepare` output (file.h5[:coords]), once per volume in order; default: computed")
    p.add_argument("--volume-weights", type=_floats, default=None,
                   help="W1,W2,...: share of examples per volume (default: by number of coordinates)")
    p.add_argument("--depth", type=int, default=None, help="residual modules of the network (default 12)")
    p.add_argument("--features", type=int, default=None, help="feature maps per convolution (default 32)")
    p.add_argument("--fov", type=zyx_arg, default=None, help="field of view Z,Y,X, odd (default 33,33,33)")
    p.add_argument("--deltas", type=zyx_arg, default=None, help="FOV move Z,Y,X (default 8,8,8)")
    p.add_argument("--batch", type=int, default=4, help="independent move sequences per step and rank (default 4)")
    p.add_argument("--max-steps", type=int, default=10000, help="train until this many steps in total (default 10000)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd (the reference's plain gradient descent) or adam (default sgd)")
    p.add_argument("--lr", type=float, default=0.001, help="learning rate before --lr-scaling (default 0.001)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--clip", type=float, default=0.7,
                   help="clip each gradient entry to +-CLIP (reference 0.7; 0 disables)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, coordinates and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or xpu[:N] (default auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default; cores / ranks per node under mpiexec)")
    p.add_argument("--min-size", type=int, default=10000,
                   help="on-the-fly partitions: smaller objects are background (default 10000)")
    p.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
                   help="on-the-fly partitions: fraction thresholds (default as `ffn prepare`)")
    p.add_argument("--image-mean", type=float, default=None, action="append",
                   help="use this intensity mean instead of the measured one (once per volume)")
    p.add_argument("--image-std", type=float, default=None, action="append",
                   help="use this intensity std instead of the measured one (once per volume)")
    p.add_argument("--no-augment", action="store_true", help="no random flips / y-x transposition")
    p.add_argument("--lr-scaling", choices=["linear", "sqrt", "none"], default="sqrt",
                   help="learning rate x ranks (linear), x sqrt(ranks) (sqrt, default) or unscaled (none)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="ramp the learning rate linearly from --lr to the scaled one over this many steps")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="steps between checkpoints (0: only time-based and at the end; default 1000)")
    p.add_argument("--checkpoint-secs", type=float, default=600.0,
                   help="seconds between checkpoints (0: off; default 600)")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep the weights every N steps as OUT/models/model-STEP.npz, to choose one by "
                        "segmenting held-out labels (0: only the latest; default 0)")
    p.add_argument("--log-every", type=int, default=100, help="steps between rows of metrics.csv (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (fresh start if none)")
    p.add_argument("--init", default=None,
                   help="fine-tune this model (.npz, run directory, or 'bundled'): its depth, features, FOV, deltas")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument("--val-image", default=None,
                   help="held-out image for validation (file.h5:dataset; normalised by its own mean/std)")
    p.add_argument("--val-labels", default=None, help="its labels (same shape)")
    p.add_argument("--val-every", type=int, default=1000, help="steps between validations (0: only at the end)")
    p.add_argument("--val-sequences", type=int, default=200,
                   help="held-out move sequences per validation (the same ones each time; default 200)")
    p.add_argument("--val-min-size", type=int, default=1000,
                   help="held-out objects smaller than this are background (default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=cmd_train, flags=table)
