"""Bad inputs, one-line errors (issue 13, item 8: "nothing lost, nothing silently wrong").

A table of wrong paths, datasets, shapes, dtypes, option values and model files is run through
the real CLI entry point in-process (``floodfilling.cli.main``, no subprocess per case). Every
case must: exit with status 2; print exactly one line on stderr, ``ffn: error: ...``, that names
the culprit (the file/dataset, or the option and its bad value) and is no traceback; leave every
input file byte-for-byte unchanged (sha256) and add no file beside them; and leave nothing
half-written in the output directory (no partial output, ``*.tmp-*``, ``*.lock``, ``*.resume.npz``).

The inputs are small (a 32x48x48 crop of the bundled FIB-25 volume and the tiny hand-set model),
built once per module; each case fails before any real work starts.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from floodfilling.cli import main
from floodfilling.testing import demo_crop, mean_flood_model

SHAPE = (32, 48, 48)


# -- fixture inputs --------------------------------------------------------------------------------

def _inputs_resume(d: Path) -> None:
    """Workdirs and resume states of earlier runs (issue 30, round 2: resume identity): a block
    workdir (``wd_ok``), the same with another image digest (``wd_changed``) or none recorded
    (``wd_old``), workdirs of a refined run with a damaged gap centres file (``wd_centres_*``),
    and in-memory resume states of another image / other options / garbage beside outputs
    ``state_*.h5:seg``."""
    import io
    import json
    import pickle

    from floodfilling.inference import segment as seg_mod

    q = ["--model", str(d / "tiny.npz"), "-q", "--threads", "1", "--device", "cpu"]
    blk = ["--block", "16,24,24"]
    assert main(["segment", f"{d}/crop.h5:raw", f"{d}/wd_ok_out.h5:seg", *q, *blk, "--workdir", f"{d}/wd_ok"]) == 0
    for name, edit in (("wd_changed", lambda m: m.update(image_digest="0123456789abcdef")),
                       ("wd_old", lambda m: m.pop("image_digest"))):
        shutil.copytree(d / "wd_ok", d / name)
        man = json.loads((d / name / "manifest.json").read_text())
        edit(man)
        (d / name / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    # a refined block run; its refinement directory (named by the output's digest) made again, damaged
    assert main(["segment", f"{d}/crop.h5:raw", f"{d}/wd_ref_out.h5:seg", *q, *blk, "--workdir", f"{d}/wd_ref",
                 "--refine", "--refine-model", "hand"]) == 0
    with h5py.File(d / "wd_ref_out.h5", "r") as f:
        digest = str(f["seg"].attrs["block_manifest"])
    header = b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 60 + b"\n"
    damaged = {"garbage": b"these are not gap centres\n", "pickled": header + pickle.dumps([1, 2]),
               "empty": b""}
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 2), np.int64))
    damaged["shape"] = buf.getvalue()
    for name, content in damaged.items():
        wd = d / f"wd_centres_{name}"
        shutil.copytree(d / "wd_ref", wd)
        rdir = wd / f"refine-{digest[:16]}"
        for sub in ("floods", "tiles"):
            (rdir / sub).mkdir(parents=True)
        (wd / "claims").mkdir()
        (rdir / "centres.npy").write_bytes(content)
    # in-memory resume states of a run killed after its last save
    with pytest.MonkeyPatch.context() as m:
        m.setattr(seg_mod, "write_result", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(["segment", f"{d}/crop.h5:raw", f"{d}/state_img.h5:seg", *q, "--checkpoint-interval", "1e-9"]) \
            == 130
    state = d / "state_img.h5.seg.resume.npz"
    with np.load(state) as z:
        arrays = {k: z[k] for k in z.files}
    man = json.loads(str(arrays["manifest"]))
    for name, edit in (("state_img", lambda m: m.update(image_digest="0123456789abcdef")),
                       ("state_opts", lambda m: m["config"].update(segment_threshold=0.7))):
        mm = json.loads(json.dumps(man))
        edit(mm)
        np.savez(d / f"{name}.h5.seg.resume.npz", **{**arrays, "manifest": json.dumps(mm, sort_keys=True)})
    (d / "state_garbage.h5.seg.resume.npz").write_bytes(b"not a resume state\n")
    (d / "small_gap_box.toml").write_text("[refine]\ngap_box = [2, 2, 2]\n")


def _inputs_refine_model(d: Path) -> None:
    """Refine model files (issue 29, learned refinement) that this version cannot use: another
    format version, other features."""
    import json

    from floodfilling.inference.learned import FORMAT

    good = {"format": FORMAT, "format_version": 1, "features": [], "base": "cores", "threshold": 0.5,
            "training": {}, "lightgbm": ""}
    (d / "refine_v99.json").write_text(json.dumps({**good, "format_version": 99}))
    (d / "refine_features.json").write_text(json.dumps({**good, "features": ["contact_area"]}))


def _inputs_locks(d: Path) -> None:
    """Inputs of the round 2 lock cases: outputs locked by a live process (pid 1, on this host and
    on another), locks that are empty or damaged and young (written "now": their time is in the
    future, so that they stay young however long the table runs), a finished training run."""
    import json
    import os
    import socket
    import time

    live = json.dumps({"host": socket.gethostname(), "pid": 1, "started": "earlier"}) + "\n"
    (d / "busy_run").mkdir()
    (d / "busy_run" / "train.lock").write_text(live)
    (d / "busy.h5.lock").write_text(live)
    (d / "busy.zarr.seg.lock").write_text(live)
    (d / "busy_layer.lock").write_text(live)
    (d / "busy_demo").mkdir()
    (d / "busy_demo" / "demo.lock").write_text(live)
    (d / "remote.h5.lock").write_text(json.dumps({"host": "some-other-node", "pid": 1, "started": "x"}) + "\n")
    (d / "young_run").mkdir()
    (d / "young_run" / "train.lock").write_text("")
    (d / "young.h5.lock").write_text("")
    (d / "damaged.h5.lock").write_text("{garbage")
    future = time.time() + 10 * 86400
    for p in ("young_run/train.lock", "young.h5.lock", "damaged.h5.lock"):
        os.utime(d / p, (future, future))
    run = ["train", "--image", f"{d}/crop.h5:raw", "--labels", f"{d}/crop.h5:labels", "--out", str(d / "run_a"),
           "--max-steps", "1", "--depth", "1", "--features", "4", "--fov", "9,9,9", "--deltas", "2,2,2", "--batch",
           "1", "--min-size", "10", "--device", "cpu", "--threads", "1", "--no-tensorboard", "-q"]
    assert main(run) == 0


def _inputs_files(d: Path) -> None:
    """Outputs that cannot be written (round 2, issue 30: output files): groups where a dataset or
    a result's companion would go, a stale companion, a companion that is an input; and, in the
    sibling directory ``{d}_links`` (outside the snapshot: a dangling link cannot be hashed),
    symbolic links: dangling, a loop, to a non-HDF5 file, to a directory, to an input."""
    with h5py.File(d / "crop.h5", "r") as f:
        labels = f["labels"][:]
    with h5py.File(d / "groups.h5", "w") as f:
        f["seg/inner"] = np.zeros(4, np.uint8)  # a group where `seg` would go
        f["res_forward/x"] = np.zeros(4, np.uint8)  # a group where a companion of `res` would go
        f["coords/x"] = np.zeros(4, np.uint8)  # a group where `ffn prepare` writes `coords`
    with h5py.File(d / "stale.h5", "w") as f:
        f["seg_forward"] = labels  # the flood of a refined result `seg` whose `seg` is gone
    with h5py.File(d / "fwd.h5", "w") as f:
        f["seg_forward"] = labels  # read as an input while the result `seg` would be replaced
    links = Path(f"{d}_links")
    links.mkdir(exist_ok=True)
    (links / "dangling.h5").symlink_to(d / "nowhere" / "gone.h5")
    (links / "loop.h5").symlink_to(links / "loop2.h5")
    (links / "loop2.h5").symlink_to(links / "loop.h5")
    (links / "to_fake.h5").symlink_to(d / "fake.h5")
    (links / "to_dir.h5").symlink_to(d / "adir")
    (links / "to_crop.h5").symlink_to(d / "crop.h5")


def _inputs_numbers(d: Path) -> None:
    """Inputs of the round-2 number and model-metadata cases: a float image near 1e300, and one
    model file per malformed ``__meta__`` field (the tiny model's, rewritten)."""
    import json

    with h5py.File(d / "crop.h5", "r") as f:
        raw = f["raw"][()]
    with h5py.File(d / "numbers.h5", "w") as f:
        f["huge"] = raw.astype(np.float64) * 1e300  # beyond float32: inf if normalised in float32
    arrays = dict(np.load(d / "tiny.npz"))
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    bad = {"list": [meta], "depth_str": {**meta, "depth": "1"}, "depth_nan": {**meta, "depth": float("nan")},
           "depth_bool": {**meta, "depth": True}, "depth_deep": {**meta, "depth": 1000},
           "fov_even": {**meta, "fov_zyx": [8, 9, 9]}, "fov_short": {**meta, "fov_zyx": [9, 9]},
           "fov_negative": {**meta, "fov_zyx": [-9, 9, 9]}, "deltas_big": {**meta, "deltas_zyx": [5, 2, 2]},
           "intensity_list": {**meta, "intensity": [128, 33]},
           "std_zero": {**meta, "intensity": {"mean": 128, "std": 0}},
           "mean_str": {**meta, "intensity": {"mean": "128", "std": 33}},
           "quantiles_short": {**meta, "intensity": {"mean": 128, "std": 33, "quantiles": [1, 2]}},
           "unknown": {**meta, "fov_zxy": [9, 9, 9]}, "features_other": {**meta, "features": 32}}
    for name, m in bad.items():
        np.savez(d / f"meta_{name}.npz", **arrays, __meta__=np.frombuffer(json.dumps(m).encode(), np.uint8))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(the input directory, a pristine copy of it)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    raw, labels = demo_crop(SHAPE)
    with h5py.File(d / "crop.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = labels
        # the same shape, other objects: coordinates prepared on `labels` do not belong to it
        f["labels_b"] = np.roll(labels, 7, axis=2)
        f["flat"] = raw[0]
        f["tiny"] = raw[:4, :4, :4]  # smaller than the tiny model's 9^3 FOV
        fl = raw.astype(np.float32)
        fl[3, 4, 5] = np.nan
        f["float_nan"] = fl
        neg = labels.astype(np.int32)
        neg[1, 2, 3] = -5
        f["neg"] = neg
        f["text"] = np.full((8, 8, 8), b"ab", dtype="S2")
        f["shape2"] = labels[:, :40, :44]
    with h5py.File(d / "lab.h5", "w") as f:  # labels under a name that `ffn prepare` writes
        f["partitions"] = labels
    model = mean_flood_model(d / "tiny.npz")
    arrays = dict(np.load(model))
    w = arrays["conv0_b/weights"].copy()
    w.flat[0] = np.nan
    arrays["conv0_b/weights"] = w
    np.savez(d / "nan.npz", **arrays)
    (d / "notes.txt").write_text("these are notes, not a model or a volume\n")
    (d / "blob.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "fake.h5").write_text("not an HDF5 file\n")
    (d / "bad_split.toml").write_text('[inference]\nsplit_components = "no"\n')
    (d / "bad_size.toml").write_text("[inference]\nmin_segment_size = 1.5\n")
    (d / "adir").mkdir()
    (d / "afile").write_text("a regular file\n")
    bad = d / "bad_workdir"
    bad.mkdir()
    (bad / "manifest.json").write_text("{garbage")
    _inputs_resume(d)
    _inputs_locks(d)
    _inputs_files(d)
    _inputs_numbers(d)
    _inputs_refine_model(d)
    quiet = ["--model", str(d / "tiny.npz"), "-q", "--threads", "1", "--device", "cpu"]
    assert main(["prepare", f"{d}/crop.h5:labels", str(d / "coords.h5"), "--radius", "4",
                 "--min-size", "10"]) == 0
    assert main(["segment", f"{d}/crop.h5:raw", f"{d}/seg.h5:seg", *quiet, "--set", "min_segment_size=10"]) == 0
    assert main(["segment", f"{d}/crop.h5:raw", f"{d}/seg_small.h5:seg", *quiet, "--set", "min_segment_size=10",
                 "--bbox", "0,0,0:16,24,24"]) == 0
    copy = tmp_path_factory.mktemp("bad_inputs_pristine")
    shutil.copytree(d, copy, dirs_exist_ok=True)
    return d, copy


@pytest.fixture
def inputs(pristine) -> Path:
    """The input directory; put back as it was after a case that changed it (so that one case's
    damage is reported by that case only)."""
    d, copy = pristine
    yield d
    if snapshot(d) != snapshot(copy):
        shutil.rmtree(d)
        shutil.copytree(copy, d)


def snapshot(d: Path) -> dict[str, str | None]:
    """Every file (sha256) and directory (None) under ``d``, by relative path."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- the table -------------------------------------------------------------------------------------
# (id, argv, substrings of the error line). In both, {d} is the input directory, {t} the (empty)
# output directory of the case. Arguments are split on whitespace before the substitution.

M = "--model {d}/tiny.npz -q --device cpu --threads 1"
SEG = "segment {d}/crop.h5:raw {t}/o.h5:seg " + M
INV = "--set seed_policy=invert_origins --set seed_origins="
MA = "--model {d}/tiny.npz --device cpu --threads 1"  # agglomerate has no -q
AGG = "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {t}/a.h5:seg " + MA
TRAIN = ("train --image {d}/crop.h5:raw --labels {d}/crop.h5:labels --out {t}/run --max-steps 1 --depth 1 "
         "--features 4 --fov 9,9,9 --deltas 2,2,2 --batch 1 --min-size 10 --device cpu --threads 1 "
         "--no-tensorboard -q")

TR = "train-refine {d}/crop.h5:raw "  # learned refinement: train on crop.h5 with the labels after it
# a segment run with the model file meta_<name>.npz (a malformed __meta__, see _inputs_numbers)
SEGM = "segment {{d}}/crop.h5:raw {{t}}/o.h5:seg --model {{d}}/meta_{}.npz -q --device cpu --threads 1"

CASES = [
    # ---- segment: the image
    ("segment-missing-file", "segment {d}/nope.h5:raw {t}/o.h5:seg " + M, ["nope.h5"]),
    ("segment-missing-dataset", "segment {d}/crop.h5:nope {t}/o.h5:seg " + M, ["crop.h5", "nope"]),
    ("segment-2d", "segment {d}/crop.h5:flat {t}/o.h5:seg " + M, ["crop.h5", "flat"]),
    ("segment-smaller-than-fov", "segment {d}/crop.h5:tiny {t}/o.h5:seg " + M, ["crop.h5", "tiny"]),
    ("segment-nan-image", "segment {d}/crop.h5:float_nan {t}/o.h5:seg " + M, ["crop.h5", "float_nan", "NaN"]),
    ("segment-text-dataset", "segment {d}/crop.h5:text {t}/o.h5:seg " + M, ["crop.h5", "text"]),
    ("segment-not-hdf5-input", "segment {d}/fake.h5:raw {t}/o.h5:seg " + M, ["fake.h5"]),
    ("segment-directory-input", "segment {d}/adir:raw {t}/o.h5:seg " + M, ["adir"]),
    ("segment-bbox-text", SEG + " --bbox abc", ["bbox", "abc"]),
    ("segment-bbox-outside", SEG + " --bbox 0,0,0:100,100,100", ["bbox", "0,0,0:100,100,100"]),
    ("segment-bbox-empty", SEG + " --bbox 5,5,5:5,5,5", ["bbox", "5,5,5:5,5,5"]),
    # ---- segment: options
    ("segment-set-unknown-key", SEG + " --set nosuch=1", ["nosuch"]),
    ("segment-set-no-equals", SEG + " --set min_segment_size", ["--set", "min_segment_size"]),
    ("segment-set-bool-maybe", SEG + " --set split_components=maybe", ["split_components", "maybe"]),
    ("segment-set-int-float", SEG + " --set min_segment_size=1.5", ["min_segment_size", "1.5"]),
    ("segment-set-float-nan", SEG + " --set segment_threshold=nan", ["segment_threshold", "nan"]),
    ("segment-set-probability-1.5", SEG + " --set move_threshold=1.5", ["move_threshold", "1.5"]),
    ("segment-set-seed-policy-bogus", SEG + " --set seed_policy=bogus", ["seed_policy", "bogus"]),
    ("segment-invert-origins-alone", SEG + " --set seed_policy=invert_origins", ["seed_policy", "seed_origins"]),
    ("segment-seed-origins-other-shape", SEG + " " + INV + "{d}/seg_small.h5:seg", ["seg_small.h5"]),
    ("segment-seed-origins-missing", SEG + " " + INV + "{d}/nope.h5:seg", ["nope.h5"]),
    ("segment-image-mean-nan", SEG + " --image-mean nan", ["--image-mean", "nan"]),
    ("segment-image-std-zero", SEG + " --image-std 0", ["--image-std", "0"]),
    ("segment-image-mean-with-histogram", SEG + " --normalise histogram --image-mean 100",
     ["--image-mean", "histogram"]),
    ("segment-checkpoint-interval-nan", SEG + " --checkpoint-interval nan", ["--checkpoint-interval", "nan"]),
    ("segment-checkpoint-interval-negative", SEG + " --checkpoint-interval -5", ["--checkpoint-interval", "-5"]),
    ("segment-threads-abc", SEG + " --threads abc", ["--threads", "abc"]),
    ("segment-threads-negative", SEG + " --threads -3", ["--threads", "-3"]),
    ("segment-device-bogus", "segment {d}/crop.h5:raw {t}/o.h5:seg --model {d}/tiny.npz -q --device bogus",
     ["bogus"]),
    ("segment-precision-bf17", SEG + " --precision bf17", ["--precision", "bf17"]),
    ("segment-resident-maybe", SEG + " --resident maybe", ["--resident", "maybe"]),
    ("segment-inflight-without-block", SEG + " --inflight 2", ["--inflight", "2"]),
    ("segment-halo-without-block", SEG + " --halo 4,4,4", ["--halo", "4,4,4"]),
    ("segment-block-abc", SEG + " --block abc", ["--block", "abc"]),
    ("segment-block-zero", SEG + " --block 0,1,1", ["--block", "0,1,1"]),
    ("segment-inflight-zero", SEG + " --block 16,24,24 --inflight 0", ["--inflight", "0"]),
    ("segment-workdir-is-a-file", SEG + " --workdir {d}/afile", ["afile"]),
    # ---- round 2 (issue 30): numbers
    ("segment-threads-huge", SEG + " --threads 100000", ["--threads", "100000", "1024"]),
    ("segment-set-threads-huge", SEG + " --set threads=100000", ["threads=100000", "1024"]),
    ("segment-inflight-huge", SEG + " --block 16,24,24 --inflight 100000", ["--inflight", "100000"]),
    ("segment-set-prefetch-huge", SEG + " --block 16,24,24 --set prefetch=1000", ["prefetch=1000", "64"]),
    ("segment-block-beyond-int64", SEG + " --block 99999999999999999999", ["--block", "99999999999999999999"]),
    ("segment-halo-beyond-int64", SEG + " --block 16,24,24 --halo 99999999999999999999",
     ["--halo", "99999999999999999999"]),
    ("segment-set-int-beyond-int64", SEG + " --set min_segment_size=99999999999999999999",
     ["min_segment_size=99999999999999999999", "int64"]),
    ("segment-set-dust-beyond-int64", SEG + " --set dust_size=-99999999999999999999", ["dust_size"]),
    ("segment-set-zyx-beyond-int64", SEG + " --set min_boundary_dist_zyx=[1,1,99999999999999999999]",
     ["min_boundary_dist_zyx"]),
    ("segment-set-float-overflow", SEG + " --set segment_threshold=1e999", ["segment_threshold", "inf"]),
    ("segment-set-refine-float-overflow", SEG + " --refine --refine-model hand --set refine.interior_sigma=1e999", ["interior_sigma"]),
    ("segment-image-mean-overflow", SEG + " --image-mean 1e999", ["--image-mean", "inf"]),
    ("segment-checkpoint-interval-overflow", SEG + " --checkpoint-interval 1e999", ["--checkpoint-interval", "inf"]),
    ("segment-image-mean-1e308-std-1e-308", SEG + " --image-mean 1e308 --image-std 1e-308", ["--image-std", "1e-308"]),
    ("segment-image-mean-std-overflow-float32", SEG + " --image-mean 1e30 --image-std 1e-30",
     ["crop.h5:raw", "not finite"]),
    ("segment-float-image-1e300-fixed", "segment {d}/numbers.h5:huge {t}/o.h5:seg --normalise fixed " + M,
     ["numbers.h5:huge", "not finite"]),
    ("agglomerate-inflight-huge", AGG + " --inflight 100000", ["--inflight", "100000"]),
    ("agglomerate-min-contact-beyond-int64", AGG + " --min-contact 99999999999999999999", ["--min-contact"]),
    ("agglomerate-threads-huge", AGG + " --threads 5000", ["--threads", "5000"]),
    ("agglomerate-set-refine-unknown", AGG + " --set refine.bogus=1", ["refine.bogus", "gap_box"]),
    ("agglomerate-set-refine-known", AGG + " --set refine.halo=4", ["refine.halo", "ffn segment --refine"]),
    ("consensus-min-size-beyond-int64", "consensus {d}/seg.h5:seg {d}/seg.h5:seg {t}/c.h5:seg --min-size "
     "99999999999999999999", ["--min-size", "99999999999999999999"]),
    ("prepare-seed-negative", "prepare {d}/crop.h5:labels {t}/p.h5 --radius 4 --min-size 10 --seed -1",
     ["--seed", "-1", "4294967295"]),
    ("prepare-seed-beyond-int64", "prepare {d}/crop.h5:labels {t}/p.h5 --radius 4 --min-size 10 --seed "
     "1180591620717411303424", ["--seed", "1180591620717411303424"]),
    ("prepare-radius-beyond-int64", "prepare {d}/crop.h5:labels {t}/p.h5 --radius 99999999999999999999",
     ["--radius"]),
    ("train-seed-negative", TRAIN + " --seed -1", ["--seed", "-1"]),
    ("train-seed-2-70", TRAIN + " --seed 1180591620717411303424", ["--seed", "1180591620717411303424"]),
    ("train-threads-huge", TRAIN + " --threads 100000", ["--threads", "100000", "1024"]),
    ("train-batch-huge", TRAIN + " --batch 100000", ["--batch", "100000"]),
    ("train-image-std-1e-308", TRAIN + " --image-std 1e-308", ["--image-std", "1e-308"]),
    # float32 overflow of (x - mean) / std: refused naming the image, as inference does (was: trained on inf)
    ("train-image-mean-std-overflow", TRAIN + " --image-mean 1e30 --image-std 1e-30", ["crop.h5:raw", "not finite"]),
    ("train-lr-overflow", TRAIN + " --lr 1e999", ["--lr", "inf"]),
    ("evaluate-top-beyond-int64", "evaluate {d}/seg.h5:seg {d}/crop.h5:labels --top 99999999999999999999",
     ["--top"]),
    ("export-levels-huge", "export {d}/crop.h5:raw {t}/layer --levels 1000", ["--levels", "1000"]),
    ("view-port-beyond-int64", "view {d}/crop.h5:raw --port 99999999999999999999", ["--port"]),
    ("demo-threads-huge", "demo --out {t}/demo -q --device cpu --threads 100000", ["--threads", "100000"]),
    # ---- segment: model and config files
    ("segment-model-missing", "segment {d}/crop.h5:raw {t}/o.h5:seg --model {d}/nope.npz -q", ["nope.npz"]),
    ("segment-model-nan-weights", "segment {d}/crop.h5:raw {t}/o.h5:seg --model {d}/nan.npz -q",
     ["nan.npz", "conv0_b/weights"]),
    ("segment-model-text-file", "segment {d}/crop.h5:raw {t}/o.h5:seg --model {d}/notes.txt -q", ["notes.txt"]),
    ("segment-model-empty-dir", "segment {d}/crop.h5:raw {t}/o.h5:seg --model {d}/adir -q", ["adir"]),
    ("segment-config-binary", SEG + " --config {d}/blob.bin", ["blob.bin"]),
    ("segment-config-text-not-toml", SEG + " --config {d}/notes.txt", ["notes.txt"]),
    ("segment-config-missing", SEG + " --config {d}/nope.toml", ["nope.toml"]),
    ("segment-config-directory", SEG + " --config {d}/adir", ["adir"]),
    ("segment-config-bool-string", SEG + " --config {d}/bad_split.toml", ["bad_split.toml", "split_components", "no"]),
    ("segment-config-int-float", SEG + " --config {d}/bad_size.toml", ["bad_size.toml", "min_segment_size", "1.5"]),
    # ---- round 2 (issue 30): model metadata
    ("model-meta-list", SEGM.format("list"), ["meta_list.npz", "__meta__", "list"]),
    ("model-meta-depth-string", SEGM.format("depth_str"), ["meta_depth_str.npz", "depth"]),
    ("model-meta-depth-nan", SEGM.format("depth_nan"), ["meta_depth_nan.npz", "depth=nan"]),
    ("model-meta-depth-bool", SEGM.format("depth_bool"), ["meta_depth_bool.npz", "depth=true"]),
    ("model-meta-depth-not-the-arrays", SEGM.format("depth_deep"), ["meta_depth_deep.npz", "depth=1000"]),
    ("model-meta-features-not-the-arrays", SEGM.format("features_other"), ["meta_features_other.npz", "features=32"]),
    ("model-meta-fov-even", SEGM.format("fov_even"), ["meta_fov_even.npz", "fov_zyx", "odd"]),
    ("model-meta-fov-two-values", SEGM.format("fov_short"), ["meta_fov_short.npz", "fov_zyx"]),
    ("model-meta-fov-negative", SEGM.format("fov_negative"), ["meta_fov_negative.npz", "fov_zyx"]),
    ("model-meta-deltas-beyond-fov", SEGM.format("deltas_big"), ["meta_deltas_big.npz", "deltas_zyx"]),
    ("model-meta-intensity-list", SEGM.format("intensity_list"), ["meta_intensity_list.npz", "intensity"]),
    ("model-meta-std-zero", SEGM.format("std_zero"), ["meta_std_zero.npz", "intensity.std"]),
    ("model-meta-mean-string", SEGM.format("mean_str"), ["meta_mean_str.npz", "intensity.mean"]),
    ("model-meta-quantiles-short", SEGM.format("quantiles_short"), ["meta_quantiles_short.npz", "quantiles"]),
    ("model-meta-unknown-field", SEGM.format("unknown"), ["meta_unknown.npz", "fov_zxy"]),
    ("train-init-meta-fov-even", TRAIN + " --init {d}/meta_fov_even.npz", ["meta_fov_even.npz", "fov_zyx"]),
    ("agglomerate-model-meta-std-zero", AGG.replace("{d}/tiny.npz", "{d}/meta_std_zero.npz"),
     ["meta_std_zero.npz", "intensity.std"]),
    # ---- segment: the output
    ("segment-output-is-input", "segment {d}/crop.h5:raw {d}/crop.h5:raw --overwrite " + M, ["crop.h5", "raw"]),
    ("segment-output-into-non-hdf5", "segment {d}/crop.h5:raw {d}/fake.h5:seg --overwrite " + M, ["fake.h5"]),
    ("segment-output-under-a-file", "segment {d}/crop.h5:raw {d}/afile/out.h5:seg " + M,
     ["afile exists and is not a directory"]),
    ("segment-output-exists", "segment {d}/crop.h5:raw {d}/seg.h5:seg " + M, ["seg.h5", "--overwrite"]),
    ("segment-block-output-is-input", "segment {d}/crop.h5:raw {d}/crop.h5:raw --overwrite --block 16,24,24 " + M,
     ["crop.h5", "raw"]),
    # ---- round 2 (issue 30): resume identity, workdirs, block-run errors
    ("segment-workdir-is-the-output", SEG + " --block 16,24,24 --workdir {t}/o.h5",
     ["--workdir {t}/o.h5", "is the output"]),
    ("segment-workdir-is-the-output-no-block", SEG + " --workdir {t}/o.h5", ["--workdir {t}/o.h5", "is the output"]),
    ("segment-workdir-inside-the-output", SEG + " --block 16,24,24 --workdir {t}/o.h5/blocks",
     ["--workdir {t}/o.h5/blocks", "lies inside the output"]),
    ("segment-workdir-is-the-zarr-output", "segment {d}/crop.h5:raw {t}/o.zarr/seg --block 16,24,24 --workdir "
     "{t}/o.zarr " + M, ["--workdir {t}/o.zarr", "is the output"]),
    ("segment-workdir-inside-the-zarr-output", "segment {d}/crop.h5:raw {t}/o.zarr/seg --block 16,24,24 --workdir "
     "{t}/o.zarr/work " + M, ["--workdir {t}/o.zarr/work", "lies inside the output"]),
    ("segment-workdir-is-the-image", SEG + " --block 16,24,24 --workdir {d}/crop.h5",
     ["--workdir {d}/crop.h5", "is the image"]),
    ("segment-workdir-inside-the-image", SEG + " --block 16,24,24 --workdir {d}/crop.h5/work",
     ["--workdir {d}/crop.h5/work", "lies inside the image"]),
    ("segment-workdir-is-the-model", SEG + " --block 16,24,24 --workdir {d}/tiny.npz",
     ["--workdir {d}/tiny.npz", "is the model"]),
    ("segment-workdir-inside-the-model", SEG + " --block 16,24,24 --workdir {d}/tiny.npz/work",
     ["--workdir {d}/tiny.npz/work", "lies inside the model"]),
    ("segment-refine-gap-box-below-fov", SEG + " --refine --refine-model hand --set refine.gap_box=[4,40,40]",
     ["refine.gap_box=4,40,40", "FOV 9,9,9"]),
    ("segment-refine-gap-box-below-fov-x", SEG + " --refine --refine-model hand --set refine.gap_box=[40,40,8]",
     ["refine.gap_box=40,40,8", "FOV 9,9,9"]),
    ("segment-refine-gap-box-below-fov-config", SEG + " --refine --refine-model hand --config {d}/small_gap_box.toml",
     ["refine.gap_box=2,2,2", "FOV 9,9,9"]),
    ("segment-block-refine-gap-box-below-fov", SEG + " --block 16,24,24 --refine --refine-model hand --set refine.gap_box=[4,40,40]",
     ["refine.gap_box=4,40,40", "FOV 9,9,9"]),
    ("segment-block-workdir-of-a-changed-image", SEG + " --block 16,24,24 --workdir {d}/wd_changed",
     ["wd_changed", "image_digest", "the image's voxels changed", "--overwrite"]),
    ("segment-block-workdir-without-image-digest", SEG + " --block 16,24,24 --workdir {d}/wd_old",
     ["wd_old", "image_digest", "earlier version"]),
    ("segment-block-workdir-other-flood-options", SEG + " --block 16,24,24 --workdir {d}/wd_ok "
     "--set segment_threshold=0.7", ["wd_ok", "differs in: config"]),
    ("segment-block-workdir-other-bbox", SEG + " --block 16,24,24 --workdir {d}/wd_ok --bbox 0,0,0:32,48,40",
     ["wd_ok", "bbox", "image_digest"]),
    ("segment-block-refine-centres-garbage", SEG + " --block 16,24,24 --workdir {d}/wd_centres_garbage --refine --refine-model hand",
     ["wd_centres_garbage/refine-", "centres.npy", "delete it"]),
    ("segment-block-refine-centres-pickled", SEG + " --block 16,24,24 --workdir {d}/wd_centres_pickled --refine --refine-model hand",
     ["wd_centres_pickled/refine-", "centres.npy", "delete it"]),
    ("segment-block-refine-centres-empty", SEG + " --block 16,24,24 --workdir {d}/wd_centres_empty --refine --refine-model hand",
     ["wd_centres_empty/refine-", "centres.npy", "delete it"]),
    ("segment-block-refine-centres-wrong-shape", SEG + " --block 16,24,24 --workdir {d}/wd_centres_shape --refine --refine-model hand",
     ["wd_centres_shape/refine-", "centres.npy", "delete it"]),
    ("segment-resume-state-of-a-changed-image", "segment {d}/crop.h5:raw {d}/state_img.h5:seg " + M,
     ["state_img.h5.seg.resume.npz", "image_digest", "the image changed"]),
    ("segment-resume-state-other-options", "segment {d}/crop.h5:raw {d}/state_opts.h5:seg " + M,
     ["state_opts.h5.seg.resume.npz", "config"]),
    ("segment-resume-state-garbage", "segment {d}/crop.h5:raw {d}/state_garbage.h5:seg " + M,
     ["state_garbage.h5.seg.resume.npz", "unreadable resume state"]),
    # ---- evaluate
    ("evaluate-shape-mismatch", "evaluate {d}/crop.h5:labels {d}/crop.h5:shape2", ["labels", "shape2"]),
    ("evaluate-float-volume", "evaluate {d}/crop.h5:float_nan {d}/crop.h5:labels", ["float_nan", "float32"]),
    ("evaluate-negative-labels", "evaluate {d}/crop.h5:neg {d}/crop.h5:labels", ["crop.h5:neg", "negative"]),
    ("evaluate-negative-gt", "evaluate {d}/crop.h5:labels {d}/crop.h5:neg", ["crop.h5:neg", "negative"]),
    ("evaluate-missing-dataset", "evaluate {d}/crop.h5:nope {d}/crop.h5:labels", ["crop.h5", "nope"]),
    ("evaluate-missing-file", "evaluate {d}/seg.h5:seg {d}/nope.h5:labels", ["nope.h5"]),
    ("evaluate-top-abc", "evaluate {d}/seg.h5:seg {d}/crop.h5:labels --top abc", ["--top", "abc"]),
    ("evaluate-gt-zero-bogus", "evaluate {d}/seg.h5:seg {d}/crop.h5:labels --gt-zero bogus", ["--gt-zero", "bogus"]),
    # ---- consensus
    ("consensus-shape-mismatch", "consensus {d}/seg.h5:seg {d}/crop.h5:shape2 {t}/c.h5:seg", ["shape2"]),
    ("consensus-negative-labels", "consensus {d}/crop.h5:neg {d}/crop.h5:labels {t}/c.h5:seg",
     ["crop.h5:neg", "negative"]),
    ("consensus-float-volume", "consensus {d}/crop.h5:float_nan {d}/crop.h5:labels {t}/c.h5:seg", ["float_nan"]),
    ("consensus-output-is-input", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}/seg.h5:seg --overwrite",
     ["seg.h5"]),
    ("consensus-output-is-second-input", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}/crop.h5:labels "
     "--overwrite", ["crop.h5", "labels"]),
    ("consensus-output-into-non-hdf5", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}/fake.h5:seg --overwrite",
     ["fake.h5", "not an HDF5 file"]),
    ("consensus-missing-dataset", "consensus {d}/seg.h5:nope {d}/crop.h5:labels {t}/c.h5:seg", ["seg.h5", "nope"]),
    ("consensus-min-size-abc", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {t}/c.h5:seg --min-size abc",
     ["--min-size", "abc"]),
    ("consensus-min-size-negative", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {t}/c.h5:seg --min-size -1",
     ["--min-size", "-1"]),
    # ---- agglomerate
    ("agglomerate-box-abc", AGG + " --box abc", ["--box", "abc"]),
    ("agglomerate-box-zero", AGG + " --box 0,9,9", ["--box", "0,9,9"]),
    ("agglomerate-merge-iou-1.5", AGG + " --merge-iou 1.5", ["--merge-iou", "1.5"]),
    ("agglomerate-merge-iou-nan", AGG + " --merge-iou nan", ["--merge-iou", "nan"]),
    ("agglomerate-min-contact-negative", AGG + " --min-contact -1", ["--min-contact", "-1"]),
    ("agglomerate-inflight-zero", AGG + " --inflight 0", ["--inflight", "0"]),
    ("agglomerate-within-shape-mismatch", AGG + " --within {d}/crop.h5:shape2", ["shape2"]),
    ("agglomerate-within-negative", AGG + " --within {d}/crop.h5:neg", ["crop.h5:neg", "negative"]),
    ("agglomerate-within-float", AGG + " --within {d}/crop.h5:float_nan", ["float_nan", "float32"]),
    ("agglomerate-seg-shape-mismatch", "agglomerate {d}/crop.h5:raw {d}/crop.h5:shape2 {t}/a.h5:seg " + MA,
     ["shape2"]),
    ("agglomerate-negative-seg", "agglomerate {d}/crop.h5:raw {d}/crop.h5:neg {t}/a.h5:seg " + MA,
     ["crop.h5:neg", "negative"]),
    ("agglomerate-output-is-input", "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {d}/seg.h5:seg --overwrite " + MA,
     ["seg.h5"]),
    ("agglomerate-output-is-image", "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {d}/crop.h5:raw --overwrite " + MA,
     ["crop.h5", "raw"]),
    ("agglomerate-output-into-non-hdf5", "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {d}/fake.h5:seg --overwrite "
     + MA, ["fake.h5", "not an HDF5 file"]),
    ("agglomerate-set-bad", AGG + " --set min_segment_size=1.5", ["min_segment_size", "1.5"]),
    # ---- prepare
    ("prepare-negative-labels", "prepare {d}/crop.h5:neg {t}/p.h5 --radius 4 --min-size 10",
     ["crop.h5:neg", "negative"]),
    ("prepare-float-labels", "prepare {d}/crop.h5:float_nan {t}/p.h5 --radius 4 --min-size 10", ["float_nan"]),
    ("prepare-2d-labels", "prepare {d}/crop.h5:flat {t}/p.h5 --radius 4 --min-size 10", ["flat"]),
    ("prepare-missing-dataset", "prepare {d}/crop.h5:nope {t}/p.h5 --radius 4", ["crop.h5", "nope"]),
    ("prepare-radius-abc", "prepare {d}/crop.h5:labels {t}/p.h5 --radius abc", ["--radius", "abc"]),
    ("prepare-radius-negative", "prepare {d}/crop.h5:labels {t}/p.h5 --radius -2", ["radius", "-2"]),
    ("prepare-thresholds-nan", "prepare {d}/crop.h5:labels {t}/p.h5 --thresholds nan", ["--thresholds", "nan"]),
    ("prepare-thresholds-decreasing", "prepare {d}/crop.h5:labels {t}/p.h5 --radius 4 --thresholds 0.5,0.2",
     ["thresholds", "0.5"]),
    ("prepare-output-exists", "prepare {d}/crop.h5:labels {d}/coords.h5 --radius 4 --min-size 10",
     ["coords.h5", "--overwrite"]),
    # prepare writes the datasets 'partitions' and 'coords': into the labels' own file they may go
    # (its other datasets stay), over the labels themselves never
    ("prepare-output-replaces-the-labels", "prepare {d}/lab.h5:partitions {d}/lab.h5 --radius 4 --min-size 10 "
     "--overwrite", ["lab.h5", "partitions"]),
    ("prepare-output-into-non-hdf5", "prepare {d}/crop.h5:labels {d}/fake.h5 --radius 4 --min-size 10 --overwrite",
     ["fake.h5", "not an HDF5 file"]),
    ("prepare-output-under-a-file", "prepare {d}/crop.h5:labels {d}/afile/p.h5 --radius 4 --min-size 10",
     ["afile exists and is not a directory"]),
    # ---- round 2 (issue 30): output files
    # symbolic links are written through to their file: one that leads nowhere is refused
    ("files-segment-out-dangling-link", SEG.replace("{t}/o.h5", "{d}_links/dangling.h5"),
     ["dangling.h5", "nowhere/gone.h5", "does not exist"]),
    ("files-segment-out-link-loop", SEG.replace("{t}/o.h5", "{d}_links/loop.h5"),
     ["loop.h5", "loop of symbolic links"]),
    ("files-segment-out-link-to-non-hdf5", SEG.replace("{t}/o.h5", "{d}_links/to_fake.h5") + " --overwrite",
     ["to_fake.h5", "not an HDF5 file"]),
    ("files-segment-out-link-to-directory", SEG.replace("{t}/o.h5", "{d}_links/to_dir.h5") + " --overwrite",
     ["to_dir.h5", "is a directory"]),
    ("files-segment-out-link-to-the-input", "segment {d}/crop.h5:raw {d}_links/to_crop.h5:raw --overwrite " + M,
     ["raw", "would replace the input"]),
    ("files-block-out-dangling-link", SEG.replace("{t}/o.h5", "{d}_links/dangling.h5")
     + " --block 16,24,24 --workdir {t}/w", ["dangling.h5", "does not exist"]),
    ("files-block-out-link-loop", SEG.replace("{t}/o.h5", "{d}_links/loop.h5") + " --block 16,24,24 --workdir {t}/w",
     ["loop.h5", "loop of symbolic links"]),
    ("files-prepare-out-dangling-link", "prepare {d}/crop.h5:labels {d}_links/dangling.h5 --radius 4 --min-size 10",
     ["dangling.h5", "does not exist"]),
    ("files-prepare-out-link-to-non-hdf5", "prepare {d}/crop.h5:labels {d}_links/to_fake.h5 --radius 4 "
     "--min-size 10 --overwrite", ["to_fake.h5", "not an HDF5 file"]),
    ("files-consensus-out-link-loop", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}_links/loop.h5:seg",
     ["loop.h5", "loop of symbolic links"]),
    ("files-agglomerate-out-dangling-link", AGG.replace("{t}/a.h5", "{d}_links/dangling.h5"),
     ["dangling.h5", "does not exist"]),
    # a group is never replaced by a dataset, nor by a result's companion
    ("files-segment-out-is-a-group", SEG.replace("{t}/o.h5", "{d}/groups.h5") + " --overwrite",
     ["groups.h5:seg is a group", "seg/inner"]),
    ("files-segment-companion-is-a-group", "segment {d}/crop.h5:raw {d}/groups.h5:res --overwrite " + M,
     ["groups.h5:res_forward is a group"]),
    ("files-block-companion-is-a-group", "segment {d}/crop.h5:raw {d}/groups.h5:res --overwrite --block 16,24,24 "
     "--workdir {t}/w " + M, ["groups.h5:res_forward is a group"]),
    ("files-prepare-out-coords-is-a-group", "prepare {d}/crop.h5:labels {d}/groups.h5 --radius 4 --min-size 10 "
     "--overwrite", ["groups.h5:coords is a group"]),
    ("files-segment-out-under-a-dataset", "segment {d}/crop.h5:raw {d}/seg.h5:seg/x --overwrite " + M,
     ["seg.h5:seg/x", "seg is a dataset"]),
    # the companions of a result go with it: never left stale beside a new one without --overwrite,
    # never removed while read as an input
    ("files-segment-stale-companion", SEG.replace("{t}/o.h5", "{d}/stale.h5"),
     ["stale.h5:seg_forward exists and belongs to a result seg", "--overwrite"]),
    ("files-consensus-stale-companion", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}/stale.h5:seg",
     ["stale.h5:seg_forward exists", "--overwrite"]),
    ("files-agglomerate-removes-its-input", "agglomerate {d}/crop.h5:raw {d}/fwd.h5:seg_forward {d}/fwd.h5:seg "
     "--overwrite " + MA, ["fwd.h5:seg_forward would remove", "input"]),
    # dataset names: no empty, '.' or '..' part, no control character (a zarr name never leaves its store)
    ("files-segment-name-empty-part", SEG.replace("{t}/o.h5:seg", "{t}/o.h5:a//b"), ["a//b", "empty part"]),
    ("files-segment-name-dot", SEG.replace("{t}/o.h5:seg", "{t}/o.h5:."), ["o.h5", "'.'", "'..'"]),
    ("files-segment-name-dotdot", SEG.replace("{t}/o.h5:seg", "{t}/o.h5:a/../b"), ["a/../b", "'..'"]),
    ("files-segment-zarr-name-leaves-store", SEG.replace("{t}/o.h5:seg", "{t}/v.zarr/../evil"),
     ["../evil", "'..'"]),
    ("files-segment-name-control-char", SEG.replace("{t}/o.h5:seg", "{t}/o.h5:se\x07g"),
     ["control character"]),
    ("files-consensus-name-dotdot", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {t}/c.h5:../c",
     ["../c", "'..'"]),
    ("files-block-name-empty-part", SEG.replace("{t}/o.h5:seg", "{t}/o.h5:a//b") + " --block 16,24,24 "
     "--workdir {t}/w", ["a//b", "empty part"]),
    # ---- train (each fails before training starts)
    ("train-lr-nan", TRAIN + " --lr nan", ["--lr", "nan"]),
    ("train-lr-zero", TRAIN + " --lr 0", ["--lr", "0"]),
    ("train-batch-zero", TRAIN + " --batch 0", ["--batch", "0"]),
    ("train-momentum-1.5", TRAIN + " --momentum 1.5", ["--momentum", "1.5"]),
    ("train-fov-even", TRAIN + " --fov 8,8,8", ["fov", "(8, 8, 8)"]),
    ("train-image-missing", TRAIN.replace("{d}/crop.h5:raw", "{d}/nope.h5:raw"), ["nope.h5"]),
    ("train-labels-shape-mismatch", TRAIN.replace("crop.h5:labels", "crop.h5:shape2"), ["shape2"]),
    ("train-labels-negative", TRAIN.replace("crop.h5:labels", "crop.h5:neg"), ["crop.h5:neg", "negative"]),
    ("train-coords-of-other-labels", TRAIN.replace("crop.h5:labels", "crop.h5:labels_b") + " --coords {d}/coords.h5",
     ["coords.h5", "labels_b"]),
    ("train-coords-not-hdf5", TRAIN + " --coords {d}/notes.txt", ["notes.txt"]),
    ("train-coords-without-coords", TRAIN + " --coords {d}/seg.h5", ["seg.h5", "coords"]),
    ("train-out-is-a-file", TRAIN.replace("{t}/run", "{d}/afile"), ["afile exists and is not a directory"]),
    ("train-init-nan-weights", TRAIN + " --init {d}/nan.npz", ["nan.npz", "conv0_b/weights"]),
    ("train-val-labels-without-image", TRAIN + " --val-labels {d}/crop.h5:labels", ["--val-labels", "--val-image"]),
    # ---- round 2 (issue 30): locks and training
    # a live holder (pid 1) is named with its lock file, which is left as it is
    ("train-out-locked-by-a-live-run", TRAIN.replace("{t}/run", "{d}/busy_run"),
     ["run directory {d}/busy_run", "pid 1", "delete {d}/busy_run/train.lock"]),
    ("segment-output-locked-by-a-live-run", "segment {d}/crop.h5:raw {d}/busy.h5:seg " + M,
     ["busy.h5:seg", "pid 1", "delete {d}/busy.h5.lock"]),
    ("segment-zarr-output-locked-by-a-live-run", "segment {d}/crop.h5:raw {d}/busy.zarr/seg " + M,
     ["busy.zarr", "pid 1", "delete {d}/busy.zarr.seg.lock"]),
    ("consensus-output-locked-by-a-live-run", "consensus {d}/seg.h5:seg {d}/crop.h5:labels {d}/busy.h5:c",
     ["pid 1", "delete {d}/busy.h5.lock"]),
    ("agglomerate-output-locked-by-a-live-run", "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {d}/busy.h5:seg " + MA,
     ["pid 1", "delete {d}/busy.h5.lock"]),
    ("agglomerate-output-locked-on-another-host", "agglomerate {d}/crop.h5:raw {d}/seg.h5:seg {d}/remote.h5:seg "
     + MA, ["some-other-node", "delete {d}/remote.h5.lock"]),
    ("prepare-output-locked-by-a-live-run", "prepare {d}/crop.h5:labels {d}/busy.h5 --radius 4 --min-size 10",
     ["pid 1", "delete {d}/busy.h5.lock"]),
    ("export-layer-locked-by-a-live-run", "export {d}/crop.h5:raw {d}/busy_layer",
     ["layer {d}/busy_layer", "pid 1", "delete {d}/busy_layer.lock"]),
    ("demo-out-locked-by-a-live-run", "demo --out {d}/busy_demo -q --device cpu --threads 1",
     ["pid 1", "delete {d}/busy_demo/demo.lock"]),
    # an empty or damaged lock written moments ago: another run is starting (explained, left alone)
    ("train-out-young-empty-lock", TRAIN.replace("{t}/run", "{d}/young_run"),
     ["{d}/young_run/train.lock is empty", "delete {d}/young_run/train.lock"]),
    ("segment-output-young-empty-lock", "segment {d}/crop.h5:raw {d}/young.h5:seg " + M,
     ["{d}/young.h5.lock is empty", "delete {d}/young.h5.lock"]),
    ("prepare-output-young-damaged-lock", "prepare {d}/crop.h5:labels {d}/damaged.h5 --radius 4 --min-size 10",
     ["{d}/damaged.h5.lock is damaged", "delete {d}/damaged.h5.lock"]),
    # an existing run directory: its files untouched by a run that may not continue it
    ("train-existing-checkpoint-without-resume", TRAIN.replace("{t}/run", "{d}/run_a"),
     ["run_a/checkpoint holds a checkpoint", "--resume"]),
    ("train-resume-another-architecture", TRAIN.replace("{t}/run", "{d}/run_a") + " --resume --features 8",
     ["run_a/checkpoint", "features 4", "--features 8", "another architecture"]),
    ("train-resume-another-seed", TRAIN.replace("{t}/run", "{d}/run_a") + " --resume --seed 5",
     ["run_a/checkpoint", "seed 0", "--seed 5"]),
    ("train-init-another-features", TRAIN + " --init {d}/tiny.npz --features 8",
     ["--init {d}/tiny.npz", "features 4", "--features 8"]),
    ("train-init-another-fov", TRAIN + " --init {d}/run_a --fov 7,7,7", ["--init {d}/run_a", "fov 9,9,9", "--fov 7,7,7"]),
    ("train-init-missing", TRAIN + " --init {d}/nope.npz", ["nope.npz"]),
    ("train-init-not-a-model", TRAIN + " --init {d}/notes.txt", ["notes.txt"]),
    # numeric options at their edges
    ("train-max-steps-negative", TRAIN + " --max-steps -1", ["--max-steps", "-1"]),
    ("train-max-steps-text", TRAIN + " --max-steps 1e3", ["--max-steps", "1e3"]),
    ("train-checkpoint-every-negative", TRAIN + " --checkpoint-every -1", ["--checkpoint-every", "-1"]),
    ("train-checkpoint-secs-nan", TRAIN + " --checkpoint-secs nan", ["--checkpoint-secs", "nan"]),
    ("train-checkpoint-secs-negative", TRAIN + " --checkpoint-secs -5", ["--checkpoint-secs", "-5"]),
    ("train-keep-every-negative", TRAIN + " --keep-every -1", ["--keep-every", "-1"]),
    ("train-log-every-negative", TRAIN + " --log-every -1", ["--log-every", "-1"]),
    ("train-warmup-steps-negative", TRAIN + " --warmup-steps -3", ["--warmup-steps", "-3"]),
    ("train-seed-too-large", TRAIN + " --seed 4294967296", ["--seed", "4294967296"]),
    ("train-val-sequences-zero", TRAIN + " --val-sequences 0", ["--val-sequences", "0"]),
    ("train-threads-negative", TRAIN + " --threads -1", ["--threads", "-1"]),
    ("train-deltas-negative", TRAIN + " --deltas -1", ["deltas", "-1"]),
    ("train-clip-inf", TRAIN + " --clip inf", ["--clip", "inf"]),
    ("train-depth-zero", TRAIN + " --depth 0", ["--depth", "0"]),
    ("train-volume-weights-for-two", TRAIN + " --volume-weights 1,2", ["--volume-weights", "2 weight(s) for 1"]),
    ("train-out-under-a-file", TRAIN.replace("{t}/run", "{d}/afile/run"), ["afile exists and is not a directory"]),
    # ---- status
    ("status-no-such-dir", "status {d}/nope_workdir", ["nope_workdir"]),
    ("status-corrupt-manifest", "status {d}/bad_workdir", ["bad_workdir", "manifest.json"]),
    ("status-a-file", "status {d}/afile", ["afile"]),
    ("status-nothing-asked", "status", ["--workdir", "--devices"]),
    ("segment-kernels-unknown", "segment {d}/crop.h5:raw {t}/o.h5:seg --set kernels=cuda", ["kernels", "cuda"]),
    # ---- view / export (fail before serving or writing)
    ("view-bbox-text", "view {d}/crop.h5:raw --bbox abc", ["--bbox", "abc"]),
    ("view-labels-shape-mismatch", "view {d}/crop.h5:raw {d}/crop.h5:shape2", ["shape2"]),
    ("view-port-70000", "view {d}/crop.h5:raw --port 70000", ["--port", "70000"]),
    ("view-port-abc", "view {d}/crop.h5:raw --port abc", ["--port", "abc"]),
    ("view-missing-dataset", "view {d}/crop.h5:nope", ["crop.h5", "nope"]),
    ("export-bbox-text", "export {d}/crop.h5:raw {t}/layer --bbox abc", ["--bbox", "abc"]),
    ("export-resolution-text", "export {d}/crop.h5:raw {t}/layer --resolution abc", ["--resolution", "abc"]),
    ("export-resolution-zero", "export {d}/crop.h5:raw {t}/layer --resolution 0,8,8", ["--resolution", "0"]),
    ("export-resolution-nan", "export {d}/crop.h5:raw {t}/layer --resolution nan,8,8", ["--resolution", "nan"]),
    ("export-levels-negative", "export {d}/crop.h5:raw {t}/layer --levels -1", ["--levels", "-1"]),
    ("export-missing-dataset", "export {d}/crop.h5:nope {t}/layer", ["crop.h5", "nope"]),
    ("export-dest-is-a-file", "export {d}/crop.h5:raw {d}/afile", ["afile"]),
    ("export-dest-is-a-file-overwrite", "export {d}/crop.h5:raw {d}/afile --overwrite",
     ["afile: exists and is not a directory"]),
    # ---- demo and the parser
    ("demo-out-is-a-file", "demo --out {d}/afile -q --device cpu --threads 1", ["afile exists and is not a directory"]),
    ("demo-out-under-a-file", "demo --out {d}/afile/x -q --device cpu --threads 1",
     ["afile exists and is not a directory"]),
    ("demo-threads-abc", "demo --out {t}/demo --threads abc", ["--threads", "abc"]),
    ("unknown-command", "bogus", ["bogus"]),
    ("segment-missing-arguments", "segment", ["image", "out"]),
    # ---- looking at the result: export --meshes/--skeletons, stats, view --show (issue 31)
    ("meshes-of-an-image", "export {d}/crop.h5:float_nan {t}/layer --meshes", ["float_nan", "not a label volume"]),
    ("meshes-of-uint8-auto", "export {d}/crop.h5:raw {t}/layer --skeletons", ["crop.h5", "not a label volume"]),
    ("meshes-dest-exists", "export {d}/crop.h5:labels {d}/wd_ok --meshes", ["wd_ok", "--overwrite"]),
    ("meshes-to-a-bucket", "export {d}/crop.h5:labels gs://ffn-no-such-bucket-xyz/l --meshes",
     ["gs://ffn-no-such-bucket-xyz/l", "directory"]),
    ("export-unreachable-bucket", "export {d}/crop.h5:labels gs://ffn-no-such-bucket-xyz/layer",
     ["gs://ffn-no-such-bucket-xyz/layer", "cannot reach"]),
    ("export-parallel-without-meshes", "export {d}/crop.h5:labels {t}/layer --parallel 2", ["--parallel"]),
    ("export-join-without-meshes", "export {d}/crop.h5:labels {t}/layer --join", ["--join"]),
    ("export-parallel-negative", "export {d}/crop.h5:labels {t}/layer --meshes --parallel -1", ["--parallel", "-1"]),
    ("export-skeleton-dust-abc", "export {d}/crop.h5:labels {t}/layer --skeletons --skeleton-dust abc",
     ["--skeleton-dust", "abc"]),
    ("stats-of-floats", "stats {d}/crop.h5:float_nan --out {t}/o.csv", ["float_nan", "not a label"]),
    ("stats-negative-labels", "stats {d}/crop.h5:neg --out {t}/o.csv", ["neg", "negative"]),
    ("stats-labels-shape-mismatch", "stats {d}/crop.h5:labels --labels {d}/crop.h5:shape2 --out {t}/o.csv",
     ["shape2"]),
    ("stats-out-exists", "stats {d}/crop.h5:labels --out {d}/afile", ["--out", "afile", "--overwrite"]),
    ("stats-skeletons-not-a-layer", "stats {d}/crop.h5:labels --skeletons {d}/wd_ok --out {t}/o.csv", ["wd_ok"]),
    ("stats-missing-out", "stats {d}/crop.h5:labels", ["--out"]),
    ("stats-missing-dataset", "stats {d}/crop.h5:nope --out {t}/o.csv", ["crop.h5", "nope"]),
    ("view-show-abc", "view {d}/crop.h5:raw --show abc", ["--show", "abc"]),
    ("view-show-negative", "view {d}/crop.h5:raw --show -3", ["--show", "-3"]),
    # ---- learned refinement (issue 29): ffn train-refine, ffn segment --refine --refine-model
    ("train-refine-labels-shape", TR + "{d}/crop.h5:shape2 " + M + " --out {t}/m.json",
     ["crop.h5:shape2", "(32, 40, 44)", "(32, 48, 48)"]),
    ("train-refine-labels-float", TR + "{d}/crop.h5:float_nan " + M + " --out {t}/m.json",
     ["crop.h5:float_nan", "integer"]),
    ("train-refine-labels-negative", TR + "{d}/crop.h5:neg " + M + " --out {t}/m.json", ["crop.h5:neg", "negative"]),
    ("train-refine-labels-missing", TR + "{d}/crop.h5:nope " + M + " --out {t}/m.json", ["crop.h5", "nope"]),
    ("train-refine-odd-volumes", "train-refine {d}/crop.h5:raw --out {t}/m.json " + M, ["IMAGE LABELS", "crop.h5:raw"]),
    ("train-refine-out-exists", TR + "{d}/crop.h5:labels " + M + " --out {d}/afile", ["afile", "--overwrite"]),
    ("train-refine-out-is-input", TR + "{d}/crop.h5:labels " + M + " --out {d}/crop.h5 --overwrite",
     ["crop.h5", "input"]),
    ("train-refine-out-is-dir", TR + "{d}/crop.h5:labels " + M + " --out {d}/adir --overwrite", ["adir", "directory"]),
    ("train-refine-threshold", TR + "{d}/crop.h5:labels " + M + " --out {t}/m.json --threshold 1.5",
     ["--threshold", "1.5"]),
    ("train-refine-bad-flood-model", "train-refine {d}/crop.h5:raw {d}/crop.h5:labels --out {t}/m.json --model "
     "{d}/notes.txt -q --device cpu --threads 1", ["notes.txt"]),
    ("segment-refine-model-not-json", SEG + " --refine --refine-model {d}/notes.txt", ["notes.txt", "not a refine model"]),
    ("segment-refine-model-missing", SEG + " --refine --refine-model {d}/nope.json", ["nope.json"]),
    ("segment-refine-model-version", SEG + " --refine --refine-model {d}/refine_v99.json",
     ["refine_v99.json", "format version 99"]),
    ("segment-refine-model-features", SEG + " --refine --refine-model {d}/refine_features.json",
     ["refine_features.json", "other features"]),
    ("segment-refine-model-without-refine", SEG + " --refine-model {d}/refine_v99.json", ["--refine-model", "--refine"]),
    ("segment-block-refine-model", SEG + " --block 16,24,24 --refine --refine-model {d}/refine_v99.json",
     ["refine_v99.json", "format version 99"]),
    # ---- learned refinement in block mode (issue 29 item 5): the model is read before any block
    ("segment-block-refine-model-broken", SEG + " --block 16,24,24 --refine --refine-model {d}/notes.txt",
     ["notes.txt", "not a refine model"]),
    ("segment-block-refine-model-missing", SEG + " --block 16,24,24 --refine --refine-model {d}/nope.json",
     ["nope.json"]),
    # -- the learned refinement by default (session 14): a hand-step option with it names itself
    ("segment-refine-default-hand-option", SEG + " --refine --set refine.gap_min_core=10",
     ["refine.gap_min_core=10", "refine.model=hand"]),
    ("segment-block-refine-default-hand-option", SEG + " --block 16,24,24 --refine --set refine.rejoin_fraction=0.3",
     ["refine.rejoin_fraction=0.3", "refine.model=hand"]),
]


def test_table_is_large_and_unique():
    assert len(CASES) >= 70
    assert len({c[0] for c in CASES}) == len(CASES)


LEFTOVERS = ("*.tmp-*", "*.lock", "*.resume.npz", "*.tmp")


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_and_changes_nothing(inputs, tmp_path, capsys, caplog, argv, needles):
    out = tmp_path / "out"
    out.mkdir()
    subst = {"d": str(inputs), "t": str(out)}
    args = [tok.format(**subst) for tok in argv.split()]
    needles = [n.format(**subst) for n in needles]
    before = snapshot(inputs)
    capsys.readouterr()

    with caplog.at_level(logging.WARNING):
        rc = main(args)

    cap = capsys.readouterr()
    err = cap.err
    shown = f"rc={rc} stderr={err!r} stdout={cap.out[-300:]!r}"
    assert rc == 2, shown
    assert "Traceback" not in err, shown
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), shown
    assert lines[0].startswith("ffn: error: "), shown
    for n in needles:
        assert n in lines[0], f"{n!r} not named: {shown}"
    # A real `ffn` process prints warnings on stderr too (logging.basicConfig in main); under pytest
    # they go to caplog instead, so a warning would be a second line.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, f"warnings beside the error line: {warned}; {shown}"
    after = snapshot(inputs)
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not changed, f"inputs changed: {changed}; {shown}"
    assert not sorted(set(before) - set(after)), f"inputs removed: {sorted(set(before) - set(after))}"
    assert not sorted(set(after) - set(before)), f"files left beside the inputs: {sorted(set(after) - set(before))}"
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not left, f"left in the output directory: {left}; {shown}"
    for pat in LEFTOVERS:
        assert not list(tmp_path.rglob(pat)), f"half-written {pat} left; {shown}"
