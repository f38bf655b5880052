"""Every option is type-checked where it is defined: the same rules and one-line messages for
TOML, ``--set``, the command-line flags and the library API (issue 13, items 2, 3 and 7)."""

import math
import types

import numpy as np
import pytest

from floodfilling.cli import main
from floodfilling.config import ConfigError, InferenceConfig


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffn: error:") and "\n" not in err, err
    return err


# -- the library: InferenceConfig ---------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"min_segment_size": 1.5}, "option min_segment_size=1.5: expected an integer >= 0"),
    ({"min_segment_size": "abc"}, "option min_segment_size='abc': expected an integer"),
    ({"min_segment_size": True}, "min_segment_size=True"),  # a bool is not an integer
    ({"dust_size": 2.5}, "option dust_size=2.5: expected an integer >= 0"),
    ({"seed_fill_passes": "abc"}, "option seed_fill_passes='abc'"),
    ({"merge_min_voxels": 10.0}, "option merge_min_voxels=10.0"),
    ({"threads": 1.5}, "option threads=1.5"),
    ({"split_components": "no"}, "option split_components='no': expected true or false"),
    ({"split_components": "False"}, "option split_components='False': expected true or false"),
    ({"split_components": 1}, "option split_components=1: expected true or false"),
    ({"move_threshold": "abc"}, "option move_threshold='abc'"),
    ({"move_threshold": float("nan")}, "option move_threshold=nan"),
    ({"move_threshold": 1}, "option move_threshold=1: expected a probability strictly between 0 and 1"),
    ({"pad_value": float("nan")}, "option pad_value=nan"),
    ({"pad_value": float("inf")}, "option pad_value=inf"),
    ({"image_mean": float("nan")}, "option image_mean=nan: expected a finite number"),
    ({"image_mean": "abc"}, "option image_mean='abc'"),
    ({"image_std": float("inf")}, "option image_std=inf"),
    ({"checkpoint_interval_s": float("nan")}, "option checkpoint_interval_s=nan: expected a finite number >= 0"),
    ({"checkpoint_interval_s": float("inf")}, "option checkpoint_interval_s=inf"),
    ({"disco_seed_threshold": float("nan")}, "option disco_seed_threshold=nan"),
    ({"seed_fill_min_radius": float("inf")}, "option seed_fill_min_radius=inf"),
    ({"merge_min_iou": float("nan")}, "option merge_min_iou=nan"),
    ({"min_boundary_dist_zyx": "abc"}, "option min_boundary_dist_zyx='abc': expected 3 integers >= 0 (z, y, x)"),
    ({"min_boundary_dist_zyx": (1, 1.5, 1)}, "option min_boundary_dist_zyx=(1, 1.5, 1)"),
    ({"min_boundary_dist_zyx": (1, 1)}, "option min_boundary_dist_zyx=(1, 1)"),
    ({"min_boundary_dist_zyx": 3}, "option min_boundary_dist_zyx=3"),
    ({"device": 0}, "option device=0: expected a string"),
    ({"seed_policy": ["peaks"]}, "option seed_policy=['peaks']"),
])
def test_library_rejects_wrong_types(kw, words):
    with pytest.raises(ConfigError) as e:
        InferenceConfig(**kw).validate()
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match=list(kw)[0]):  # with_overrides goes through the same check
        InferenceConfig().with_overrides(**kw)


def test_library_accepts_and_normalises_valid_values():
    cfg = InferenceConfig(pad_value=0.05, seed_fill_min_radius=4, image_mean=100, image_std=np.float32(30),
                          min_boundary_dist_zyx=[2, 2, 2], min_segment_size=np.int64(500), disco_seed_threshold=-1,
                          split_components=np.bool_(True), checkpoint_interval_s=0).validate()
    assert cfg.seed_fill_min_radius == 4.0 and type(cfg.seed_fill_min_radius) is float
    assert type(cfg.image_mean) is float and type(cfg.image_std) is float
    assert cfg.min_boundary_dist_zyx == (2, 2, 2) and type(cfg.min_segment_size) is int
    assert cfg.split_components is True and cfg.disco_seed_threshold == -1.0
    assert InferenceConfig().with_overrides(split_components=True, dust_size=10).dust_size == 10
    assert InferenceConfig().with_overrides(image_mean=None).image_mean is None  # None: not overridden


def test_with_overrides_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown option.*min_segmentsize"):
        InferenceConfig().with_overrides(min_segmentsize=5)


def test_check_option():
    assert InferenceConfig.check_option("seed_fill_min_radius", 3) == 3.0
    with pytest.raises(ConfigError, match=r"^--image-mean nan: expected a finite number$"):
        InferenceConfig.check_option("image_mean", float("nan"), label="--image-mean nan")


# -- TOML -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    ('split_components = "no"', "split_components='no': expected true or false"),
    ('split_components = "false"', "split_components='false'"),
    ("split_components = 0", "split_components=0"),
    ("min_segment_size = 1.5", "min_segment_size=1.5: expected an integer >= 0"),
    ('min_segment_size = "500"', "min_segment_size='500'"),
    ("dust_size = true", "dust_size=True"),
    ("move_threshold = 1", "move_threshold=1"),
    ("move_threshold = nan", "move_threshold=nan"),
    ("pad_value = inf", "pad_value=inf"),
    ("checkpoint_interval_s = nan", "checkpoint_interval_s=nan"),
    ('min_boundary_dist_zyx = "abc"', "min_boundary_dist_zyx='abc'"),
    ("min_boundary_dist_zyx = [1, 2]", "min_boundary_dist_zyx=(1, 2)"),
    ("seed_policy = 3", "seed_policy=3"),
])
def test_toml_rejects_wrong_types(tmp_path, line, words):
    p = tmp_path / "c.toml"
    p.write_text(f"[inference]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        InferenceConfig.from_toml(p)
    msg = str(e.value)
    assert str(p) in msg and words in msg and "\n" not in msg, msg


def test_toml_valid_values(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[inference]\nmin_segment_size = 500\nsplit_components = true\npad_value = 0.05\n"
                 "seed_fill_min_radius = 3\nmin_boundary_dist_zyx = [2, 2, 2]\nimage_mean = 120\n")
    cfg = InferenceConfig.from_toml(p)
    assert cfg.min_segment_size == 500 and cfg.split_components is True and cfg.pad_value == 0.05
    assert cfg.seed_fill_min_radius == 3.0 and cfg.min_boundary_dist_zyx == (2, 2, 2) and cfg.image_mean == 120.0


def test_config_output_round_trips(tmp_path, capsys):
    assert main(["config"]) == 0
    p = tmp_path / "c.toml"
    p.write_text(capsys.readouterr().out)
    assert InferenceConfig.from_toml(p) == InferenceConfig()
    cfg = InferenceConfig(min_segment_size=7, split_components=True, image_mean=100.0, seed_fill_min_radius=2.5)
    p.write_text(cfg.validate().to_toml())
    assert InferenceConfig.from_toml(p) == cfg


def test_unreadable_config_files(tmp_path, capsys):
    binary = tmp_path / "model.npz"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe\x80\x81 binary")
    with pytest.raises(ConfigError, match="model.npz"):
        InferenceConfig.from_toml(binary)
    out = tmp_path / "o.h5"
    for bad in (binary, tmp_path):  # a binary file, a directory
        assert main(["segment", "in.h5:raw", f"{out}:seg", "--config", str(bad), "-q"]) == 2
        assert str(bad) in one_error_line(capsys)
    p = tmp_path / "list.toml"
    p.write_text("inference = 3\n")
    with pytest.raises(ConfigError, match="list.toml"):
        InferenceConfig.from_toml(p)
    assert not out.exists()


# -- the command line -----------------------------------------------------------------------------

@pytest.fixture
def fake_segment(monkeypatch):
    """Replaces the segmentation itself: records the config ffn segment hands over."""
    import floodfilling.distributed.run as run_mod
    import floodfilling.inference.segment as seg_mod

    got = {}

    def segment(image, out, *, config, **kw):
        got.update(config=config, **kw)
        return types.SimpleNamespace(counters={"objects": 1, "steps": 1}, seconds=0.0)

    def segment_blocks(image, out, *, config, **kw):
        got.update(config=config, blocks=True, **kw)

    monkeypatch.setattr(seg_mod, "segment", segment)
    monkeypatch.setattr(run_mod, "segment_blocks", segment_blocks)
    return got


@pytest.mark.parametrize("args, words", [
    (["--set", "min_segment_size=1.5"], "option min_segment_size=1.5: expected an integer >= 0"),
    (["--set", "min_segment_size=abc"], "option min_segment_size='abc'"),
    (["--set", "dust_size=2.5"], "option dust_size=2.5"),
    (["--set", "seed_fill_passes=1.5"], "option seed_fill_passes=1.5"),
    (["--set", "split_components=maybe"], "option split_components='maybe': expected true or false"),
    (["--set", "split_components=False"], "option split_components='False'"),
    (["--set", "split_components=1"], "option split_components=1"),
    (["--set", "move_threshold=abc"], "option move_threshold='abc'"),
    (["--set", "pad_value=nan"], "option pad_value=nan"),
    (["--set", "min_boundary_dist_zyx=abc"], "option min_boundary_dist_zyx='abc'"),
    (["--set", "min_boundary_dist_zyx=[1,1]"], "option min_boundary_dist_zyx=(1, 1)"),
    (["--image-mean", "nan"], "--image-mean nan: expected a finite number"),
    (["--image-mean", "inf"], "--image-mean inf"),
    (["--image-std", "nan"], "--image-std nan"),
    (["--image-std", "0"], "--image-std 0.0: expected a finite number in [1.17549e-38, 3.40282e+38]"),
    (["--checkpoint-interval", "nan"], "--checkpoint-interval nan: expected a finite number >= 0"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval -1.0"),
    (["--threads", "-2"], "--threads -2: expected an integer in [0, 1024]"),
    (["--inflight", "2"], "--inflight 2: only with block inference (--block or --workdir)"),
    (["--halo", "8,8,8"], "--halo 8,8,8: only with block inference"),
])
def test_segment_rejects_bad_options(tmp_path, capsys, fake_segment, args, words):
    out = tmp_path / "o.h5"
    assert main(["segment", "in.h5:raw", f"{out}:seg", "-q", *args]) == 2
    err = one_error_line(capsys)
    assert words in err, err
    assert not fake_segment and not out.exists()


def test_segment_valid_options_reach_the_run(tmp_path, capsys, fake_segment):
    out = tmp_path / "o.h5"
    toml = tmp_path / "c.toml"
    toml.write_text("[inference]\nmin_segment_size = 500\npad_value = 0.05\n")
    assert main(["segment", "in.h5:raw", f"{out}:seg", "-q", "--config", str(toml), "--set", "split_components=true",
                 "--set", "seed_fill_min_radius=3", "--image-mean", "120", "--checkpoint-interval", "0",
                 "--threads", "1"]) == 0, capsys.readouterr().err
    cfg = fake_segment["config"]
    assert cfg.min_segment_size == 500 and cfg.pad_value == 0.05 and cfg.split_components is True
    assert cfg.seed_fill_min_radius == 3.0 and cfg.image_mean == 120.0 and cfg.normalise == "fixed"
    assert cfg.checkpoint_interval_s == 0.0 and cfg.threads == 1
    fake_segment.clear()
    assert main(["segment", "in.h5:raw", f"{out}:seg", "-q", "--block", "24,48,48", "--inflight", "2",
                 "--halo", "8,8,8"]) == 0
    assert fake_segment["blocks"] and fake_segment["inflight"] == 2 and fake_segment["halo"] == (8, 8, 8)
    fake_segment.clear()
    assert main(["segment", "in.h5:raw", f"{out}:seg", "-q", "--workdir", str(tmp_path / "w"), "--inflight", "2"]) == 0
    assert fake_segment["inflight"] == 2


@pytest.mark.parametrize("args, words", [
    (["segment", "a.h5:raw", "b.h5:seg", "--threads", "abc"], "--threads"),
    (["segment", "a.h5:raw", "b.h5:seg", "--inflight", "1.5"], "--inflight"),
    (["segment", "a.h5:raw", "b.h5:seg", "--precision", "fp64"], "--precision"),
    (["segment", "a.h5:raw"], "out"),
    (["train", "--image", "a.h5:raw", "--labels", "a.h5:lab", "--out", "run", "--lr", "abc"], "--lr"),
    (["train", "--image", "a.h5:raw", "--labels", "a.h5:lab", "--out", "run", "--thresholds", "0.5,nan"],
     "--thresholds"),
    (["prepare", "a.h5:lab", "p.h5", "--radius", "abc"], "--radius"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_argument_errors_are_one_line(capsys, args, words):
    assert main(args) == 2
    err = one_error_line(capsys)
    assert words in err, err
    if args[-1] in ("abc", "1.5", "fp64"):
        assert args[-1] in err  # the value, too


def test_interrupt_messages(tmp_path, capsys, monkeypatch, fake_segment):
    import floodfilling.inference.segment as seg_mod
    import floodfilling.training.train as train_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", "--image", "a.h5:raw", "--labels", "a.h5:lab", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == "ffn: interrupted (rerun with --resume to continue)"
    monkeypatch.setattr(seg_mod, "segment", interrupted)
    assert main(["segment", "a.h5:raw", f"{tmp_path / 'o.h5'}:seg", "-q"]) == 130
    assert capsys.readouterr().err.strip() == "ffn: interrupted (rerun the same command to resume)"


# -- training options -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "0"], "--lr 0.0"),
    (["--lr", "-0.1"], "--lr -0.1"),
    (["--momentum", "nan"], "--momentum nan"),
    (["--momentum", "1.5"], "--momentum 1.5: expected a finite number in [0, 1)"),
    (["--clip", "nan"], "--clip nan"),
    (["--clip", "-1"], "--clip -1.0"),
    (["--image-mean", "inf"], "--image-mean inf"),
    (["--image-std", "nan"], "--image-std nan"),
    (["--image-std", "0"], "--image-std 0.0"),
    (["--checkpoint-secs", "nan"], "--checkpoint-secs nan"),
    (["--checkpoint-secs", "-5"], "--checkpoint-secs -5.0"),
    (["--batch", "0"], "--batch 0: expected an integer in [1, 4096]"),
    (["--max-steps", "-1"], "--max-steps -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1"),
    (["--fov", "0,9,9"], "--fov 0,9,9"),
    (["--thresholds", "0.5,0.2"], "--thresholds"),
])
def test_train_rejects_bad_options_before_creating_anything(tmp_path, capsys, args, words):
    run = tmp_path / "run"
    assert main(["train", "--image", f"{tmp_path / 'none.h5'}:raw", "--labels", f"{tmp_path / 'none.h5'}:lab",
                 "--out", str(run), "-q", *args]) == 2
    err = one_error_line(capsys)
    assert words in err, err
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_train_options_library():
    from floodfilling.training.train import TrainError, TrainOptions, check_options

    opts = check_options(TrainOptions(image="a.h5:raw", labels="a.h5:lab", out="run", lr=1, fov=[9, 9, 9],
                                      thresholds=[0.1, 0.5], image_mean=np.float32(3)))
    assert opts.lr == 1.0 and type(opts.lr) is float and opts.fov == (9, 9, 9) and opts.thresholds == (0.1, 0.5)
    assert type(opts.volumes[0].image_mean) is float and opts.image_mean is None  # the one volume, in volumes
    for kw, words in [({"lr": math.nan}, "lr=nan"), ({"batch": 2.5}, "batch=2.5"),
                      ({"augment": "no"}, "augment='no'"), ({"max_steps": True}, "max_steps=True"),
                      ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"), ({"lr_scaling": "cube"}, "lr_scaling=")]:
        with pytest.raises(TrainError) as e:
            check_options(TrainOptions(image="a.h5:raw", labels="a.h5:lab", out="run", **kw))
        assert words in str(e.value), str(e.value)


def test_every_option_has_a_stage_and_choices_are_checked():
    from floodfilling.config import CHOICES, OPTION_STAGES, InferenceConfig, check_choice
    from dataclasses import fields

    assert {f.name for f in fields(InferenceConfig)} == set(OPTION_STAGES)  # a new option needs its stage
    cfg = InferenceConfig()
    assert set(cfg.options_of("runtime")) == {"device", "threads", "kernels", "checkpoint_interval_s", "prefetch"}
    assert set(cfg.options_of("flood", "postprocess", "blocks", "runtime")) == set(OPTION_STAGES)
    assert "split_components" in cfg.options_of("postprocess") and "merge_min_iou" not in cfg.options_of("flood")
    with pytest.raises(ValueError, match="stages"):
        cfg.options_of("bogus")
    for name, choices in CHOICES.items():
        assert check_choice(name, choices[0]) == choices[0]
        with pytest.raises(ConfigError, match=f"option {name}='nope': expected '{choices[0]}'"):
            check_choice(name, "nope")
