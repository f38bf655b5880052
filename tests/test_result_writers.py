"""Every writer of a segmentation result goes through floodfilling.results and stores the same
format: an in-memory ``ffn segment``, a block run (one writer), the parallel writer of block runs
(regions written with pwrite / into zarr chunks), consensus, HDF5 and zarr alike; the attributes
encoded once (``bbox_zyx`` JSON, ``resolution_zyx_nm`` a numeric array, dicts JSON)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from floodfilling import results, testing
from floodfilling.cli import main

PKG = Path(results.__file__).resolve().parent


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    d = tmp_path_factory.mktemp("writers")
    raw, _ = testing.demo_crop((32, 48, 48))
    with h5py.File(d / "crop.h5", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [8, 8, 8]
    testing.mean_flood_model(d / "m.npz")
    return d


def _run(*argv):
    assert main([str(a) for a in argv]) == 0


def raw_attrs(spec: str) -> dict:
    """The attributes as stored (not decoded), HDF5 or zarr."""
    path, _, ds = spec.rpartition(":") if ".h5:" in spec else spec.rpartition(".zarr/")
    if ".h5:" in spec:
        with h5py.File(path, "r") as f:
            return dict(f[ds].attrs)
    import zarr

    return dict(zarr.open_array(path + ".zarr/" + ds, mode="r").attrs)


@pytest.fixture(scope="module")
def outputs(crop, tmp_path_factory):
    t = tmp_path_factory.mktemp("outs")
    common = ["--model", crop / "m.npz", "--set", "min_segment_size=50", "--threads", "1", "-q"]
    img = f"{crop / 'crop.h5'}:raw"
    specs = {}
    for kind, out in (("h5", f"{t / 'mem.h5'}:seg"), ("zarr", f"{t / 'mem.zarr'}/seg")):
        _run("segment", img, out, *common)
        specs[f"in-memory {kind}"] = out
    for kind, out in (("h5", f"{t / 'blk.h5'}:seg"), ("zarr", f"{t / 'blk.zarr'}/seg")):
        _run("segment", img, out, "--block", "16,32,32", "--halo", "4,4,4", "--workdir", t / f"work-{kind}", *common)
        specs[f"blocks {kind}"] = out
    for kind, out in (("h5", f"{t / 'cons.h5'}:seg"), ("zarr", f"{t / 'cons.zarr'}/seg")):
        _run("consensus", specs["in-memory h5"], specs["blocks h5"], out)
        specs[f"consensus {kind}"] = out
    return specs


def test_every_writer_stores_the_same_attribute_encoding(outputs):
    want_bbox = [[0, 0, 0], [32, 48, 48]]
    for what, spec in outputs.items():
        a = raw_attrs(spec)
        if spec.endswith(".h5:seg") or ".h5:" in spec:
            assert isinstance(a["bbox_zyx"], str), (what, type(a["bbox_zyx"]))  # JSON, every writer
            assert json.loads(a["bbox_zyx"]) == want_bbox, what
            assert isinstance(a["resolution_zyx_nm"], np.ndarray) and a["resolution_zyx_nm"].tolist() == [8, 8, 8]
        else:  # zarr: JSON types
            assert a["bbox_zyx"] == json.dumps(want_bbox) or a["bbox_zyx"] == want_bbox, what
            assert list(a["resolution_zyx_nm"]) == [8, 8, 8], what
        if not what.startswith("consensus"):
            assert isinstance(json.loads(a["config"] if isinstance(a["config"], str) else json.dumps(a["config"])),
                              dict), what
    blk = raw_attrs(outputs["blocks h5"])
    assert blk["block_zyx"].tolist() == [16, 32, 32] and isinstance(json.loads(blk["merge_rule"]), dict)
    assert raw_attrs(outputs["consensus h5"])["consensus"] == "split"


def test_block_output_equals_the_in_memory_layout(outputs):
    """The block run's file holds what the in-memory writer's does (datasets and attribute
    names), plus the block run's own keys."""
    with h5py.File(outputs["in-memory h5"].split(":")[0], "r") as a, h5py.File(outputs["blocks h5"].split(":")[0],
                                                                                  "r") as b:
        assert set(a) == {"seg", "seg_origins", "seg_overlaps"} and set(b) == {"seg", "seg_origins"}
        assert set(a["seg"].attrs) <= set(b["seg"].attrs)
        assert {"block_zyx", "halo_zyx", "merge_rule", "block_manifest", "workdir"} <= set(b["seg"].attrs)
        assert a["seg_origins"].dtype == b["seg_origins"].dtype == results.ORIGIN_DTYPE


@pytest.mark.parametrize("kind", ["h5", "zarr"])
@pytest.mark.parametrize("parallel", [False, True])
def test_result_writer_regions_tables_commit_and_discard(tmp_path, kind, parallel):
    """Regions written by two "ranks" (disjoint halves, uint64, parallel: pwrite at the offset)
    give the whole volume; tables and attributes are stored; an existing file keeps its other
    datasets; a discarded write leaves the output as it was."""
    out = tmp_path / f"o.{kind}"
    results.write_result(out, "raw", np.arange(8, dtype=np.uint8).reshape(2, 2, 2), None, {}, overwrite=False)
    vol = np.random.default_rng(0).integers(0, 2**40, (6, 8, 10)).astype(np.uint64)
    table = np.zeros(2, results.ORIGIN_DTYPE)
    table["id"] = [3, 9]
    attrs = results.ResultAttrs((4, 4, 40), ((1, 2, 3), (7, 10, 13)), "img.h5:raw", "m.npz", {"a": 1}, {}, {"n": 2})
    w = results.ResultWriter(out, "seg", ["seg", "seg_origins"], "t1", parallel=parallel,
                             chunks=(3, 8, 10) if kind == "zarr" else None)
    target = w.create({"seg": (vol.shape, vol.dtype)}, {"seg": attrs.to_dict()}, {"seg_origins": table})
    assert (target.offsets != {}) == (parallel and kind == "h5")
    for half in (slice(3, 6), slice(0, 3)):  # two writers, any order
        results.write_region(target, "seg", (half, slice(0, 8), slice(0, 10)), vol[half])
    w.commit()
    spec = f"{out}:seg" if kind == "h5" else f"{out}/seg"
    from floodfilling import volumes

    with volumes.open_volume(spec) as v:
        assert np.array_equal(v.read(), vol)
        assert v.attrs["bbox_zyx"] == [[1, 2, 3], [7, 10, 13]] and v.attrs["counters"] == {"n": 2}
    assert results.read_origins(spec)["id"].tolist() == [3, 9]
    with volumes.open_volume(f"{out}:raw" if kind == "h5" else f"{out}/raw") as v:
        assert v.read().sum() == 28  # kept
    w2 = results.ResultWriter(out, "seg", ["seg"], "t2", parallel=parallel)
    t2 = w2.create({"seg": (vol.shape, vol.dtype)}, {"seg": {}}, {})
    results.write_region(t2, "seg", (slice(0, 6), slice(0, 8), slice(0, 10)), vol * 0)
    w2.discard()
    with volumes.open_volume(spec) as v:
        assert np.array_equal(v.read(), vol)
    assert not list(tmp_path.glob("*.tmp-*")) and not list(out.glob(".*tmp*") if kind == "zarr" else [])


def test_no_module_outside_results_and_storage_writes_hdf5_or_builds_result_attributes():
    """Source check: h5py.File opened for writing, zarr arrays opened for writing, result
    attribute keys assembled: only in results.py / storage.py."""
    allowed = {PKG / "results.py", PKG / "storage.py"}
    offenders = []
    for path in PKG.rglob("*.py"):
        if path in allowed:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("File", "open_array"):
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if any(m in ("w", "a", "r+", "w-", "x") for m in modes):
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno} opens for writing")
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"bbox_zyx", "source_image"} <= keys or "block_manifest" in keys:
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno} builds result attributes")
    assert offenders == []
