"""Numbers at the edge (issue 30): every numeric option has a type and a range, resource options
an upper bound, and a bad one fails before any work with one line naming it; intensities at the
edge of float64 / float32 are normalised safely or refused; a closed stdout ends quietly; every
line `ffn config` prints loads when uncommented."""

from __future__ import annotations

import argparse
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np
import pytest

from floodfilling import normalise
from floodfilling.cli import _build_config, _build_refine, build_parser, main
from floodfilling.config import (INT64_MAX, MAX_INFLIGHT, MAX_PREFETCH, MAX_THREADS, ConfigError, InferenceConfig,
                                 RefineConfig)
from floodfilling.demo import demo_crop_path
from floodfilling.testing import mean_flood_model

REPO = Path(__file__).resolve().parents[1]
HUGE = str(2**70)  # beyond int64


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffn: error: ") and "Traceback" not in err, err
    return lines[0]


# -- option ranges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ok, bad", [("threads", MAX_THREADS, MAX_THREADS + 1), ("threads", 0, 100000),
                                           ("prefetch", MAX_PREFETCH, MAX_PREFETCH + 1)])
def test_resource_options_have_an_upper_bound(name, ok, bad):
    assert InferenceConfig.check_option(name, ok) == ok
    with pytest.raises(ConfigError, match=rf"option {name}={bad}: expected an integer in \[0, {ok if ok else 1024}\]"):
        InferenceConfig.check_option(name, bad)


@pytest.mark.parametrize("cls", [InferenceConfig, RefineConfig])
def test_no_integer_option_goes_beyond_int64(cls):
    """Every integer option (and each item of a z,y,x option) refuses 2**63 and beyond, naming
    it, instead of handing numpy / h5py an object array or an OverflowError."""
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in fields(cls):
        ann = hints[f.name]
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if ann is int or args == [int]:
            value: object = 2**63
        elif typing.get_origin(ann) is tuple and typing.get_args(ann)[0] is int:
            value = (2**63, 1, 1)
        else:
            continue
        with pytest.raises(ConfigError, match=rf"{f.name}=.*int64"):
            cls.from_dict({f.name: value})
        checked += 1
    assert checked >= 3


def _minimal_argv(sub: argparse.ArgumentParser, command: str) -> list[str]:
    """Arguments that parse for ``command`` (positionals and required options as dummies)."""
    argv = [command]
    for a in sub._actions:
        if not a.option_strings and a.dest != "help":
            argv += ["x"] if a.nargs in (None, 1, "+") else []
        elif a.required:
            argv += [a.option_strings[0], "x"]
    return argv


def _numeric_flags():
    """(command, flag, bad value) for every int, float and z,y,x flag of every subcommand."""
    ap = build_parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    from floodfilling.cli import zyx_arg

    out = []
    for command, sub in subs.choices.items():
        for a in sub._actions:
            if not a.option_strings:
                continue
            if a.type in (int, zyx_arg):
                out.append((command, a.option_strings[0], HUGE, _minimal_argv(sub, command)))
            elif a.type is float or getattr(a.type, "__name__", "") == "_floats":
                out.append((command, a.option_strings[0], "1e999", _minimal_argv(sub, command)))
    return out


NUMERIC_FLAGS = _numeric_flags()


def test_every_command_has_numeric_flags_listed():
    commands = {c for c, *_ in NUMERIC_FLAGS}
    assert {"segment", "agglomerate", "train", "prepare", "consensus", "export", "view", "demo", "evaluate"} <= commands
    assert len(NUMERIC_FLAGS) >= 30


@pytest.mark.parametrize("command, flag, value, argv", NUMERIC_FLAGS,
                         ids=[f"{c}{f}" for c, f, _, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_refuses_an_out_of_range_number(command, flag, value, argv, capsys, tmp_path,
                                                           monkeypatch):
    """An integer beyond int64 (or a float that overflows to inf) on any numeric flag of any
    command: exit 2, one line naming the flag, before the command runs (its arguments here are
    dummies that would fail later)."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, flag, value]) == 2
    line = one_error_line(capsys)
    assert flag in line and ("expected" in line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["segment", "a.h5:raw", "o.h5:seg", "--threads", "100000"], "--threads 100000: expected an integer in [0, 1024]"),
    (["segment", "a.h5:raw", "o.h5:seg", "--block", "8", "--inflight", "100000"],
     f"--inflight 100000: expected an integer <= {MAX_INFLIGHT}"),
    (["agglomerate", "a.h5:raw", "s.h5:seg", "o.h5:seg", "--inflight", "100000"], "--inflight 100000"),
    (["demo", "--threads", "5000"], "--threads 5000: expected an integer in [0, 1024]"),
    (["prepare", "l.h5:labels", "p.h5", "--seed", "-1"], "--seed -1: expected an integer in [0, 4294967295]"),
    (["prepare", "l.h5:labels", "p.h5", "--seed", HUGE], f"--seed {HUGE}"),
    (["train", "--image", "a", "--labels", "b", "--out", "c", "--seed", "-1"], "--seed -1"),
    (["train", "--image", "a", "--labels", "b", "--out", "c", "--threads", "100000"], "--threads 100000"),
    (["train", "--image", "a", "--labels", "b", "--out", "c", "--batch", "100000"], "--batch 100000"),
    (["export", "v.h5:raw", "dest", "--levels", "99"], "--levels 99: expected an integer in [0, 32]"),
    (["segment", "a.h5:raw", "o.h5:seg", "--set", f"min_segment_size={HUGE}"], f"min_segment_size={HUGE}"),
    (["segment", "a.h5:raw", "o.h5:seg", "--set", "prefetch=1000"], "prefetch=1000"),
    (["segment", "a.h5:raw", "o.h5:seg", "--image-std", "1e-308"], "--image-std 1e-308"),
])
def test_resource_and_seed_flags(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert words in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_threads_at_the_cap_is_accepted():
    args = build_parser().parse_args(["segment", "a", "b", "--threads", str(MAX_THREADS)])
    assert _build_config(args).threads == MAX_THREADS


def test_threads_beyond_the_cap_never_reaches_torch(tmp_path, capsys):
    """`ffn segment --threads 100000` in a real process: one line, exit 2, no lock left (today:
    SIGSEGV inside torch.set_num_threads with OUT.lock left behind)."""
    d = tmp_path
    mean_flood_model(d / "tiny.npz")
    with h5py.File(demo_crop_path(), "r") as src, h5py.File(d / "crop.h5", "w") as f:
        f["raw"] = src["raw"][:16, :24, :24]
    r = subprocess.run([sys.executable, "-m", "floodfilling.cli", "segment", f"{d}/crop.h5:raw", f"{d}/o.h5:seg",
                        "--model", str(d / "tiny.npz"), "-q", "--device", "cpu", "--threads", "100000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r
    assert r.stderr.strip() == "ffn: error: --threads 100000: expected an integer in [0, 1024]", r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["crop.h5", "tiny.npz"]


# -- normalisation at the edge ---------------------------------------------------------------------

def _volume(rng, scale: float, dtype=np.float64) -> np.ndarray:
    return (rng.integers(50, 200, (12, 14, 16)).astype(np.float64) * scale).astype(dtype)


@pytest.mark.parametrize("scale", [1e300, 2.5e-12, 1e-300])
def test_standardise_is_scale_free(scale, recwarn):
    """Float images near 1e300 or 1e-300 (and [0, 2.5e-10]) standardise like the same image at
    scale 1, with no numpy RuntimeWarning and no "constant" verdict."""
    rng = np.random.default_rng(0)
    ref = _volume(rng, 1.0)
    img = ref * scale
    n_ref = normalise.resolve("standardise", ref, 128.0, 33.0)
    n_img = normalise.resolve("standardise", img, 128.0, 33.0, source="img.h5:raw")
    out_ref, out = n_ref.apply(ref), n_img.apply(img, "img.h5:raw")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


def test_histogram_of_tiny_values_is_not_flattened():
    rng = np.random.default_rng(1)
    img = _volume(rng, 1e-12)  # [5e-11, 2e-10]
    n = normalise.resolve("histogram", img, 128.0, 33.0)
    src = np.asarray(n.source_quantiles)
    assert np.all(np.diff(src) > 0)
    assert src[-1] - src[0] < 1e-9  # nudged relative to the data, not by an absolute 1e-9 per step
    out = n.apply(img)
    assert np.isfinite(out).all() and out.std() > 0.5


@pytest.mark.parametrize("mean, std", [(1e30, 1e-30), (0.0, 1e-37), (-3e38, 0.5)])
def test_fixed_normalisation_that_overflows_is_refused(mean, std):
    img = np.full((9, 9, 9), 200, np.uint8)
    img[0, 0, 0] = 0
    n = normalise.resolve("fixed", img, 128.0, 33.0, image_mean=mean, image_std=std)
    with pytest.raises(normalise.NormalisationError, match=r"^crop.h5:raw: .*(not finite|beyond float32)"):
        n.apply(img, "crop.h5:raw")


def test_mean_beyond_float32_is_refused_naming_the_image():
    n = normalise.Normalisation("fixed", 1e308, 33.0)
    with pytest.raises(normalise.NormalisationError, match=r"^crop.h5:raw: intensity mean 1e\+308"):
        n.apply(np.zeros((4, 4, 4), np.uint8), "crop.h5:raw")


def test_constancy_is_exact_equality():
    flat = np.full((10, 10, 10), 2.5e-10)
    with pytest.raises(normalise.NormalisationError, match="constant intensity"):
        normalise.estimate_stats(flat, "flat")
    varied = np.random.default_rng(2).uniform(0, 2.5e-10, (10, 10, 10))
    mean, std, _ = normalise.estimate_stats(varied, "varied")
    assert 0 < std < 1e-10 and 0 < mean < 2.5e-10


def test_nearly_constant_image_is_reported(caplog):
    img = np.full((20, 20, 20), 7, np.uint8)
    img[5, 5, 5] = 9
    with caplog.at_level("WARNING"):
        normalise.estimate_stats(img, "crop.h5:one")
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(msgs) == 1 and "crop.h5:one" in msgs[0] and "only 1 of 8000" in msgs[0], msgs
    caplog.clear()
    rng = np.random.default_rng(3)
    with caplog.at_level("WARNING"):
        normalise.estimate_stats(rng.integers(0, 255, (20, 20, 20)).astype(np.uint8), "ok")
    assert not caplog.records


def test_segment_of_a_nearly_constant_image_says_so(tmp_path, caplog, capsys):
    mean_flood_model(tmp_path / "tiny.npz")
    img = np.full((16, 20, 20), 7, np.uint8)
    img[5, 5, 5] = 9
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["raw"] = img
    with caplog.at_level("WARNING"):
        rc = main(["segment", f"{tmp_path}/one.h5:raw", f"{tmp_path}/o.h5:seg", "--model", str(tmp_path / "tiny.npz"),
                   "-q", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("one.h5:raw" in m and "nearly constant" in m for m in warned), warned


# -- ffn config: every line loads when uncommented -------------------------------------------------

def _uncommented_config(capsys) -> str:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert any(ln.startswith("# ") and " = " in ln for ln in lines)  # commented-out options exist
    return "\n".join(ln[2:] if ln.startswith("# ") else ln for ln in lines) + "\n"


def test_config_output_loads_with_every_line_uncommented(tmp_path, capsys):
    p = tmp_path / "all.toml"
    p.write_text(_uncommented_config(capsys))
    assert InferenceConfig.from_toml(p) == InferenceConfig()
    assert RefineConfig.from_toml(p) == RefineConfig()
    # the CLI's --config path, with and without --refine
    args = build_parser().parse_args(["segment", "a.h5:raw", "o.h5:seg", "--config", str(p), "--refine"])
    assert _build_config(args) == InferenceConfig()
    assert _build_refine(args) == RefineConfig()


def test_empty_string_leaves_an_optional_number_unset():
    cfg = InferenceConfig.from_dict({"image_mean": "", "image_std": "", "prefetch": ""})
    assert cfg.image_mean is None and cfg.image_std is None and cfg.prefetch is None
    with pytest.raises(ConfigError, match="image_mean='abc'"):
        InferenceConfig.from_dict({"image_mean": "abc"})


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bogus; known: .*gap_box.*halo"):
        RefineConfig.from_dict({"bogus": 1}, "--set refine.")


@pytest.mark.parametrize("key, words", [("bogus", "refine.bogus: is not a refine option"),
                                        ("halo", "refine.halo: only applies to `ffn segment --refine`")])
def test_agglomerate_refuses_refine_options(key, words, capsys, tmp_path):
    assert main(["agglomerate", "a.h5:raw", "s.h5:seg", f"{tmp_path}/o.h5:seg", "--set", f"refine.{key}=1"]) == 2
    line = one_error_line(capsys)
    assert words in line and "gap_box" in line, line
    assert list(tmp_path.iterdir()) == []


# -- a closed stdout -------------------------------------------------------------------------------

def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "floodfilling.cli", *argv]


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pipe") / "lab.h5"
    with h5py.File(demo_crop_path(), "r") as src, h5py.File(p, "w") as f:
        f["labels"] = src["labels"][:8, :32, :32].astype(np.uint32)
    return p


@pytest.mark.parametrize("argv", [("config",), ("evaluate", "{l}:labels", "{l}:labels"),
                                  ("evaluate", "{l}:labels", "{l}:labels", "--json")])
def test_closed_stdout_ends_quietly_with_sigpipe_status(argv, labels_file):
    """The reader of stdout gone before the command prints: no "[Errno 32] Broken pipe", no
    traceback, exit status 141 (128 + SIGPIPE, what a shell shows for `yes | head`)."""
    args = [a.format(l=labels_file) for a in argv]
    p = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()  # the reader leaves at once
    err = p.stderr.read().decode()
    rc = p.wait(timeout=300)
    assert rc == 141 and err == "", (rc, err)


def test_piping_into_head(labels_file):
    for args in (["config"], ["evaluate", f"{labels_file}:labels", f"{labels_file}:labels"]):
        cmd = " ".join(_cli(*args)) + " | head -1; echo rc=${PIPESTATUS[0]}"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.stderr == "", r.stderr
        out = r.stdout.splitlines()
        assert len(out) == 2 and out[1] in ("rc=0", "rc=141"), r.stdout


def test_library_inflight_has_the_cli_cap():
    """The engine's own check carries the cap too (a library caller never reaches the CLI)."""
    from floodfilling.boxes import ParameterError
    from floodfilling.config import MAX_INFLIGHT
    from floodfilling.inference.engine import check_inflight

    assert check_inflight(MAX_INFLIGHT) == MAX_INFLIGHT
    with pytest.raises(ParameterError, match=f"inflight={MAX_INFLIGHT + 1}"):
        check_inflight(MAX_INFLIGHT + 1)


def test_overlay_of_tiny_intensities_keeps_its_contrast():
    """The PNG slices scale by the data's own range, with no absolute floor."""
    from floodfilling.viz import overlay

    g = np.linspace(0, 2.5e-10, 100, dtype=np.float64).reshape(10, 10)
    rgb = overlay(g, np.zeros((10, 10), np.uint32))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert (overlay(np.full((4, 4), 7.0), np.zeros((4, 4), np.uint32)) == 0).all()
