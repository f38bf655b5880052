"""``ffn segment --block --refine --refine-model`` (issue 29, item 5): the learned refinement of a
block run equals the in-memory learned refinement (``learned_refine`` with tile = the block) of
its assembled flood, bit for bit, on a real FIB-25 crop with the tiny flood-bright model and the
bundled refine model; the per-tile contact statistics add up to the volume's; a run killed in
the learned stages resumes without redoing finished tiles; a changed model file never reuses
stale stage files; 2 MPI ranks == 1 rank; the in-memory learned refinement resumes after the
flood; base gap_cores (the hand step's gap floods first) equals its in-memory run too."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from floodfilling.config import RefineConfig
from floodfilling.inference import contacts, learned
from floodfilling.inference.refine import array_reader, tiles_of
from floodfilling.normalise import Normalisation
from floodfilling.results import overlaps_dict
from test_distributed_run import BLOCK, BLOCK_ZYX, HALO, HALO_ZYX, cfg, data, mpiexec, one_thread  # noqa: F401
from test_distributed_refine import read_all, run_refined

pytest.importorskip("skimage")
pytest.importorskip("lightgbm")

RCFG = RefineConfig(model="bundled", halo=(8, 12, 12))  # the bundled model (base "cores")
SETS = ["--refine", "--refine-model", "bundled", "--set", "refine.halo=[8,12,12]"]


# -- the statistics of tiles add up ----------------------------------------------------------------

def test_tile_statistics_add_up_by_hand():
    """Two objects stacked in z (4 x 2 x 2 voxels, z < 2: object 1, z >= 2: object 2), tiles of
    2 planes: the 4 faces between them lie across the tiles' face and are counted once, by the
    lower tile; each object's voxels by its tile; the sum is the whole volume's graph."""
    seg = np.zeros((4, 2, 2), np.int64)
    seg[:2], seg[2:] = 1, 2
    image = np.arange(16, dtype=np.float32).reshape(4, 2, 2) - 8  # integers: every sum exact
    fl = np.ones(seg.shape, bool)
    tiles = tiles_of(seg.shape, (2, 2, 2), (1, 1, 1))
    assert len(tiles) == 2
    cfg0 = RefineConfig()
    parts = [learned.tile_contacts(array_reader(image), array_reader(seg), array_reader(fl), t, seg.shape, cfg0)
             for t in tiles]
    E, N = contacts._E, contacts._N
    assert parts[0].pairs.tolist() == [[1, 2]] and parts[0].edge_stats[0, E["faces"]] == 4
    assert parts[1].pairs.tolist() == []  # the face below tile 1 is tile 0's
    assert parts[0].ids.tolist() == [1, 2] and parts[0].node_stats[:, N["voxels"]].tolist() == [8, 0]
    assert parts[1].ids.tolist() == [2] and parts[1].node_stats[0, N["voxels"]] == 8
    # the darker voxel of each face: plane z=1 (values -4..-1, below plane z=2)
    assert parts[0].edge_stats[0, E["lo_sum"]] == -4 - 3 - 2 - 1
    total = contacts.sum_graphs(parts)
    whole = contacts.contact_graph(seg, image, None, flooded=fl)
    assert total.ids.tolist() == [1, 2] and total.pairs.tolist() == [[1, 2]]
    assert total.node_stats[:, N["surface"]].tolist() == [4, 4]
    assert total.node_stats[:, N["sum"]].tolist() == [sum(range(-8, 0)), sum(range(8))]
    np.testing.assert_array_equal(total.node_stats, whole.node_stats)
    cols = [i for n, i in E.items()  # (the smoothing and the Hessian see the window: below)
            if not n.startswith(("slo", "sheet", "across")) and n != "overlap"]
    np.testing.assert_array_equal(total.edge_stats[:, cols], whole.edge_stats[:, cols])


@pytest.mark.parametrize("tile", [(6, 7, 8), (12, 14, 30), (5, 28, 9)])
def test_tile_statistics_add_up_to_the_volume(tile):
    """A constructed segmentation with an integer-valued image: the tiles' statistics summed
    equal the whole volume's (counts and intensity sums exactly; the smoothed intensity and the
    Hessian statistics, which see each tile's window with a halo of 9 > the widest Gaussian's
    reach 8 (sigma 2, truncated at 4 sigma), to rounding)."""
    from floodfilling.testing import voronoi_volume

    raw, labels = voronoi_volume((24, 28, 30), n=14, seed=3)
    seg = np.where(raw > 100, labels, 0).astype(np.int64)
    image = (raw.astype(np.float32) // 16 - 8).astype(np.float32)
    fl = (labels % 2 == 0) & (seg > 0)
    overlaps = {3: (np.array([1, 5]), np.array([7, 2]))}
    tiles = tiles_of(seg.shape, tile, (9, 9, 9))
    assert len(tiles) > 1
    parts = [learned.tile_contacts(array_reader(image), array_reader(seg), array_reader(fl), t, seg.shape,
                                   RefineConfig()) for t in tiles]
    total = contacts.sum_graphs(parts, overlaps)
    whole = contacts.contact_graph(seg, image, overlaps, flooded=fl)
    np.testing.assert_array_equal(total.ids, whole.ids)
    np.testing.assert_array_equal(total.pairs, whole.pairs)
    np.testing.assert_array_equal(total.node_stats, whole.node_stats)
    slo = [i for n, i in contacts._E.items() if n.startswith(("slo_", "sheet_sum", "across_"))]
    exact = [i for i in range(contacts.N_EDGE) if i not in slo]
    np.testing.assert_array_equal(total.edge_stats[:, exact], whole.edge_stats[:, exact])
    np.testing.assert_allclose(total.edge_stats[:, slo], whole.edge_stats[:, slo], rtol=1e-9, atol=1e-9)


def test_one_tile_is_the_whole_volume_refinement():
    """``learned_refine`` with one tile (refine.tile 0,0,0, the default) is the whole-volume
    path: ``base_segmentation``, ``contact_graph`` and the agglomeration of the whole graph."""
    from floodfilling.inference.agglomeration import apply_lut
    from test_learned_refine import _unit

    u = _unit(1)
    m = learned.load_refine_model("bundled")
    cfg0 = m.base_config(RefineConfig())
    got = learned.learned_refine(u.image, u.flood, m, RefineConfig())
    b = learned.base_segmentation(u.image, u.flood, m.base, cfg0, boundary=m.boundary_map())
    want = apply_lut(b.segmentation, learned.agglomerate_base(u.image, b, m, cfg0).lut)
    np.testing.assert_array_equal(got.segmentation, want)
    assert got.counters["gap_cores"] == len(b.origins) > 0 and got.counters["learned_merges"] > 0
    tiled = learned.learned_refine(u.image, u.flood, m, RefineConfig(halo=(4, 4, 4)), tile=(12, 14, 15))
    assert (tiled.segmentation > 0).all() and tiled.counters["gap_cores"] > 0  # (tiles cut cores: another result)


# -- block runs --------------------------------------------------------------------------------------

def run_learned(data, out, workdir, refine=RCFG, **kw):
    """The crop's block run (as the hand steps' tests run it) with the learned ``refine``."""
    return run_refined(data, out, workdir, refine=refine, **kw)


def same_output(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert set(a) == set(b)


@pytest.fixture(scope="module")
def learned_run(data, tmp_path_factory):
    import torch

    t = torch.get_num_threads()
    d = tmp_path_factory.mktemp("learned")
    res = run_learned(data, d / "out.h5", d / "work")
    torch.set_num_threads(t)
    return d / "out.h5", res


def test_block_learned_refinement_equals_the_tiled_in_memory_one(data, learned_run, one_thread):
    ds, attrs = read_all(learned_run[0])
    counters = json.loads(attrs["counters"])
    assert set(ds) == {"seg", "seg_origins", "seg_overlaps", "seg_forward"}
    # the case exercises everything: cores in several tiles, merges, flood objects joining others
    assert counters["refine_gap_cores"] >= 8 and counters["refine_learned_merges"] >= 8
    assert counters["refine_rejoined"] >= 1 and 1 <= counters["refine_gap_objects"] < counters["refine_gap_cores"]
    with h5py.File(data / "crop.h5", "r") as f:
        image = Normalisation(**json.loads(attrs["normalisation"])).apply(f["raw"][:])
    model = learned.load_refine_model("bundled")
    mem = learned.learned_refine(image, ds["seg_forward"], model, RCFG, overlaps=overlaps_dict(ds["seg_overlaps"]),
                                 tile=BLOCK_ZYX)
    np.testing.assert_array_equal(ds["seg"], mem.segmentation)
    assert (ds["seg"] > 0).all()
    for k in ("learned_merges", "learned_base_objects", "rejoined", "gap_objects", "gap_cores", "voxels_filled"):
        assert counters[f"refine_{k}"] == mem.counters[k], k
    # origins: the flood's objects that stay, then the core objects kept, at their cores' deepest voxels
    flood_ids = {int(i) for i in np.unique(ds["seg_forward"]) if i}
    kept = flood_ids - set(mem.joined)
    assert ds["seg_origins"]["id"].astype(int).tolist() == sorted(kept) + sorted(mem.new_origins)
    for row in ds["seg_origins"][len(kept):]:
        assert (row["z"], row["y"], row["x"]) == mem.new_origins[int(row["id"])].seed_zyx and row["steps"] == 0
    rec = json.loads(attrs["refine"])
    assert rec["model"] == "bundled" and rec["learned"]["base"] == "cores"
    # the refinement only merges: every base object lies in one refined object, ids the group's smallest
    f, s = ds["seg_forward"], ds["seg"]
    pairs = np.unique(np.stack([f[f > 0], s[f > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] and (pairs[1] <= pairs[0]).all()


def test_block_gap_cores_base_equals_the_tiled_in_memory_one(data, tmp_path, one_thread):
    """Base gap_cores in block mode: the hand step's gap floods and decisions (its own block
    stages), then the learned stages over the flood with the gap objects painted in, equal the
    in-memory ``learned_refine`` with tile = the block, bit for bit, with the same counters and
    origins (the flood's objects that stay, then the gap objects and core objects kept)."""
    from floodfilling.inference.refine import FloodNetwork
    from floodfilling.model import load_model

    m = learned.load_refine_model("bundled")
    m.base = "gap_cores"  # (a usable gap_cores model: the bundled trees on that base)
    mpath = tmp_path / "gap_cores.json"
    learned.save_refine_model(m, str(mpath))
    rc = RefineConfig(model=str(mpath), halo=(8, 12, 12))
    out = tmp_path / "out.h5"
    run_learned(data, out, tmp_path / "work", refine=rc)
    ds, attrs = read_all(out)
    counters = json.loads(attrs["counters"])
    assert counters["refine_gap_floods"] >= 2 and counters["refine_learned_merges"] >= 4  # exercised
    assert json.loads(attrs["refine"])["learned"]["base"] == "gap_cores"
    with h5py.File(data / "crop.h5", "r") as f:
        image = Normalisation(**json.loads(attrs["normalisation"])).apply(f["raw"][:])
    net, info = load_model(str(data / "tiny.npz"), "cpu")
    mem = learned.learned_refine(image, ds["seg_forward"], learned.load_refine_model(str(mpath)), rc,
                                 overlaps=overlaps_dict(ds["seg_overlaps"]), network=FloodNetwork(net, info, cfg()),
                                 tile=BLOCK_ZYX)
    np.testing.assert_array_equal(ds["seg"], mem.segmentation)
    for k in ("learned_merges", "learned_base_objects", "rejoined", "gap_objects", "gap_cores", "voxels_filled",
              "gap_floods", "gap_steps", "gap_joined"):
        assert counters[f"refine_{k}"] == mem.counters[k], k
    kept = {int(i) for i in np.unique(ds["seg_forward"]) if i} - set(mem.joined)
    assert ds["seg_origins"]["id"].astype(int).tolist() == sorted(kept) + sorted(mem.new_origins)
    for row in ds["seg_origins"][len(kept):]:
        o = mem.new_origins[int(row["id"])]
        assert (row["z"], row["y"], row["x"], row["steps"]) == (*o.seed_zyx, o.steps)


class Killed(KeyboardInterrupt):
    pass


def test_kill_in_the_learned_stages_then_resume(data, learned_run, tmp_path, monkeypatch, one_thread):
    """A run interrupted in its statistics stage (after 3 of 8 tiles) leaves no output; the
    rerun redoes none of the cores and bases, only the 5 missing statistics, and writes the
    uninterrupted run's output."""
    ref, _ = read_all(learned_run[0])
    out, work = tmp_path / "out.h5", tmp_path / "work"
    real = learned.tile_contacts
    calls = []

    def dying(*a, **k):
        if len(calls) == 3:
            raise Killed()
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(learned, "tile_contacts", dying)
    with pytest.raises(Killed):
        run_learned(data, out, work)
    monkeypatch.setattr(learned, "tile_contacts", real)
    assert not out.exists()
    (rdir,) = work.glob("refine-*")
    assert len(list(rdir.glob("lstats/*.npz"))) == 3 and len(list(rdir.glob("lbase/*.h5"))) == 8
    from floodfilling.distributed.status import block_status, format_status

    st = block_status(work)  # ffn status: what the learned stages have done
    assert st["refine"]["learned_tiles_done"] == {"lcores": 8, "lbase": 8, "lstats": 3}
    assert "3 lstats" in format_status(st)
    res = run_learned(data, out, work)
    c = res.counters
    assert (c["refine_learned_cores_tiles_run"], c["refine_learned_base_tiles_run"],
            c["refine_learned_stats_tiles_run"]) == (0, 0, 5)
    assert res.blocks_run == 0
    same_output(read_all(out)[0], ref)
    assert not list(work.glob("refine-*"))  # tidied at the end


def test_a_changed_model_file_does_not_reuse_stale_stage_files(data, tmp_path, monkeypatch, one_thread):
    """Same model path, other content (threshold): another output digest, so another refinement
    directory; the killed run's files are dropped and every tile is computed again."""
    mpath = tmp_path / "m.json"
    m = learned.load_refine_model("bundled")
    learned.save_refine_model(m, str(mpath))
    out, work = tmp_path / "out.h5", tmp_path / "work"
    rc = RefineConfig(model=str(mpath), halo=(8, 12, 12))

    def dying(*a, **k):
        raise Killed()

    monkeypatch.setattr(learned, "tile_contacts", dying)
    with pytest.raises(Killed):
        run_learned(data, out, work, refine=rc)
    monkeypatch.undo()
    (old,) = work.glob("refine-*")
    m.threshold = 0.9
    learned.save_refine_model(m, str(mpath), overwrite=True)
    res = run_learned(data, out, work, refine=rc)
    assert not old.exists()
    c = res.counters
    assert (c["refine_learned_cores_tiles_run"], c["refine_learned_base_tiles_run"],
            c["refine_learned_stats_tiles_run"]) == (8, 8, 8)
    with h5py.File(out, "r") as f:
        assert json.loads(f["seg"].attrs["refine"])["learned"]["threshold"] == 0.9


@pytest.mark.mpi
def test_mpi_two_ranks_equal_one_and_resume_after_sigkill(data, learned_run, tmp_path):
    """2 ranks give the single-process output; a 2-rank run killed (SIGKILL of the launcher)
    once a base tile is on disk resumes to the same output."""
    ref, _ = read_all(learned_run[0])
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(out, work):
        return [mpiexec(), "-n", "2", sys.executable, "-m", "floodfilling.cli", "segment", f"{data / 'crop.h5'}:raw",
                f"{out}:seg", "--block", BLOCK, "--halo", HALO, "--workdir", str(work), "--model",
                str(data / "tiny.npz"), "--threads", "1", "--set", "min_segment_size=200", "-q", *SETS]

    r = subprocess.run(cmd(tmp_path / "out.h5", tmp_path / "work"), check=False, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    same_output(read_all(tmp_path / "out.h5")[0], ref)
    out2, work2 = tmp_path / "b.h5", tmp_path / "work2"
    p = subprocess.Popen(cmd(out2, work2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(work2.glob("refine-*/lbase/*.h5")):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks
    p.wait()
    assert not out2.exists()
    done = len(list(work2.glob("refine-*/lbase/*.h5")))
    assert 1 <= done
    r = subprocess.run(cmd(out2, work2), check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    same_output(read_all(out2)[0], ref)


# -- in memory: resumes after the flood ----------------------------------------------------------------

def test_in_memory_learned_refinement_resumes_after_the_flood(data, tmp_path, monkeypatch, caplog, one_thread):
    """``ffn segment --refine --refine-model`` interrupted in the learned merges: nothing is
    written, the finished flood's state is kept; the rerun resumes at the flood's end (no seed
    flooded again) and writes what an uninterrupted run writes."""
    from floodfilling.cli import main

    q = ["--model", str(data / "tiny.npz"), "--device", "cpu", "--threads", "1", "-q", "--set",
         "min_segment_size=200", "--checkpoint-interval", "1000", *SETS]
    src = f"{data / 'crop.h5'}:raw"
    assert main(["segment", src, f"{tmp_path / 'ref.h5'}:seg", *q]) == 0
    out, state = tmp_path / "out.h5", tmp_path / "out.h5.seg.resume.npz"

    def dying(*a, **k):
        raise Killed()

    monkeypatch.setattr(learned, "agglomerate", dying)
    assert main(["segment", src, f"{out}:seg", *q]) == 130  # "interrupted (rerun the same command to resume)"
    monkeypatch.undo()
    assert not out.exists()
    with np.load(state) as z:
        n = len(z["seeds"])
        assert int(z["seed_index"]) == n  # the flood is done
    with caplog.at_level(logging.INFO, logger="floodfilling.inference.segment"):
        assert main(["segment", src, f"{out}:seg", *q]) == 0
    assert any(f"seed {n} of {n}" in r.getMessage() for r in caplog.records)
    assert not state.exists()
    same_output(read_all(out)[0], read_all(tmp_path / "ref.h5")[0])
