"""The schema of a model file's ``__meta__`` (issue 30): every field's type, range and length is
checked on load, by ``ffn segment --model`` and ``ffn train --init`` alike (both through
:func:`floodfilling.model.load_model`); a malformed field is one ModelError naming the file and
the field, never a traceback, a bare conversion error or a silently wrong model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from floodfilling.cli import main
from floodfilling.model import (META_SCHEMA, ModelError, bundled_model_path, check_meta, load_model)
from floodfilling.testing import mean_flood_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, dict]:
    """(the tiny model's arrays without __meta__, its meta)."""
    p = mean_flood_model(tmp_path_factory.mktemp("schema") / "tiny.npz")
    arrays = dict(np.load(p))
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    return arrays, meta


def write_model(path: Path, arrays: dict, meta_text: str) -> Path:
    np.savez(path, **arrays, __meta__=np.frombuffer(meta_text.encode(), np.uint8))
    return path


NAN = float("nan")
# (id, fields to set (None: delete), the field named in the error, words of the error)
BAD_FIELDS = [
    ("model-other", {"model": "resnet"}, "model", "unsupported architecture"),
    ("model-number", {"model": 3}, "model", "convstack_3d"),
    ("depth-string", {"depth": "1"}, "depth", "an integer"),
    ("depth-bool", {"depth": True}, "depth", "an integer"),
    ("depth-float", {"depth": 1.0}, "depth", "an integer"),
    ("depth-nan", {"depth": NAN}, "depth", "an integer"),
    ("depth-zero", {"depth": 0}, "depth", "[1, 1024]"),
    ("depth-huge", {"depth": 10**30}, "depth", "[1, 1024]"),
    ("depth-other-than-the-arrays", {"depth": 12}, "depth", "depth-1 network"),
    ("features-negative", {"features": -4}, "features", "[1, 4096]"),
    ("features-other-than-the-arrays", {"features": 32}, "features", "4 output features"),
    ("fov-even", {"fov_zyx": [8, 9, 9]}, "fov_zyx", "odd"),
    ("fov-negative", {"fov_zyx": [-9, 9, 9]}, "fov_zyx", "odd integers in [3, 1023]"),
    ("fov-two-values", {"fov_zyx": [9, 9]}, "fov_zyx", "3 odd integers"),
    ("fov-object", {"fov_zyx": {"z": 9}}, "fov_zyx", "3 odd integers"),
    ("fov-strings", {"fov_zyx": ["9", "9", "9"]}, "fov_zyx", "3 odd integers"),
    ("fov-xyz-bool", {"fov_zyx": None, "fov_size_xyz": [True, 9, 9]}, "fov_size_xyz", "3 odd integers"),
    ("fov-xyz-disagrees", {"fov_size_xyz": [9, 9, 11]}, "fov_size_xyz", "disagree"),
    ("deltas-four", {"deltas_zyx": [2, 2, 2, 2]}, "deltas_zyx", "3 integers"),
    ("deltas-negative", {"deltas_zyx": [-2, 2, 2]}, "deltas_zyx", "3 integers in [0, 511]"),
    ("deltas-beyond-the-fov", {"deltas_zyx": [5, 2, 2]}, "deltas_zyx", "half the FOV"),
    ("deltas-xyz-float", {"deltas_zyx": None, "deltas_xyz": [2.5, 2, 2]}, "deltas_xyz", "3 integers"),
    ("intensity-list", {"intensity": [128, 33]}, "intensity", "an object"),
    ("intensity-mean-string", {"intensity": {"mean": "128", "std": 33}}, "intensity.mean", "a finite number"),
    ("intensity-mean-nan", {"intensity": {"mean": NAN, "std": 33}}, "intensity.mean", "a finite number"),
    ("intensity-mean-1e300", {"intensity": {"mean": 1e300, "std": 33}}, "intensity.mean", "3.40282e+38"),
    ("intensity-std-zero", {"intensity": {"mean": 128, "std": 0}}, "intensity.std", "a finite number in"),
    ("intensity-std-negative", {"intensity": {"mean": 128, "std": -33}}, "intensity.std", "a finite number in"),
    ("intensity-std-bool", {"intensity": {"mean": 128, "std": True}}, "intensity.std", "a finite number"),
    ("intensity-quantiles-short", {"intensity": {"mean": 128, "std": 33, "quantiles": [1, 2, 3]}},
     "intensity.quantiles", "101 non-decreasing"),
    ("intensity-quantiles-decreasing", {"intensity": {"mean": 128, "std": 33, "quantiles": list(range(101))[::-1]}},
     "intensity.quantiles", "101 non-decreasing"),
    ("intensity-unknown-key", {"intensity": {"mean": 128, "std": 33, "sd": 3}}, "intensity.sd", "unknown field"),
    ("inference-settings-list", {"inference_settings": [0.95]}, "inference_settings", "an object"),
    ("inference-settings-stddev-zero", {"inference_settings": {"image_stddev": 0}}, "inference_settings.image_stddev",
     "a finite number in"),
    ("inference-settings-threshold-2", {"inference_settings": {"move_threshold": 2}},
     "inference_settings.move_threshold", "a probability"),
    ("unknown-field", {"fov_zxy": [9, 9, 9]}, "fov_zxy", "unknown field"),
    ("trained-steps-negative", {"trained_steps": -1}, "trained_steps", "an integer"),
    ("source-number", {"source": 7}, "source", "a string"),
]


@pytest.mark.parametrize("changes, field, words", [pytest.param(c, f, w, id=i) for i, c, f, w in BAD_FIELDS])
def test_each_malformed_field_names_the_file_and_the_field(tiny, tmp_path, changes, field, words):
    arrays, meta = tiny
    meta = dict(meta)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    p = write_model(tmp_path / "bad.npz", arrays, json.dumps(meta))  # NaN as the bare token NaN, as json writes
    with pytest.raises(ModelError) as exc:
        load_model(p)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{p}: __meta__"), msg
    assert field in msg and words in msg, msg


@pytest.mark.parametrize("text, words", [("[1, 2]", "a JSON list, expected an object"),
                                         ('"convstack_3d"', "a JSON string"), ("7", "a JSON number"),
                                         ("{not json", "not UTF-8 JSON")])
def test_meta_that_is_not_an_object(tiny, tmp_path, text, words):
    p = write_model(tmp_path / "bad.npz", tiny[0], text)
    with pytest.raises(ModelError, match=f"^{p}: __meta__ .*{words}"):
        load_model(p)


def test_every_schema_field_has_a_bad_case():
    named = {f.split(".")[0] for _, c, f, _ in BAD_FIELDS}
    missing = set(META_SCHEMA) - named - {"trained_on", "weight_layout", "architecture", "global_step",
                                          "input_channels", "training"}  # free provenance, typed like source
    assert not missing, missing


def test_good_metadata_loads(tiny, tmp_path):
    arrays, meta = tiny
    _, info = load_model(write_model(tmp_path / "ok.npz", arrays, json.dumps(meta)))
    assert info.fov_zyx == (9, 9, 9) and info.deltas_zyx == (2, 2, 2) and info.image_std == 33.0
    xyz = {k: v for k, v in meta.items() if k not in ("fov_zyx", "deltas_zyx")}
    xyz.update(fov_size_xyz=[9, 9, 9], deltas_xyz=[2, 2, 2], trained_steps=5, source="a test",
               inference_settings={"image_mean": 128, "image_stddev": 33, "seed_policy": "PolicyPeaks", "other": 1})
    _, info = load_model(write_model(tmp_path / "xyz.npz", arrays, json.dumps(xyz)))
    assert info.fov_zyx == (9, 9, 9)


def test_bundled_model_passes_the_schema():
    z = np.load(bundled_model_path())
    check_meta(json.loads(bytes(z["__meta__"]).decode()), "bundled")


def test_depth_of_the_meta_is_checked_against_the_arrays_before_building(tiny, tmp_path, monkeypatch):
    """A depth of 1000 in the meta of a depth-1 file: refused before a 1000-module network is built."""
    import floodfilling.model as m

    built = []
    monkeypatch.setattr(m.ConvStack3D, "__init__", lambda self, *a, **k: built.append(a) or None)
    arrays, meta = tiny
    p = write_model(tmp_path / "deep.npz", arrays, json.dumps({**meta, "depth": 1000}))
    with pytest.raises(ModelError, match="depth=1000 but the file holds the weights of a depth-1 network"):
        load_model(p)
    assert built == []


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    import h5py

    from floodfilling.demo import demo_crop_path

    p = tmp_path_factory.mktemp("schema_crop") / "crop.h5"
    with h5py.File(demo_crop_path(), "r") as src, h5py.File(p, "w") as f:
        f["raw"] = src["raw"][:24, :32, :32]
        f["labels"] = src["labels"][:24, :32, :32].astype(np.uint32)
    return p


@pytest.mark.parametrize("changes, words", [({"fov_zyx": [9, 9]}, "fov_zyx=[9, 9]"),
                                            ({"intensity": {"mean": 128, "std": "x"}}, 'intensity.std="x"')])
def test_segment_model_and_train_init_share_the_schema(tiny, tmp_path, crop, capsys, changes, words):
    arrays, meta = tiny
    p = write_model(tmp_path / "bad.npz", arrays, json.dumps({**meta, **changes}))
    out = tmp_path / "out"
    out.mkdir()
    runs = {
        "segment": ["segment", f"{crop}:raw", f"{out}/o.h5:seg", "--model", str(p), "-q", "--device", "cpu"],
        "train": ["train", "--image", f"{crop}:raw", "--labels", f"{crop}:labels", "--out", str(out / "run"),
                  "--init", str(p), "--max-steps", "1", "--batch", "1", "--min-size", "10", "--device", "cpu",
                  "--no-tensorboard", "-q"],
    }
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert str(p) in lines[0] and words in lines[0], (name, lines[0])
        assert list(out.iterdir()) == [], (name, list(out.iterdir()))
