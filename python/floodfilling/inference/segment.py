"""``segment``: one volume (or a bounding box of it) with the reference semantics.

Resumable: between objects, at most every ``checkpoint_interval_s`` seconds, the state
(segmentation, seed index, origins, overlaps, counters) is written atomically to
``<OUT file>.<dataset>.resume.npz`` (one per output dataset) together with a manifest of what
is being computed (image and the digest of its voxels in the box, bbox, model, the options of
stages "flood" and "postprocess"). Rerunning the same command continues from there and produces the
identical segmentation; a manifest that does not match is an error, never a silent mix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import boxes, disk, kernels, locks, outputs, results, volumes
from .. import normalise as norm_mod
from ..config import InferenceConfig, RefineConfig
from ..model import load_model, select_device
from ..normalise import Normalisation, resolve_normalisation
from ..postprocess import postprocess
from . import seeds as seeds_mod
from ..source import image_source
from ..results import (Origin, file_digest, image_digest, origins_table, overlaps_dict, overlaps_table, result_names)
from .canvas import Canvas, CanvasState
from ..geometry import fov_margin, smaller_than_fov
from .engine import Job, inflight_on, make_predictor, run_jobs, subvolume_canvas
from .predictor import Predictor
from .refine import FloodNetwork, check_gap_box, refine_array

log = logging.getLogger(__name__)


class SegmentError(ValueError):
    """A user-facing problem with the inputs of ``segment`` (message names the culprit)."""


@dataclass
class SegmentResult:
    segmentation: np.ndarray  # uint32, 0 = unsegmented
    origins: dict[int, Origin]
    overlaps: dict[int, tuple[np.ndarray, np.ndarray]]
    counters: dict[str, float]
    seconds: float
    normalisation: dict[str, Any]


def normalise_image(raw: np.ndarray, mean: float, std: float, source: str = "image") -> np.ndarray:
    """(raw - mean) / std as float32; NaN/inf input is an error naming ``source``."""
    return Normalisation("fixed", mean, std).apply(raw, source)


# -- resumable state ---------------------------------------------------------------------

def state_path_for(out_path: str | os.PathLike, dataset: str | None = None) -> Path:
    """The resume state of output dataset ``dataset`` beside the output file or store:
    ``out.h5.<dataset>.resume.npz`` / ``out.zarr.<array>.resume.npz`` (one per dataset, so
    runs into two datasets of one file keep their own states; ``/`` in a name becomes ``_``);
    without ``dataset``, :func:`legacy_state_path`."""
    p = Path(out_path)
    if dataset:
        return p.with_name(f"{p.name}.{str(dataset).strip('/').replace('/', '_')}.resume.npz")
    return legacy_state_path(p)


def legacy_state_path(out_path: str | os.PathLike) -> Path:
    """``out.h5.resume.npz``: where earlier versions kept the state of any dataset of an HDF5
    output (still resumed from when its manifest matches; see :func:`_segment_locked`)."""
    p = Path(out_path)
    return p.with_name(p.name + ".resume.npz")


def state_matches(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the resume state at ``path`` was saved for ``manifest`` (False when unreadable)."""
    try:
        with np.load(path) as z:
            return json.loads(str(z["manifest"])) == json.loads(json.dumps(manifest, sort_keys=True))
    except Exception:  # noqa: BLE001 - unreadable: not this run's
        return False


def save_state(path: Path, canvas: Canvas, manifest: dict[str, Any]) -> None:
    st = canvas.state
    ids = np.array(sorted(st.origins), dtype=np.int64)
    org = np.array([list(st.origins[i].seed_zyx) + [st.origins[i].steps] for i in ids], dtype=np.int64).reshape(-1, 4)
    secs = np.array([st.origins[i].seconds for i in ids], dtype=np.float64)
    ov_rows = [(i, a, c) for i in ids for a, c in zip(*st.overlaps.get(int(i), ((), ())))]
    ov = np.array(ov_rows, dtype=np.int64).reshape(-1, 3)
    with disk.atomic_path(path) as tmp, open(tmp, "wb") as f:  # the previous state stays until this one is complete
        np.savez(f, segmentation=st.segmentation, seeds=canvas.seeds, seed_index=st.seed_index,
                 fill_passes=st.fill_passes, max_id=st.max_id, origin_ids=ids, origins=org, origin_seconds=secs,
                 overlaps=ov, counters=json.dumps(st.counters), manifest=json.dumps(manifest, sort_keys=True))


def load_state(path: Path, manifest: dict[str, Any]) -> tuple[CanvasState, np.ndarray]:
    try:
        with np.load(path) as z:
            saved = json.loads(str(z["manifest"]))
            if saved != json.loads(json.dumps(manifest, sort_keys=True)):
                diff = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
                why = "; the image changed since it was saved" if "image_digest" in diff else ""
                raise SegmentError(f"{path}: resume state belongs to a different run (differs in "
                                   f"{', '.join(diff)}{why}); delete it or pass overwrite=True")
            st = CanvasState(segmentation=z["segmentation"].copy(), seed_index=int(z["seed_index"]),
                             max_id=int(z["max_id"]), counters=json.loads(str(z["counters"])),
                             fill_passes=int(z["fill_passes"]) if "fill_passes" in z.files else 0)
            for i, row, s in zip(z["origin_ids"].tolist(), z["origins"].tolist(), z["origin_seconds"].tolist()):
                st.origins[i] = Origin(tuple(row[:3]), int(row[3]), float(s))
            st.overlaps = overlaps_dict(z["overlaps"], st.origins)
            return st, z["seeds"].copy()
    except SegmentError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SegmentError(f"{path}: unreadable resume state ({exc}); delete it or pass overwrite=True") from None


# -- running -------------------------------------------------------------------------------

class _BetweenSeeds:
    """Called by the canvas after each seed: advances the progress bar (seeds, with objects and
    FOV steps) and saves the resume state at most every ``interval_s`` seconds."""

    def __init__(self, canvas: Canvas, state_path: Path | None, manifest: dict, interval_s: float,
                 progress: bool) -> None:
        self.state_path, self.manifest, self.interval_s = state_path, manifest, interval_s
        self.last_save = time.monotonic()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(canvas.seeds), initial=canvas.state.seed_index, unit="seed", desc="segment",
                            dynamic_ncols=True)

    def __call__(self, canvas: Canvas) -> None:
        st = canvas.state
        if self.bar is not None:
            self.bar.update(st.seed_index - self.bar.n)
            self.bar.set_postfix(objects=st.counters["objects"], steps=st.counters["steps"], refresh=False)
        if self.state_path is not None and time.monotonic() - self.last_save >= self.interval_s:
            save_state(self.state_path, canvas, self.manifest)
            self.last_save = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Prepared:
    """What a run makes once and its refinement reuses: the normalised image and the predictor
    (the prepared network: on its device, compiled with ``compile``)."""

    image: np.ndarray  # float32, normalised
    predictor: Predictor


def segment_array(raw: np.ndarray, *, model=None, config: InferenceConfig | None = None,
                  resolution_zyx=(1, 1, 1), state_path: Path | None = None, manifest: dict | None = None,
                  progress: bool = False, net_and_info=None, normalisation: Normalisation | None = None,
                  source: str = "image", seeds: np.ndarray | None = None,
                  policy: seeds_mod.SeedPolicy | None = None, keep_final_state: bool = False,
                  prepared: Prepared | None = None) -> SegmentResult:
    """Segments an in-memory raw volume. ``state_path`` enables resumable runs;
    ``normalisation`` (default: from ``config`` and the statistics of ``raw``); ``seeds``
    ((N, 3) in order; default: those of ``policy``, itself by default the config's seed policy,
    :func:`~floodfilling.inference.seeds.policy_of`); ``keep_final_state``: also save
    the finished flood's state, so that a run killed in a later phase (``--refine``) resumes
    after the flood instead of redoing its end (the caller deletes the state once written);
    ``prepared``: the normalised image and the predictor, made by the caller (who reuses them)."""
    cfg = (config or InferenceConfig()).validate()
    with kernels.launcher(cfg.kernels):
        return _segment_array(raw, model, cfg, resolution_zyx, state_path, manifest, progress, net_and_info,
                              normalisation, source, seeds, policy, keep_final_state, prepared)


def _segment_array(raw, model, cfg: InferenceConfig, resolution_zyx, state_path, manifest, progress, net_and_info,
                   normalisation, source, seeds, policy, keep_final_state, prepared) -> SegmentResult:
    t0 = time.perf_counter()
    net, info = net_and_info or load_model(model, "cpu")
    if raw.ndim != 3:
        raise SegmentError(f"image must be 3-D, got shape {raw.shape}")
    if smaller_than_fov(raw.shape, info.fov_zyx):
        raise SegmentError(f"image of shape {raw.shape} is smaller than the model's FOV {info.fov_zyx}")
    try:
        norm = normalisation or resolve_normalisation(cfg, info, raw, source)
        image = prepared.image if prepared is not None else norm.apply(raw, source)
    except norm_mod.NormalisationError as exc:
        raise SegmentError(str(exc)) from None
    state = None
    if state_path is not None and state_path.exists():
        state, seeds = load_state(state_path, manifest or {})
        log.info("resuming from %s: seed %d of %d, %d objects", state_path, state.seed_index, len(seeds),
                 len(state.origins))
    elif seeds is None and policy is not None:
        seeds = policy.seeds(image, fov_margin(info.fov_zyx), resolution_zyx)
    predictor = prepared.predictor if prepared is not None else \
        make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, threads=cfg.threads)
    canvas = subvolume_canvas(predictor, image, cfg, info, resolution_zyx, seeds=seeds, state=state)
    between = _BetweenSeeds(canvas, state_path if cfg.checkpoint_interval_s > 0 else None, manifest or {},
                            cfg.checkpoint_interval_s, progress)
    canvas.on_object_done = between
    try:  # the engine's driver loop, as for blocks and agglomeration (one canvas in flight)
        run_jobs([Job("volume", lambda: canvas)], predictor, inflight=1)
    finally:
        canvas.release()
        between.close()
    seg = canvas.final_segmentation()
    cnt = canvas.state.counters
    nan_steps, all_steps = int(cnt.get("nan_steps", 0)), int(cnt.get("steps", 0))
    if nan_steps and not seg.any():  # no object, and NaN predictions: not an empty volume
        what = ("every prediction was NaN" if nan_steps >= all_steps else "no object was made and predictions "
                "were NaN")
        if state_path is not None and state_path.exists():
            state_path.unlink()  # no object to resume: a fixed model must start afresh
        raise SegmentError(f"{source}: {what} ({nan_steps} of {all_steps} FOV steps): the model or the "
                           f"normalised image produces NaN")
    if keep_final_state and between.state_path is not None:
        save_state(state_path, canvas, manifest or {})
    norm_mod.check_dominant_object(seg, norm, f"{source} ({'x'.join(map(str, seg.shape))} voxels)")
    origins, overlaps = canvas.state.origins, canvas.state.overlaps
    if cfg.split_components or cfg.dust_size > 0:
        seg, origins = postprocess(seg, origins, split=cfg.split_components, dust_size=cfg.dust_size)
        overlaps = {}  # refer to pre-processing ids: dropped
    return SegmentResult(seg, origins, overlaps, dict(canvas.state.counters), time.perf_counter() - t0,
                         norm.to_dict())


def segment(image_spec: str | volumes.VolumeSpec, out_spec: str, *, model: str | None = None,
            config: InferenceConfig | None = None, bbox: boxes.BBox | None = None, overwrite: bool = False,
            progress: bool = False, refine: RefineConfig | None = None) -> SegmentResult:
    """Segments ``image_spec`` (``file.h5:dataset``) into ``out_spec`` (written atomically).
    ``refine``: run these refinement steps after the exact flood (:mod:`floodfilling.inference.refine`);
    the flood itself is kept beside the result as ``<ds>_forward``."""
    cfg = (config or InferenceConfig()).validate()
    refine = refine.validate() if refine is not None else None
    if refine is not None:
        from .learned import check_refine_options

        check_refine_options(refine, cfg)
    spec = image_spec if isinstance(image_spec, volumes.VolumeSpec) else volumes.parse_volume_spec(image_spec)
    out = volumes.parse_volume_spec(out_spec)
    names = result_names(str(out.dataset), refined=refine is not None)
    inputs = [spec] + seeds_mod.input_specs(cfg)
    out = outputs.check_output(out, overwrite, names=names, inputs=inputs)  # before any work
    with locks.output_lock(out, names), kernels.launcher(cfg.kernels):
        return _segment_locked(spec, out, model=model, cfg=cfg, bbox=bbox, overwrite=overwrite,
                               progress=progress, refine=refine)


def _segment_locked(spec: volumes.VolumeSpec, out: volumes.VolumeSpec, *, model, cfg: InferenceConfig, bbox,
                    overwrite: bool, progress: bool, refine: RefineConfig | None) -> SegmentResult:
    out_path, out_ds = Path(out.path), out.dataset
    net, info = load_model(model, "cpu")
    learned = _check_refinement(refine, info)  # before the flood: a bad model file is a one-line error
    source = image_source(spec, bbox)
    policy = seeds_mod.policy_of(cfg, source.box)  # (a policy that reads a file checks it now, before the flood)
    with source.open() as vol:
        raw = source.read(vol)
        if smaller_than_fov(raw.shape, info.fov_zyx):
            raise SegmentError(f"{source.name}: image of shape {raw.shape} is smaller than the model's FOV "
                               f"{info.fov_zyx}")
        try:  # one set of values for the whole volume, whatever the bbox
            source = source.normalised(cfg, info, vol if source.box.shape != source.shape else raw)
        except norm_mod.NormalisationError as exc:
            raise SegmentError(str(exc)) from None
    box, norm = source.box, source.norm
    manifest = {
        "image": source.identity,
        "bbox": [list(box.start), list(box.stop)],
        "model": file_digest(Path(info.source)),
        "config": cfg.options_of("flood", "postprocess"),
        "normalisation": norm.to_dict(),
        "image_digest": image_digest(raw),
    }
    sp = _state_path_ready(out, manifest, overwrite)
    # made once: the refinement's gap floods reuse the image and the (compiled) network of the flood
    try:
        image = source.apply(raw)
    except norm_mod.NormalisationError as exc:
        raise SegmentError(str(exc)) from None
    k = inflight_on(select_device(cfg.device)) if refine is not None else 1
    prepared = Prepared(image, make_predictor(net, info.fov_zyx, info.deltas_zyx, cfg, threads=cfg.threads,
                                              inflight=k))
    result = segment_array(raw, config=cfg, resolution_zyx=source.resolution_zyx_nm or (1, 1, 1), state_path=sp,
                           manifest=manifest, progress=progress, net_and_info=(net, info), normalisation=norm,
                           source=source.name, policy=policy, keep_final_state=refine is not None, prepared=prepared)
    del raw
    extra = {}
    if refine is not None:  # the exact flood is kept beside the refined result
        extra[f"{out_ds}_forward"] = result.segmentation
        result = refined_result(result, image, refine, (net, info, cfg, prepared.predictor), learned)
    refine_attrs = refine.to_dict() if refine is not None else None
    if learned is not None:  # which model decided, and what it was trained on
        refine_attrs["learned"] = learned.describe()
    write_result(out_path, out_ds, result, attrs=results.ResultAttrs(
        resolution_zyx_nm=source.resolution_zyx_nm, bbox_zyx=(box.start, box.stop), source_image=source.name,
        model=info.source, config=cfg.to_dict(), normalisation=result.normalisation, counters=result.counters,
        refine=refine_attrs).to_dict(), overwrite=overwrite, extra=extra)
    if sp.exists():
        sp.unlink()
    return result


def _check_refinement(refine: RefineConfig | None, info):
    """The refinement's checks that need the model, before the flood; the learned refinement's
    model (:class:`~floodfilling.inference.learned.RefineModel`) when ``refine.model`` names one
    (not "hand")."""
    if refine is None:
        return None
    if refine.learned_model is None:
        check_gap_box(refine, info.fov_zyx)
        return None
    from .learned import load_refine_model

    learned = load_refine_model(refine.learned_model)
    if learned.base == "gap_cores":
        check_gap_box(learned.base_config(refine), info.fov_zyx)
    return learned


def _state_path_ready(out: volumes.VolumeSpec, manifest: dict[str, Any], overwrite: bool) -> Path:
    """The resume state's path of ``out`` (held under its lock): a killed save's temporaries
    gone, an earlier version's state adopted, discarded with ``overwrite``; the output's
    directory made."""
    out_path = Path(out.path)
    sp = state_path_for(out_path, out.dataset)
    disk.remove_temporaries(sp)  # a save of a killed run (we hold the output's lock)
    if out.kind != "zarr":
        disk.remove_temporaries(legacy_state_path(out_path))  # (the lock covers the whole HDF5 file)
    if overwrite and sp.exists():
        sp.unlink()
    if out.kind != "zarr" and not sp.exists():
        _adopt_legacy_state(legacy_state_path(out_path), sp, manifest)
    with disk.disk_errors(out_path.parent):
        out_path.parent.mkdir(parents=True, exist_ok=True)
    return sp


def _adopt_legacy_state(old: Path, sp: Path, manifest: dict[str, Any]) -> None:
    """An earlier version's state of this output file (``out.h5.resume.npz``, shared by all its
    datasets) becomes this dataset's when it was saved for this very run (same image digest,
    box, model, options); a state of another run is left alone (it may be another dataset's)."""
    if not old.exists():
        return
    if state_matches(old, manifest):
        log.info("resuming from %s (an earlier version's state, now %s)", old, sp.name)
        os.replace(old, sp)
    else:
        log.info("leaving %s alone: an earlier version's resume state of another run (another dataset or "
                 "input); delete it if that run is abandoned", old)


def refined_result(result: SegmentResult, image: np.ndarray, refine: RefineConfig, network,
                   learned=None) -> SegmentResult:
    """``result`` after the refinement steps of ``refine`` on ``image`` (normalised as for the
    flood) with ``network`` = (net, model info, inference config[, predictor]) of the flood: objects keep
    their ids and origins (those that rejoined an earlier object are gone), added objects get
    their gap flood's origin, the refinement's counters are added as ``refine_<name>``.
    ``learned``: a :class:`~floodfilling.inference.learned.RefineModel` replaces the hand steps."""
    if learned is not None:
        from .learned import learned_refine

        flood_cfg = network[2]  # postprocessing renumbers the flood and drops its overlaps: not recorded (NaN)
        recorded = not (flood_cfg.split_components or flood_cfg.dust_size > 0)
        r = learned_refine(image, result.segmentation, learned, refine, network=FloodNetwork(*network),
                           overlaps=result.overlaps if recorded else None)
    else:
        r = refine_array(image, result.segmentation, refine, FloodNetwork(*network), overlaps=result.overlaps)
    counters = {**result.counters, **{f"refine_{k}": v for k, v in r.counters.items()}}
    origins = {k: o for k, o in result.origins.items() if k not in r.joined}
    counters["refine_objects"] = len(origins) + len(r.new_origins)  # the refined result's ("objects": the flood's)
    return SegmentResult(r.segmentation, {**origins, **r.new_origins}, result.overlaps, counters,
                         result.seconds + r.counters["seconds"], result.normalisation)


def write_result(out_path: Path, ds: str, result: SegmentResult, attrs: dict[str, Any], overwrite: bool,
                 extra: dict[str, np.ndarray] | None = None) -> None:
    """A :class:`SegmentResult` as the result ``ds`` (:func:`floodfilling.results.write_result`)."""
    results.write_result(out_path, ds, result.segmentation, origins_table(result.origins), attrs, overwrite,
                         overlaps=overlaps_table(result.overlaps), extra=extra)
