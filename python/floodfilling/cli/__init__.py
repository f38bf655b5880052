"""``ffn``: the command line, a thin layer over the library.

Errors the user can fix (bad paths, datasets, options, model files) print one line
``ffn: error: ...`` naming the culprit and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from .. import __version__
from .train import add_parsers as add_training_parsers
from .args import _FLAGS, _Parser, _bbox, check_numbers, with_flags, zyx_arg  # noqa: F401 (zyx_arg: API)

log = logging.getLogger("floodfilling")


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model file (.npz) or training directory; default: bundled FIB-25")
    p.add_argument("--config", default=None, help="TOML file with [inference] options (see `ffn config`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one inference option (repeatable), e.g. --set min_segment_size=500; "
                        "refine.KEY=VALUE for a [refine] option")
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N] or xpu[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the network (0: all cores)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="network precision; fp32 is exact, bf16 is faster on CPUs/GPUs with bf16 units")
    p.add_argument("--resident", choices=["auto", "on", "off"], default=None,
                   help="keep image and canvases on the device (auto: on for cuda/xpu, off for cpu)")
    p.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune"], default=None,
                   help="torch.compile the network (reduce-overhead: CUDA graphs); off by default")
    p.add_argument("--normalise", choices=["standardise", "histogram", "fixed"], default=None,
                   help="intensity normalisation: standardise (default: map the volume's mean/std onto the "
                        "model's), histogram (match quantiles), fixed (the reference's (x - mean) / std)")
    p.add_argument("--image-mean", type=float, default=None, help="fixed intensity mean (implies --normalise fixed)")
    p.add_argument("--image-std", type=float, default=None, help="fixed intensity std (implies --normalise fixed)")
    p.add_argument("--checkpoint-interval", type=float, default=None,
                   help="seconds between resumable-state saves (0: off; default 60)")


def _build_config(args):
    from ..config import ConfigError, InferenceConfig

    cfg = InferenceConfig.from_toml(args.config) if args.config else InferenceConfig()
    overrides = {k: v for k, v in _set_options(args).items() if not k.startswith("refine.")}
    d = cfg.to_dict()
    d.update(overrides)
    cfg = InferenceConfig.from_dict(d, "--set")
    normalise = args.normalise
    if normalise is None and (args.image_mean is not None or args.image_std is not None):
        normalise = "fixed"
    if normalise not in (None, "fixed") and (args.image_mean is not None or args.image_std is not None):
        raise ConfigError(f"--image-mean/--image-std need --normalise fixed, not {normalise}")
    flags = {"device": ("--device", args.device), "threads": ("--threads", args.threads),
             "precision": ("--precision", args.precision), "resident": ("--resident", args.resident),
             "compile": ("--compile", args.compile),
             "checkpoint_interval_s": ("--checkpoint-interval", args.checkpoint_interval),
             "image_mean": ("--image-mean", args.image_mean), "image_std": ("--image-std", args.image_std)}
    overrides = {"normalise": normalise}
    for name, (flag, value) in flags.items():  # the typed check of each option, worded with its flag
        if value is not None:
            overrides[name] = InferenceConfig.check_option(name, value, label=f"{flag} {value!r}")
    return cfg.with_overrides(**overrides)


def _set_options(args) -> dict:
    """``--set KEY=VALUE`` items as {KEY: typed value} (TOML syntax; bare words are strings)."""
    from ..config import ConfigError

    out = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _build_refine(args):
    """The [refine] options (config file, then --set refine.KEY=VALUE) when --refine is given;
    None otherwise (refine options without --refine are an error)."""
    from ..config import ConfigError, RefineConfig

    given = {k.split(".", 1)[1]: v for k, v in _set_options(args).items() if k.startswith("refine.")}
    if getattr(args, "refine_model", None) is not None:  # --refine-model M is refine.model = M
        if not getattr(args, "refine", False):
            raise ConfigError(f"--refine-model {args.refine_model}: needs --refine")
        given["model"] = args.refine_model
    if not getattr(args, "refine", False):
        if given:
            raise ConfigError(f"--set refine.{next(iter(given))}: refine options need --refine")
        return None
    cfg = RefineConfig.from_toml(args.config) if args.config else RefineConfig()
    return RefineConfig.from_dict({**cfg.to_dict(), **given}, "--set refine.")


def _parse_value(v: str):
    from ..config import tomllib

    try:
        return tomllib.loads(f"x = {v}")["x"]
    except Exception:  # noqa: BLE001 - bare words are strings
        return v


def cmd_segment(args) -> int:
    from ..inference.segment import segment

    if args.block is None and args.workdir is None:  # block-inference options without block inference
        for flag, value in (("--inflight", args.inflight), ("--halo", args.halo)):
            if value is not None:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise ValueError(f"{flag} {shown}: only with block inference (--block or --workdir)")
    cfg = _build_config(args)
    refine = _build_refine(args)
    if args.block is not None or args.workdir is not None:
        from ..distributed.run import segment_blocks

        segment_blocks(args.image, args.out, block=args.block, halo=args.halo, workdir=args.workdir,
                       model=args.model, config=cfg, bbox=_bbox(args.bbox), overwrite=args.overwrite,
                       inflight=args.inflight, progress=not args.quiet, refine=refine)
        return 0
    res = segment(args.image, args.out, model=args.model, config=cfg, bbox=_bbox(args.bbox), overwrite=args.overwrite,
                  progress=not args.quiet, refine=refine)
    c = res.counters  # a refined result's objects, and its flood's
    objects = f"{int(c['refine_objects'])} objects (the flood: {int(c['objects'])})" if "refine_objects" in c \
        else f"{int(c['objects'])} objects"
    log.info("%s, %d FOV steps, %.1f s", objects, c["steps"], res.seconds)
    if not args.quiet:
        print(f"wrote {args.out}: {objects}, {int(c['steps'])} FOV steps, {res.seconds:.1f} s")
    return 0


def cmd_train_refine(args) -> int:
    from ..inference.train_refine import train_refine

    if len(args.volumes) % 2:
        raise ValueError(f"train-refine takes IMAGE LABELS pairs: got {len(args.volumes)} volumes "
                         f"(the last, {args.volumes[-1]}, has no partner)")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold}: expected a probability in [0, 1]")
    cfg = _build_config(args)
    given = args.config or any(k.startswith("refine.") for k in _set_options(args))
    refine = _build_refine(argparse.Namespace(**{**vars(args), "refine": True})) if given else None  # None: LEARNED_BASE
    pairs = list(zip(args.volumes[::2], args.volumes[1::2]))
    say = None if args.quiet else (lambda text: print(f"train-refine: {text}", file=sys.stderr, flush=True))
    m = train_refine(pairs, args.out, model=args.model, config=cfg, refine=refine, base=args.base,
                     threshold=args.threshold, overwrite=args.overwrite, progress=not args.quiet, report=say,
                     boundary=not args.no_boundary_map)
    if not args.quiet:
        print(f"wrote {args.out}: trained on {len(pairs)} volume(s), {m.training['examples']} pairs "
              f"({m.training['merge_examples']} merge), base {m.base}, threshold {m.threshold}, "
              f"boundary map {'yes' if m.boundary else 'no (watershed of the image)'}")
    return 0


def cmd_evaluate(args) -> int:
    from .. import evaluation, volumes

    with volumes.open_volume(args.seg) as a, volumes.open_volume(args.gt) as b:
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{args.seg} has shape {tuple(a.shape)} but {args.gt} has shape {tuple(b.shape)}")
        for spec, v in ((args.seg, a), (args.gt, b)):
            if v.dtype.kind not in "iu":
                raise ValueError(f"{spec}: dtype {v.dtype} is not a label (integer) type")
        table = evaluation.contingency_volumes(a, b)  # slab by slab: volumes larger than memory are fine
        names = (str(a.spec), str(b.spec))  # negative ids are refused by evaluate, naming these
    res = evaluation.evaluate(None, None, gt_zero=args.gt_zero, top=args.top, table=table, names=names)
    print(json.dumps(res, indent=2) if args.json else evaluation.format_report(res))
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    from ..evaluation import format_report

    r = run_demo(Path(args.out), device=args.device or "auto", threads=args.threads or 0, progress=not args.quiet)
    c = r.segment.counters
    print(f"segmented the bundled FIB-25 crop: {int(c['objects'])} objects, {int(c['steps'])} FOV steps, "
          f"{r.segment.seconds:.1f} s")
    print(format_report(r.evaluation))
    print(f"wrote {r.segmentation_path}, {r.png_path}, {r.report_path}")
    return 0


def cmd_config(args) -> int:
    from ..config import InferenceConfig, RefineConfig

    print(InferenceConfig().to_toml() + "\n" + RefineConfig().to_toml(), end="")
    return 0


def cmd_consensus(args) -> int:
    from ..consensus import consensus

    t = consensus(args.a, args.b, args.out, min_size=args.min_size, overwrite=args.overwrite)
    n = int((t.out_ids > 0).sum())
    print(f"{args.out}: {len({int(v) for v in t.out_ids if v})} objects from {len(t.pairs)} pieces "
          f"({n} kept, {len(t.pairs) - n} removed)")
    return 0


def cmd_export(args) -> int:
    from ..export import export

    res = None
    if args.resolution:
        try:
            res = tuple(float(v) for v in args.resolution.split(","))
        except ValueError:
            raise ValueError(f"--resolution {args.resolution!r}: expected z,y,x in nm") from None
    opts = _mesh_options(args)  # looking at the result: --meshes, --skeletons
    info = export(args.volume, args.dest, layer_type=args.type, levels=args.levels, resolution_zyx=res,
                  bbox=_bbox(args.bbox), overwrite=args.overwrite, meshes=opts, parallel=args.parallel,
                  join=args.join, progress=not args.quiet)
    extra = [k for k, key in (("meshes", "mesh"), ("skeletons", "skeletons"), ("segment properties",
                                                                             "segment_properties")) if key in info]
    print(f"{args.dest}: {info['type']} layer, {len(info['scales'])} level(s): "
          + ", ".join(f"{sc['key']} {'x'.join(map(str, sc['size']))}" for sc in info["scales"])
          + (f"; with {', '.join(extra)}" if extra else ""))
    return 0


# ---- looking at the result: the mesh/skeleton flags of ffn export ---------------------------------
def _mesh_options(args):
    """--meshes / --skeletons (and their options) as MeshOptions; None without either."""
    if not (args.meshes or args.skeletons):
        for flag, given in (("--parallel", args.parallel != 1), ("--join", args.join),
                            ("--skeleton-dust", args.skeleton_dust is not None)):
            if given:
                raise ValueError(f"{flag}: only with --meshes or --skeletons")
        return None
    from ..meshes import MeshOptions

    kw = {} if args.skeleton_dust is None else {"skeleton_dust": args.skeleton_dust}
    return MeshOptions(meshes=args.meshes, skeletons=args.skeletons, **kw)


def _add_mesh_flags(p) -> None:
    p.add_argument("--meshes", action="store_true", help="also multi-resolution meshes of every object (igneous; "
                   "needs floodfilling[meshes])")
    p.add_argument("--skeletons", action="store_true", help="also skeletons of every object (igneous/kimimaro; "
                   "needs floodfilling[meshes])")
    p.add_argument("--parallel", type=int, default=1, help="mesh/skeleton worker processes here (default 1; 0: "
                   "none, only nodes that --join work)")
    p.add_argument("--join", action="store_true", help="work on this export started on another node (same "
                   "arguments, DEST on a shared file system) until it is finished")
    p.add_argument("--skeleton-dust", type=int, default=None, help="objects with fewer voxels get no skeleton "
                   "(default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_agglomerate(args) -> int:
    from ..agglomerate import AgglomerationOptions, agglomerate
    from ..config import ConfigError, RefineConfig

    refine = [k for k in _set_options(args) if k.startswith("refine.")]
    if refine:  # agglomerate runs no refinement: a refine option here would be ignored, so it is refused
        key = refine[0].split(".", 1)[1]
        known = ", ".join(f.name for f in fields(RefineConfig))
        what = "is not a refine option" if key not in {f.name for f in fields(RefineConfig)} else \
            "only applies to `ffn segment --refine`"
        raise ConfigError(f"--set {refine[0]}: {what}; agglomerate takes no refine options (known refine "
                          f"options: {known})")
    cfg = _build_config(args)
    opts = AgglomerationOptions(box=args.box, min_contact=args.min_contact,
                                merge_iou=args.merge_iou, within=args.within)
    t = agglomerate(args.image, args.seg, args.out, model=args.model, config=cfg, opts=opts,
                    overwrite=args.overwrite, inflight=args.inflight)
    print(f"{args.out}: {int(t['merged'].sum())} of {len(t)} candidate pairs merged")
    return 0


def cmd_status(args) -> int:
    from ..distributed.status import block_status, format_status

    if args.devices:
        return _devices_status(args)
    if args.workdir is None:
        raise ValueError("status: give the --workdir of a block run, or --devices")
    st = block_status(args.workdir)
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


def _devices_status(args) -> int:
    """``ffn status --devices``: the kernel launchers (OpenMP, SYCL) and torch's devices."""
    import torch

    from .. import kernels

    rep = kernels.report()
    rep["torch"] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                    "xpu": bool(getattr(torch, "xpu", None) and torch.xpu.is_available())}
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    t = rep["torch"]
    print(kernels.format_report(rep))
    print(f"torch   {t['version']}: cpu; cuda {'yes' if t['cuda'] else 'no'}; xpu {'yes' if t['xpu'] else 'no'}")
    return 0


def cmd_view(args) -> int:
    import time

    from ..viewer import make_viewer

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    viewer, layers = make_viewer(args.image, args.labels, bbox=_bbox(args.bbox), bind_address=args.bind, port=args.port,
                                 show=_show(args.show))
    url = viewer.get_viewer_url()
    # Ctrl-C (SIGINT) stops serving even where the shell started us with SIGINT ignored (a
    # background job of a non-interactive shell), in which case Python would never raise it;
    # the handler is in place before the URL is shown, so a Ctrl-C right after it stops cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(url, flush=True)
        print(f"serving {', '.join(lay.name for lay in layers)}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import neuroglancer

        neuroglancer.stop()
        return 0


# ---- looking at the result: ffn stats (per-object table) --------------------------------------
def cmd_stats(args) -> int:
    from ..stats import object_table, write_table

    if os.path.lexists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out}: exists; pass --overwrite to replace it")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: is a directory")
    t = object_table(args.seg, labels=args.labels, skeletons=args.skeletons)
    write_table(t, args.out)
    print(f"{args.out}: {len(t.ids)} objects")
    return 0


def _add_stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="one CSV row per object: voxels, volume, bounding box, centroid, border "
                                     "flag [, cable length] [, best-overlapping gt body]")
    p.add_argument("seg", help="segmentation: file.h5:dataset or a Zarr array")
    p.add_argument("--labels", default=None, help="ground truth of the same shape: adds gt_id, gt_fraction")
    p.add_argument("--skeletons", default=None, help="layer written by `ffn export --skeletons`: adds cable_length_nm")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_stats)


def _show(text: str):
    """--show N|all as the viewer's show (None: all)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"--show {text}: expected a number of objects >= 0 or all")
    return n


def _add_segment_parser(sub) -> None:
    """``ffn segment``."""
    p = sub.add_parser("segment", help="segment a volume with a flood-filling network")
    p.add_argument("image", help="input image: file.h5:dataset or a Zarr array")
    p.add_argument("out", help="output: file.h5:dataset or dir.zarr/array (uint32 segmentation + "
                   "_origins, _overlaps)")
    p.add_argument("--bbox", default=None, help="only this box of the image: z0,y0,x0:z1,y1,x1 (half-open)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and its resume state)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--block", type=zyx_arg, default=None, help="block inference: core block size z,y,x (e.g. "
                   "128,256,256); runs under mpiexec too")
    p.add_argument("--halo", type=zyx_arg, default=None,
                   help="block overlap on each side z,y,x (default: the FOV radius + deltas)")
    p.add_argument("--refine", action="store_true", help="after the exact flood, the refinement (by default the "
                   "learned one of the bundled model; see `ffn config`); the flood is kept as <out>_forward")
    p.add_argument("--refine-model", default=None, metavar="M",
                   help="with --refine: who decides: 'bundled' (default), an `ffn train-refine` model file, or "
                        "'hand' (the hand steps of the [refine] options) (refine.model)")
    p.add_argument("--workdir", default=None, help="block inference: directory for per-block results and the "
                   "manifest (rerun to resume)")
    p.add_argument("--inflight", type=int, default=None,
                   help="blocks in flight per process sharing each network call (default: 1 on CPU, 16 on GPU: two groups of 8 alternating); "
                        "K >= 1")
    _add_inference_options(p)
    p.set_defaults(func=cmd_segment)


def _add_train_refine_parser(sub) -> None:
    """``ffn train-refine``."""
    p = sub.add_parser("train-refine", help="train the learned refinement (--refine-model) on labelled volumes: "
                       "the flood of the model in use, features of touching objects, a classifier")
    p.add_argument("volumes", nargs="+", metavar="IMAGE LABELS",
                   help="pairs of image and labels, e.g. a.h5:raw a.h5:labels b.h5:raw b.h5:labels (labels: 0 = "
                        "boundary / unlabelled)")
    p.add_argument("--out", required=True, metavar="M", help="the refine model file to write (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--base", choices=["cores", "gap_cores", "watershed"], default="cores",
                   help="what merging starts from: the watershed of the flood and every gap core (default), of the "
                        "flood with the gap objects step's network floods and the cores left, or of the flood alone")
    p.add_argument("--threshold", type=float, default=0.5, help="merge probability a pair needs (default 0.5)")
    p.add_argument("--no-boundary-map", action="store_true",
                   help="no learned boundary map: the base's watershed runs on the image (the model file before 2026-12)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _add_inference_options(p)
    p.set_defaults(func=cmd_train_refine)


def _add_evaluate_parser(sub) -> None:
    """``ffn evaluate``."""
    p = sub.add_parser("evaluate", help="compare a segmentation with ground truth (VI, adapted Rand)")
    p.add_argument("seg", help="segmentation: file.h5:dataset")
    p.add_argument("gt", help="ground truth labels: file.h5:dataset")
    p.add_argument("--gt-zero", choices=["ignore", "label"], default="ignore",
                   help="ignore: voxels with gt 0 are left out (CREMI/SNEMI convention, default); "
                        "label: 0 is an ordinary label")
    p.add_argument("--top", type=int, default=10, help="how many of the largest merges and splits to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=cmd_evaluate)


def _add_demo_parser(sub) -> None:
    """``ffn demo``."""
    p = sub.add_parser("demo", help="segment the bundled FIB-25 crop with the bundled model and evaluate it")
    p.add_argument("--out", default="ffn-demo", help="output directory (segmentation .h5 and a PNG)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N] or xpu[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the network (0: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def _add_consensus_parser(sub) -> None:
    """``ffn consensus``."""
    p = sub.add_parser("consensus", help="split consensus of two segmentations (e.g. a run and its inverted-seed "
                                         "rerun): keep only what both agree on")
    p.add_argument("a", help="first segmentation (its ids and origins are kept where the runs agree)")
    p.add_argument("b", help="second segmentation of the same volume")
    p.add_argument("out", help="output: file.h5:dataset or dir.zarr/array")
    p.add_argument("--min-size", type=int, default=0, help="pieces with fewer voxels become 0 (default 0: keep all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_consensus)


def _add_agglomerate_parser(sub) -> None:
    """``ffn agglomerate``."""
    p = sub.add_parser("agglomerate", help="merge touching objects that the network, flooding from each, finds "
                                           "to be one (FFN resegmentation)")
    p.add_argument("image", help="image: file.h5:dataset or a Zarr array")
    p.add_argument("seg", help="oversegmentation of it (e.g. an `ffn consensus` output)")
    p.add_argument("out", help="output: file.h5:dataset or dir.zarr/array")
    p.add_argument("--within", default=None,
                   help="only pairs lying mostly in one object of this segmentation (e.g. the forward run)")
    p.add_argument("--box", type=zyx_arg, default="49,49,49", help="box z,y,x flooded around each contact (>= the FOV)")
    p.add_argument("--min-contact", type=int, default=10, help="face-adjacent voxel pairs that make a candidate")
    p.add_argument("--merge-iou", type=float, default=0.5, help="merge when the two floods overlap this much (IoU)")
    p.add_argument("--inflight", type=int, default=None,
                   help="boxes sharing each network call (default: 1 on CPU, 16 on GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_inference_options(p)
    p.set_defaults(func=cmd_agglomerate)


def _add_status_parser(sub) -> None:
    """``ffn status``."""
    p = sub.add_parser("status", help="progress of a block-inference run (blocks done, running, time left), "
                                      "read from its --workdir; --devices: the kernel launchers and devices")
    p.add_argument("workdir", nargs="?", help="the --workdir of an `ffn segment --block` run")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--devices", action="store_true",
                   help="instead: the kernel launchers (OpenMP, SYCL: device, driver, fp64, cache, compile "
                        "times) and torch's devices")
    p.set_defaults(func=cmd_status)


def _add_export_parser(sub) -> None:
    """``ffn export``."""
    p = sub.add_parser("export", help="write a volume as a neuroglancer precomputed layer with a downsampled "
                                      "pyramid (needs floodfilling[export])")
    p.add_argument("volume", help="file.h5:dataset or a Zarr array (labels -> segmentation layer, else image)")
    p.add_argument("dest", help="output directory, or a CloudVolume URL (gs://..., s3://...)")
    p.add_argument("--type", choices=["auto", "segmentation", "image"], default="auto",
                   help="layer type (auto: integer types other than uint8 are segmentations)")
    p.add_argument("--levels", type=int, default=None,
                   help="downsampled levels (default: until the largest axis is <= 64 voxels)")
    p.add_argument("--resolution", default=None, help="voxel size z,y,x in nm (default: resolution_zyx_nm or 1)")
    p.add_argument("--bbox", default=None, help="only this box: z0,y0,x0:z1,y1,x1 (half-open); placed at its offset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing layer at DEST")
    _add_mesh_flags(p)  # looking at the result
    p.set_defaults(func=cmd_export)


def _add_view_parser(sub) -> None:
    """``ffn view``."""
    p = sub.add_parser("view", help="look at an image and segmentations in neuroglancer (prints the URL; "
                                    "needs floodfilling[viewer])")
    p.add_argument("image", help="image: file.h5:dataset or a Zarr array")
    p.add_argument("labels", nargs="*", help="label volumes of the image's shape: segmentations, ground truth")
    p.add_argument("--bbox", default=None, help="only this box: z0,y0,x0:z1,y1,x1 (half-open)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to serve on (0.0.0.0: reachable from other hosts, e.g. through an SSH tunnel)")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--show", default="0", help="meshes of the N largest objects of each segmentation shown in the "
                   "3-D panel (all: every object; default 0: none, double-click objects to show them)")
    p.set_defaults(func=cmd_view)


def _add_config_parser(sub) -> None:
    """``ffn config``."""
    p = sub.add_parser("config", help="print the default inference and refine options as TOML (with comments)")
    p.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ffn", description="Flood-Filling Networks for connectomics")
    ap.add_argument("--version", action="version", version=f"floodfilling {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_segment_parser(sub)
    _add_train_refine_parser(sub)
    _add_evaluate_parser(sub)
    _add_demo_parser(sub)
    _add_consensus_parser(sub)
    _add_agglomerate_parser(sub)
    _add_status_parser(sub)
    _add_export_parser(sub)
    _add_view_parser(sub)
    _add_stats_parser(sub)  # looking at the result
    _add_config_parser(sub)
    add_training_parsers(sub)  # ffn prepare, ffn train (cli/train.py)
    return ap
    return ap


# What a rerun does after Ctrl-C, per command (others start over).
_INTERRUPTED = {"segment": "rerun the same command to resume", "demo": "rerun the same command to resume",
                "train": "rerun with --resume to continue"}


def _quiet_stdout() -> None:
    """Points stdout at /dev/null (its reader is gone: nothing more to say, and Python's flush at
    exit must not fail on the closed pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (in-process capture): nothing to redirect
        pass


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
        sys.stdout.flush()
    except SystemExit as exc:  # argument errors (one line, see _Parser), --help, --version
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
            return 128 + int(signal.SIGPIPE)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + int(signal.SIGPIPE)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        check_numbers(args)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # The reader of stdout left (`ffn evaluate ... | head -1`): end quietly with the shell's
        # status of a process killed by SIGPIPE (128 + 13), as `yes | head` does; cleanups ran.
        _quiet_stdout()
        return 128 + int(signal.SIGPIPE)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if args.verbose >= 2:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"ffn: error: {with_flags(msg, {**_FLAGS, **getattr(args, 'flags', {})})}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(getattr(args, "command", None) or "")
        print("ffn: interrupted" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
