"""``ffn segment --block --refine``: the refinement of a block run equals the in-memory refinement
(``refine_array`` with tile = the block) of its assembled flood, on a real FIB-25 crop with the
tiny flood-bright model; resumes after a kill; 2 MPI ranks == 1 rank."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from floodfilling.config import RefineConfig
from floodfilling.inference.refine import FloodNetwork, refine_array
from floodfilling.model import load_model
from floodfilling.normalise import Normalisation
from floodfilling.results import overlaps_dict
from test_distributed_run import BLOCK, BLOCK_ZYX, HALO, HALO_ZYX, cfg, data, mpiexec, one_thread  # noqa: F401

pytest.importorskip("skimage")

# thresholds for the tiny model's crop: small cores so that gap floods happen in several blocks
REFINE = RefineConfig(model="hand", gap_min_core=20, gap_core_radius=2.0, gap_box=(24, 40, 40), halo=(8, 12, 12))
SETS = ["--set", "refine.gap_min_core=20", "--set", "refine.gap_core_radius=2.0", "--set",
        "refine.gap_box=[24,40,40]", "--set", "refine.halo=[8,12,12]"]


def run_refined(data, out, workdir, refine=REFINE, **kw):
    from floodfilling.distributed.run import segment_blocks

    return segment_blocks(f"{data / 'crop.h5'}:raw", f"{out}:seg", block=BLOCK_ZYX, halo=HALO_ZYX,
                          workdir=str(workdir), model=str(data / "tiny.npz"), config=cfg(), refine=refine, **kw)


def read_all(path):
    """The result's datasets (origins without their seconds, which are timings) and attributes."""
    with h5py.File(path, "r") as f:
        ds = {k: f[k][:] for k in f if k.startswith("seg")}
        ds["seg_origins"] = ds["seg_origins"][["id", "z", "y", "x", "steps"]]
        return ds, dict(f["seg"].attrs)


@pytest.fixture(scope="module")
def refined(data, tmp_path_factory):
    import torch

    t = torch.get_num_threads()
    d = tmp_path_factory.mktemp("refined")
    res = run_refined(data, d / "out.h5", d / "work")
    torch.set_num_threads(t)
    return d / "out.h5", res


def crop_image(data, attrs):
    """The crop normalised as the block run did (its recorded normalisation)."""
    with h5py.File(data / "crop.h5", "r") as f:
        return Normalisation(**json.loads(attrs["normalisation"])).apply(f["raw"][:])


def in_memory(data, flood, overlaps, attrs):
    net, info = load_model(str(data / "tiny.npz"), "cpu")
    return refine_array(crop_image(data, attrs), flood, REFINE, FloodNetwork(net, info, cfg()),
                        overlaps_dict(overlaps), tile=BLOCK_ZYX)


def test_block_refinement_equals_the_in_memory_refinement(data, refined, one_thread):
    out, res = refined
    ds, attrs = read_all(out)
    counters = json.loads(attrs["counters"])
    assert set(ds) == {"seg", "seg_origins", "seg_overlaps", "seg_forward"}
    # the case exercises every step: gap floods in several blocks, some joined, some new, a rejoin
    assert counters["refine_gap_floods"] >= 2 and counters["refine_gap_objects"] >= 1
    assert counters["refine_voxels_filled"] > 0 and counters["refine_gap_steps"] >= counters["refine_gap_floods"]
    mem = in_memory(data, ds["seg_forward"], ds["seg_overlaps"], attrs)
    np.testing.assert_array_equal(ds["seg"], mem.segmentation)
    for k in ("rejoined", "gap_cores", "gap_floods", "gap_inside", "gap_joined", "gap_objects", "gap_steps",
              "voxels_filled"):
        assert counters[f"refine_{k}"] == mem.counters[k], k
    # origins: the flood's objects that stay, then the gap objects with their seeds
    flood_ids = set(int(i) for i in np.unique(ds["seg_forward"]) if i)
    kept = flood_ids - set(mem.joined)
    ids = ds["seg_origins"]["id"].astype(int).tolist()
    assert ids == sorted(kept) + sorted(mem.new_origins)
    for row in ds["seg_origins"][len(kept):]:
        assert (row["z"], row["y"], row["x"]) == mem.new_origins[int(row["id"])].seed_zyx
    assert json.loads(attrs["refine"]) == REFINE.validate().to_dict()
    # the refinement only adds: every flood object lies in one refined object
    f, s = ds["seg_forward"], ds["seg"]
    pairs = np.unique(np.stack([f[f > 0], s[f > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def test_rerun_after_the_output_is_written_does_nothing(data, refined, one_thread):
    out, _ = refined
    before = read_all(out)[0]
    res = run_refined(data, out, out.parent / "work")
    assert res.already_complete
    for k, v in read_all(out)[0].items():
        np.testing.assert_array_equal(v, before[k])
    assert list((out.parent / "work").glob("refine-*")) == []  # refinement files are tidied at the end


def test_other_refine_options_are_another_output(data, refined, one_thread):
    """The output's digest covers the [refine] options: a rerun with others is not "complete"
    (it needs overwrite), and the blocks are reused."""
    from floodfilling.distributed.run import segment_blocks

    out, _ = refined
    with pytest.raises(ValueError, match="exists"):
        segment_blocks(f"{data / 'crop.h5'}:raw", f"{out}:seg", block=BLOCK_ZYX, halo=HALO_ZYX,
                       workdir=str(out.parent / "work"), model=str(data / "tiny.npz"), config=cfg(),
                       refine=RefineConfig(model="hand", steps=("watershed",)))


def test_zarr_output_holds_the_same_datasets(data, refined, tmp_path, one_thread):
    """A refined block run into a zarr group: the HDF5 run's four datasets, nothing temporary left."""
    zarr = pytest.importorskip("zarr")
    from floodfilling.distributed.run import segment_blocks

    ref, _ = read_all(refined[0])
    store = tmp_path / "vol.zarr"
    zarr.open_group(str(store), mode="w")
    segment_blocks(f"{data / 'crop.h5'}:raw", f"{store}/seg", block=BLOCK_ZYX, halo=HALO_ZYX,
                   workdir=str(tmp_path / "work"), model=str(data / "tiny.npz"), config=cfg(), refine=REFINE)
    g = zarr.open_group(str(store), mode="r")
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith("zarr.json")) == sorted(ref)
    np.testing.assert_array_equal(g["seg"][...], ref["seg"])
    np.testing.assert_array_equal(g["seg_forward"][...], ref["seg_forward"])
    for table in ("seg_origins", "seg_overlaps"):
        for col in ref[table].dtype.names:
            np.testing.assert_array_equal(g[table][col][...], ref[table][col])


@pytest.mark.mpi
def test_mpi_two_ranks_refined_equal_one_rank_and_resume_after_sigkill(data, refined, tmp_path):
    """2 ranks give the single-process output; a run killed (SIGKILL) during its gap floods
    resumes to the same output."""
    ref, _ = read_all(refined[0])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "floodfilling.cli", "segment", f"{data / 'crop.h5'}:raw",
           f"{tmp_path / 'out.h5'}:seg", "--block", BLOCK, "--halo", HALO, "--workdir", str(tmp_path / "work"),
           "--model", str(data / "tiny.npz"), "--threads", "1", "--set", "min_segment_size=200", "-q", "--refine", "--refine-model", "hand",
           *SETS]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    got, _ = read_all(tmp_path / "out.h5")
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # kill a single-process run once a gap flood is on disk, then rerun
    out2, work2 = tmp_path / "b.h5", tmp_path / "work2"
    cmd1 = [sys.executable, "-m", "floodfilling.cli", "segment", f"{data / 'crop.h5'}:raw", f"{out2}:seg",
            "--block", BLOCK, "--halo", HALO, "--workdir", str(work2), "--model", str(data / "tiny.npz"),
            "--threads", "1", "--set", "min_segment_size=200", "-q", "--refine", "--refine-model", "hand", *SETS]
    p = subprocess.Popen(cmd1, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(work2.glob("refine-*/floods/*.h5")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out2.exists()
    r = subprocess.run(cmd1, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    got, _ = read_all(out2)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_flood_overlaps_by_hand(tmp_path):
    """Each block's overlaps in output ids: summed over blocks, pairs inside one object and
    objects in no core dropped."""
    from types import SimpleNamespace

    from floodfilling.distributed import blockstore
    from floodfilling.geometry import BlockGrid
    from floodfilling.distributed.reconcile import global_labels
    from floodfilling.distributed.refine import flood_overlaps
    from floodfilling.results import OVERLAP_DTYPE

    grid = BlockGrid((4, 4, 8), (4, 4, 4), (0, 0, 0))
    tables = [np.array([(2, 1, 5), (3, 1, 7), (4, 1, 2)], OVERLAP_DTYPE),  # block 0: local 1..4 (4 in no core)
              np.array([(2, 1, 4), (1, 2, 9)], OVERLAP_DTYPE)]  # block 1: local 1 = block 0's 1
    paths = {}
    for b, t in zip(grid, tables):
        paths[b.index] = tmp_path / f"{b.index}.h5"
        with h5py.File(paths[b.index], "w") as f:
            f["overlaps"] = t
    # block 0's core holds 1, 2, 3; block 1's holds 1, 2; block 1's 1 merges with block 0's 1,
    # and block 0's 3 with its own 2 (so 3 -> 2 is inside one object)
    labels = global_labels([4, 2], [np.array([1, 2, 3]), np.array([1, 2])],
                           [(0, 1, np.array([[1, 1]], np.uint64)), (0, 0, np.array([[2, 3]], np.uint64))])
    plan = SimpleNamespace(grid=grid, block_path=lambda b: paths[b.index])
    got = flood_overlaps(plan, labels)
    final = lambda k, i: int(labels.final_of(np.array([i + labels.offsets[k]], np.uint64))[0])  # noqa: E731
    a, b2, b1 = final(0, 1), final(0, 2), final(1, 2)
    assert final(1, 1) == a and final(0, 3) == b2 and final(0, 4) == 0
    want = {(b2, a): 5 + 7, (b1, a): 4, (a, b1): 9}
    assert {(int(r["id"]), int(r["other_id"])): int(r["voxels"]) for r in got} == want
    assert blockstore.read_overlaps(paths[0]).shape == (3,)


def test_status_shows_the_refinement(refined, tmp_path, capsys):
    """`ffn status` during a refinement: gap floods and tiles on disk (the pieces a rerun reuses)."""
    import shutil

    from floodfilling.cli import main

    work = tmp_path / "work"
    shutil.copytree(refined[0].parent / "work", work)
    rdir = work / "refine-0123456789abcdef"
    (rdir / "floods").mkdir(parents=True)
    (rdir / "tiles").mkdir()
    assert main(["status", str(work)]) == 0
    assert "refining: not found yet, 0/8 tiles done" in capsys.readouterr().out
    np.save(rdir / "centres.npy", np.zeros((5, 3), np.int64))
    for name in ("floods/0.h5", "floods/3.h5", "floods/4.h5.tmp-1", "tiles/seg_0-0-0_24-48-48.h5"):
        (rdir / name).write_bytes(b"")
    assert main(["status", str(work), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["refine"] == {"gap_cores": 5, "gap_floods_done": 2, "tiles_done": 1, "tiles": 8}


@pytest.mark.device
@pytest.mark.parametrize("inflight", [1, 4])
def test_gap_floods_batched_on_the_device_path_equal_the_host_path(data, refined, one_thread, test_device, inflight):
    """The gap floods go through the engine: on the device-resident path (test_device; cpu by
    default) with up to ``inflight`` canvases in flight (batched into one network call on a GPU;
    at batch 1 on the CPU, where that is fastest), the refinement is the host
    path's at batch 1, voxel for voxel (fp32; on a GPU, inflight > 1 also needs per-FOV logits
    that do not depend on the batch, as in test_device_path)."""
    ds, attrs = read_all(refined[0])
    image = crop_image(data, attrs)
    net, info = load_model(str(data / "tiny.npz"), "cpu")
    overlaps = overlaps_dict(ds["seg_overlaps"])
    host = refine_array(image, ds["seg_forward"], REFINE, FloodNetwork(net, info, cfg()), overlaps, inflight=1)
    dev_cfg = cfg(test_device).with_overrides(resident="on")
    net_d, _ = load_model(str(data / "tiny.npz"), str(test_device))
    dev = refine_array(image, ds["seg_forward"], REFINE, FloodNetwork(net_d, info, dev_cfg), overlaps,
                       inflight=inflight)
    assert host.counters["gap_floods"] >= 10
    np.testing.assert_array_equal(dev.segmentation, host.segmentation)
    assert {k: (o.seed_zyx, o.steps) for k, o in dev.new_origins.items()} == \
        {k: (o.seed_zyx, o.steps) for k, o in host.new_origins.items()}
    assert {k: v for k, v in dev.counters.items() if k != "seconds"} == \
        {k: v for k, v in host.counters.items() if k != "seconds"}
