"""Block inference end to end on a real FIB-25 crop with a tiny hand-set model that floods
bright regions (so objects cross block borders): invariants and brute-force reconciliation
in one process, independence of K, resume after deleting blocks, bad inputs, and under
``mpiexec``: 2 ranks == 1 rank, SIGKILL of a rank + rerun, more ranks than blocks, an error
on one rank aborting all."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from floodfilling.testing import mean_flood_model
import torch

from floodfilling.cli import main
from floodfilling.config import InferenceConfig
from floodfilling.boxes import BBox

CROP = (slice(100, 148), slice(60, 156), slice(60, 156))  # 48 x 96 x 96 -> 2 x 2 x 2 blocks
BLOCK, HALO = "24,48,48", "6,6,6"  # command-line text; the library takes BLOCK_ZYX, HALO_ZYX
BLOCK_ZYX, HALO_ZYX = (24, 48, 48), (6, 6, 6)
CORE = (24, 48, 48)


def tiny_model(path):
    """ConvStack3D(depth=1, features=4), FOV 9, deltas 2: logits = seed + 6 * mean3x3x3(image),
    i.e. it floods bright (above-mean) regions; deterministic, hand-set weights."""
    return mean_flood_model(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory, fib25):
    d = tmp_path_factory.mktemp("blocks")
    with h5py.File(d / "crop.h5", "w") as f:
        f.create_dataset("raw", data=fib25[0][CROP]).attrs["resolution_zyx_nm"] = [10, 10, 10]
        bad = fib25[0][CROP].astype(np.float32)
        bad[40, 90, 90] = np.nan  # only the last block sees it
        f.create_dataset("nan", data=bad)
    tiny_model(d / "tiny.npz")
    return d


def cfg(device="cpu"):
    return InferenceConfig(min_segment_size=200, threads=1, device=str(device))


@pytest.fixture
def one_thread():
    t = torch.get_num_threads()
    yield
    torch.set_num_threads(t)
    from floodfilling import kernels

    kernels.set_num_threads(0)


def run_api(data, out, workdir, **kw):
    from floodfilling.distributed.run import segment_blocks

    kw = dict(dict(block=BLOCK_ZYX, halo=HALO_ZYX, workdir=str(workdir), model=str(data / "tiny.npz"), config=cfg()),
              **kw)
    return segment_blocks(f"{data / 'crop.h5'}:raw", f"{out}:seg", **kw)


def read(path):
    with h5py.File(path, "r") as f:
        return f["seg"][:], f["seg_origins"][:], dict(f["seg"].attrs)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Single-process run (the reference output for everything else)."""
    t = torch.get_num_threads()
    d = tmp_path_factory.mktemp("ref")
    res = run_api(data, d / "seg.h5", d / "work")
    torch.set_num_threads(t)
    return d / "seg.h5", d / "work", res


@pytest.fixture(scope="module")
def device_reference(data, reference, test_device, tmp_path_factory):
    """The reference run on the device lane's device (host path, K = 1, batch 1): ``reference``
    itself on cpu; on a GPU its own run, since its float32 convolutions round differently
    from the CPU's (the device tests below compare the device with itself, exactly)."""
    if test_device.type == "cpu":
        return reference
    d = tmp_path_factory.mktemp("ref_device")
    c = cfg(test_device)
    c.resident = "off"
    res = run_api(data, d / "seg.h5", d / "work", inflight=1, config=c)
    return d / "seg.h5", d / "work", res


def test_single_process_invariants(reference):
    from floodfilling.geometry import make_grid
    from floodfilling.distributed.reconcile import MergeRule
    from test_distributed_reconcile import reference_reconcile

    out, work, res = reference
    seg, origins, attrs = read(out)
    assert seg.shape == (48, 96, 96) and seg.dtype == np.uint32
    n = int(seg.max())
    assert n == res.n_objects >= 5 and res.n_blocks == 8 and res.blocks_run == 8
    assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, n + 1))  # contiguous 1..N
    assert list(origins["id"]) == list(range(1, n + 1))
    # objects cross block borders and keep one id
    spans = [len({tuple(c) for c in np.argwhere(seg == i) // CORE}) for i in range(1, n + 1)]
    assert max(spans) >= 3 and res.n_merges > 0
    # brute-force reconciliation of the stored block results gives the same volume
    grid = make_grid((48, 96, 96), (24, 48, 48), (6, 6, 6), (9, 9, 9))
    segs, max_ids = [], []
    for b in grid:
        with h5py.File(work / "blocks" / f"{b.name()}.h5", "r") as f:
            segs.append(f["seg"][:])
            max_ids.append(int(f.attrs["max_id"]))
            assert f["seg"].shape == b.outer_shape
    assert np.array_equal(seg, reference_reconcile(grid, segs, max_ids, MergeRule()))
    assert attrs["block_zyx"].tolist() == [24, 48, 48] and attrs["halo_zyx"].tolist() == [6, 6, 6]
    assert sorted(p.name for p in work.iterdir()) == ["blocks", "manifest.json", "reconcile.json"]


@pytest.mark.device
def test_inflight_does_not_change_results(data, device_reference, tmp_path, one_thread, test_device):
    """3 blocks in flight on the host path == 1. On a GPU (batches of 3 there) this also needs
    batch-size-independent logits: see test_device_path_equals_host_path_k1_k8_and_pipelined."""
    reference = device_reference
    c = cfg(test_device)
    c.resident = "off"
    res = run_api(data, tmp_path / "seg.h5", tmp_path / "work", inflight=3, config=c)
    assert res.n_objects == reference[2].n_objects
    assert np.array_equal(read(tmp_path / "seg.h5")[0], read(reference[0])[0])


@pytest.mark.device
def test_device_resident_blocks_equal_host_blocks(data, device_reference, tmp_path, one_thread, test_device):
    """The device-resident engine (torch tensors on the lane's device; two alternating groups
    on cuda/xpu), 3 blocks sharing each batched call, gives the host path's volume (on a GPU,
    batches: as above)."""
    reference = device_reference
    c = cfg(test_device)
    c.resident = "on"
    res = run_api(data, tmp_path / "seg.h5", tmp_path / "work", inflight=3, config=c)
    assert res.n_objects == reference[2].n_objects
    assert np.array_equal(read(tmp_path / "seg.h5")[0], read(reference[0])[0])


def test_prefetch_gives_the_same_blocks_and_records_the_wait(data, reference, tmp_path, one_thread):
    """Blocks read, normalised and seeded ahead in 2 threads: the volume and every block file
    as without; the engine's wait for prepared blocks is in reconcile.json's per_rank."""
    import json as _json

    res = run_api(data, tmp_path / "seg.h5", tmp_path / "work", inflight=2, config=cfg().with_overrides(prefetch=2))
    assert res.n_objects == reference[2].n_objects
    assert np.array_equal(read(tmp_path / "seg.h5")[0], read(reference[0])[0])
    for p in sorted((reference[1] / "blocks").iterdir()):
        with h5py.File(p, "r") as a, h5py.File(tmp_path / "work" / "blocks" / p.name, "r") as b:
            assert np.array_equal(a["seg"][:], b["seg"][:]) and a.attrs["max_id"] == b.attrs["max_id"]
    ranks = {}
    for name, work in (("ahead", tmp_path / "work"), ("in loop", reference[1])):
        (r,) = _json.loads((work / "reconcile.json").read_text())["per_rank"]
        assert r["blocks"] == 8 and r["prepare_seconds"] > 0 and r["host_wait_seconds"] >= 0
        ranks[name] = r
    # without prefetch the engine waits for all of the preparation (timed inside the wait)
    assert ranks["in loop"]["host_wait_seconds"] >= ranks["in loop"]["prepare_seconds"]
    assert res.timings["host_wait_seconds_sum"] == ranks["ahead"]["host_wait_seconds"]
    from floodfilling.distributed.status import block_status, format_status

    st = block_status(tmp_path / "work")
    assert st["reconcile"]["host_wait_seconds"] == ranks["ahead"]["host_wait_seconds"]
    assert "the engine waited" in format_status(st)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_error_preparing_a_block_is_the_same_one_line_error(data, tmp_path, one_thread, prefetch):
    """A NaN in the last block (raised in a prefetch thread, or in the loop) ends the run with
    the same error; the blocks before it are written."""
    from floodfilling.distributed.run import segment_blocks
    from floodfilling.normalise import NormalisationError

    with pytest.raises(NormalisationError) as e:
        segment_blocks(f"{data / 'crop.h5'}:nan", f"{tmp_path / 'seg.h5'}:seg", block=BLOCK_ZYX, halo=HALO_ZYX,
                       workdir=str(tmp_path / "work"), model=str(data / "tiny.npz"),
                       bbox=BBox((0, 48, 48), (48, 96, 96)),  # 2 blocks in z; the NaN is in the second
                       config=cfg().with_overrides(normalise="fixed", prefetch=prefetch))
    assert str(e.value).endswith("block 18,48,48:48,96,96: contains NaN or infinite values"), str(e.value)
    assert "\n" not in str(e.value) and len(list((tmp_path / "work" / "blocks").iterdir())) == 1


@pytest.mark.device
def test_resume_skips_finished_blocks(data, device_reference, tmp_path, one_thread, test_device):
    """Resume after a killed run (blocks missing, a stale claim, a half-written block and
    output): only the missing blocks run (on the lane's device) and the volume is the
    uninterrupted run's."""
    reference = device_reference
    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    blocks = sorted((work / "blocks").iterdir())
    for p in blocks[2:4]:
        p.unlink()
    (work / "claims").mkdir()
    (work / "claims" / blocks[2].stem).write_text("stale claim of a killed run\n")  # must not block the rerun
    (work / "blocks" / (blocks[3].name + ".tmp-999999")).write_bytes(b"half-written")
    kept = {p.name: os.stat(p).st_ino for p in blocks[:2] + blocks[4:]}
    out = tmp_path / "seg.h5"
    (tmp_path / "seg.h5.tmp-0123456789ab").write_bytes(b"output of a killed run")
    # K = 1 (batch 1, as the reference) on the device's default path: resident on cuda/xpu
    res = run_api(data, out, work, config=cfg(test_device), inflight=1)
    assert (res.blocks_run, res.blocks_skipped) == (2, 6)
    assert {p.name: os.stat(p).st_ino for p in blocks[:2] + blocks[4:]} == kept
    assert np.array_equal(read(out)[0], read(reference[0])[0])
    assert not (work / "claims").exists() and not any(".tmp-" in p.name for p in (work / "blocks").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.h5", "work"]
    # the output is complete: rerunning does nothing
    mtime = os.stat(out).st_mtime_ns
    assert run_api(data, out, work, config=cfg(test_device)).already_complete and os.stat(out).st_mtime_ns == mtime


def test_dust_size_and_merge_options_reuse_blocks(data, reference, tmp_path, one_thread):
    """Reconciliation options are not in the manifest: a rerun with others reuses every block;
    dust removal acts on whole objects (summed over blocks) and renumbers 1..N in order."""
    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    out = tmp_path / "seg.h5"
    res = run_api(data, out, work, config=cfg().with_overrides(dust_size=800))
    assert res.blocks_run == 0
    ref = read(reference[0])[0]
    ids, counts = np.unique(ref[ref > 0], return_counts=True)
    lut = np.zeros(ids.max() + 1, np.uint32)
    lut[ids[counts >= 800]] = np.arange(1, (counts >= 800).sum() + 1)
    seg, origins, _ = read(out)
    assert 0 < res.n_objects < reference[2].n_objects and np.array_equal(seg, lut[ref])
    assert list(origins["id"]) == list(range(1, res.n_objects + 1))
    # other options and an existing output: not "already complete"
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        run_api(data, out, work, config=cfg().with_overrides(merge_min_fraction=0.9))
    res = run_api(data, out, work, config=cfg().with_overrides(merge_min_fraction=0.9), overwrite=True)
    assert res.blocks_run == 0 and res.n_objects >= reference[2].n_objects


@pytest.mark.parametrize("dust", [0, 300])
def test_split_components_equal_whole_volume_postprocess(data, reference, tmp_path, one_thread, dust):
    """split_components across blocks == splitting the whole unsplit output (then dust,
    renumbering) in one piece; origins: one row per component holding a seed of its object."""
    from floodfilling.postprocess import postprocess

    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    out = tmp_path / "seg.h5"
    res = run_api(data, out, work, config=cfg().with_overrides(split_components=True, dust_size=dust))
    assert res.blocks_run == 0
    ref, ref_origins, _ = read(reference[0])
    want, _ = postprocess(ref, {}, split=True, dust_size=dust)
    seg, origins, _ = read(out)
    assert int(want.max()) > (reference[2].n_objects if dust == 0 else 0)  # something was split
    assert np.array_equal(seg, want) and res.n_objects == int(want.max())
    ids = origins["id"]
    assert np.all(ids[1:] > ids[:-1]) and np.all(seg[origins["z"], origins["y"], origins["x"]] == ids)
    # every reference origin whose seed survives names its component
    survived = seg[ref_origins["z"], ref_origins["y"], ref_origins["x"]]
    assert set(survived[survived > 0].tolist()) <= set(ids.tolist())
    assert sorted(p.name for p in work.iterdir()) == ["blocks", "manifest.json", "reconcile.json"]


def test_status_of_finished_and_partial_runs(reference, tmp_path, capsys):
    import json as _json

    out, work, res = reference
    assert main(["status", str(work), "--json"]) == 0
    st = _json.loads(capsys.readouterr().out)
    assert (st["blocks"], st["blocks_done"], st["blocks_left"], st["blocks_running"]) == (8, 8, 0, 0)
    assert st["finished"] and st["reconcile"]["objects"] == res.n_objects and st["fraction_done"] == 1.0
    assert st["fov_steps"] == res.counters["steps"] and st["eta_s"] == 0.0
    part = tmp_path / "work"
    shutil.copytree(work, part)
    blocks = sorted((part / "blocks").iterdir())
    for p in blocks[:2]:
        p.unlink()
    (part / "claims").mkdir()
    (part / "claims" / blocks[0].stem).write_text("0123456789ab node7 4242 3\n")
    (part / "reconcile.json").unlink()
    assert main(["status", str(part)]) == 0
    text = capsys.readouterr().out
    assert "6/8 blocks done (75.0 % of the voxels), 1 running, 2 left" in text
    assert f"running: {blocks[0].stem} on node7 rank 3 (pid 4242" in text and "min left at 1 rank(s)" in text
    assert main(["status", str(tmp_path)]) == 2
    assert "no block-inference manifest.json" in capsys.readouterr().err


def test_zarr_chunks_divide_the_block():
    from floodfilling.distributed.output import zarr_chunks_for

    assert zarr_chunks_for((128, 256, 256)) == (64, 64, 64)
    assert zarr_chunks_for((24, 48, 100)) == (24, 48, 50)
    assert zarr_chunks_for((97, 134, 17)) == (97, 134, 17)  # no divisor in 16..64: the block size
    for b in [(24, 48, 48), (100, 200, 300), (97, 96, 95)]:
        assert all(x % c == 0 for x, c in zip(b, zarr_chunks_for(b)))


def read_zarr(store):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(store), mode="r")
    return g["seg"][...], g["seg_origins"], g["seg"]


def test_zarr_output_beside_the_raw_image(data, reference, tmp_path, one_thread):
    """Block output into a zarr group: the reference's volume and origins, chunks aligned to
    block cores, the group's other arrays untouched, a killed run's hidden array removed, no
    temporary left, a rerun does nothing, --overwrite replaces the array."""
    zarr = pytest.importorskip("zarr")
    from floodfilling.distributed.run import segment_blocks

    store = tmp_path / "vol.zarr"
    raw = zarr.open_group(str(store), mode="w").create_array("raw", shape=(4, 4, 4), dtype=np.uint8)
    raw[...] = 7
    (store / ".seg.tmp-0123456789ab").mkdir()  # the output of a killed run
    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    kw = dict(block=BLOCK_ZYX, halo=HALO_ZYX, workdir=str(work), model=str(data / "tiny.npz"), config=cfg())
    res = segment_blocks(f"{data / 'crop.h5'}:raw", f"{store}/seg", **kw)
    assert res.blocks_run == 0 and res.n_objects == reference[2].n_objects
    seg, origins, arr = read_zarr(store)
    ref, ref_origins, ref_attrs = read(reference[0])
    assert np.array_equal(seg, ref) and arr.dtype == np.uint32
    for col in ("id", "z", "y", "x", "steps"):
        assert np.array_equal(origins[col][...], ref_origins[col])
    assert all(c0 % c == 0 for c0, c in zip(CORE, arr.chunks))
    assert arr.attrs["block_manifest"] == ref_attrs["block_manifest"]
    assert list(arr.attrs["resolution_zyx_nm"]) == [10, 10, 10]
    assert np.all(zarr.open_group(str(store), mode="r")["raw"][...] == 7)
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith("zarr.json")) == ["raw", "seg", "seg_origins"]
    assert segment_blocks(f"{data / 'crop.h5'}:raw", f"{store}/seg", **kw).already_complete
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        segment_blocks(f"{data / 'crop.h5'}:raw", f"{store}/seg", **dict(kw, config=cfg().with_overrides(dust_size=800)))
    zarr.open_group(str(store), mode="a")["seg"].attrs["marker"] = 1
    res = segment_blocks(f"{data / 'crop.h5'}:raw", f"{store}/seg", overwrite=True,
                         **dict(kw, config=cfg().with_overrides(dust_size=800)))
    seg, _, arr = read_zarr(store)
    assert "marker" not in arr.attrs and 0 < int(seg.max()) == res.n_objects < reference[2].n_objects
    assert not any(".tmp-" in p.name or ".old-" in p.name for p in store.iterdir())


def test_bad_inputs(data, reference, tmp_path, capsys):
    common = [f"{data / 'crop.h5'}:raw", f"{tmp_path / 'o.h5'}:seg", "--model", str(data / "tiny.npz"), "-q",
              "--set", "min_segment_size=200", "--threads", "1"]

    def err(*args):
        assert main(["segment", *common, *args]) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("ffn: error:") and "\n" not in e, e
        return e

    assert "--halo 2,2,2: z halo 2 is smaller than the FOV radius 4,4,4" in err("--block", BLOCK, "--halo", "2,2,2")
    assert "--block 6,48,48: z size 6 is smaller than the model's FOV 9,9,9" in err("--block", "6,48,48")
    assert "--block" in err("--block", "24,48")
    assert "--halo 30,6,6" in err("--block", BLOCK, "--halo", "30,6,6")
    assert "--inflight 0: must be >= 1" in err("--block", BLOCK, "--inflight", "0")
    assert "--device cuda:7" in err("--block", BLOCK, "--device", "cuda:7")
    assert "--device 'tpu': expected auto, cpu, cuda[:N] or xpu[:N]" in err("--block", BLOCK, "--device", "tpu")
    assert "compile" in err("--set", "compile=fast")
    assert "name the array to write" in main_err(["segment", *common[:1], f"{tmp_path / 'o.zarr'}", *common[2:],
                                                  "--block", BLOCK], capsys)
    # a workdir of a different model / options
    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    other = tiny_model(tmp_path / "other.npz")
    with np.load(other) as z:
        arrays = dict(z)
    arrays["conv_lom/biases"] = arrays["conv_lom/biases"] + 0.25
    np.savez(other, **arrays)
    e = err("--block", BLOCK, "--halo", HALO, "--workdir", str(work), "--model", str(other))
    assert f"--workdir {work} holds blocks of a different run (differs in: model)" in e
    e = err("--workdir", str(work), "--set", "min_segment_size=300")
    assert "differs in: config" in e
    assert "differs in: block" in err("--workdir", str(work), "--block", "24,48,96")
    # an existing output that is not ours
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["seg"] = np.zeros((1, 1, 1), np.uint32)
    assert "exists; pass --overwrite" in err("--block", BLOCK)


def main_err(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


# -- under mpiexec ------------------------------------------------------------------------------

def mpiexec():
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'floodfilling[mpi]')")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed (pip install 'floodfilling[mpi]')")
    return exe


def ffn_cmd(data, out, work, n, *extra, image="raw"):
    return [mpiexec(), "-n", str(n), sys.executable, "-m", "floodfilling.cli", "-v", "segment", f"{data / 'crop.h5'}:{image}",
            f"{out}:seg", "--model", str(data / "tiny.npz"), "--block", BLOCK, "--halo", HALO, "--workdir", str(work),
            "--set", "min_segment_size=200", "--threads", "1", "-q", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.mark.mpi
def test_mpi_two_ranks_equal_one_rank(data, reference, tmp_path):
    out = tmp_path / "seg.h5"
    p = subprocess.run(ffn_cmd(data, out, tmp_path / "work", 2), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1/2" in p.stderr  # both ranks worked
    seg, origins, _ = read(out)
    ref, ref_origins, _ = read(reference[0])
    assert np.array_equal(seg, ref)
    assert np.array_equal(origins[["id", "z", "y", "x", "steps"]], ref_origins[["id", "z", "y", "x", "steps"]])
    i = np.bincount(seg.ravel())[1:].argmax() + 1  # the largest object spans several blocks, one id
    assert len({tuple(c) for c in np.argwhere(seg == i) // CORE}) >= 3


@pytest.mark.mpi
def test_mpi_two_ranks_write_one_zarr_array(data, reference, tmp_path):
    """Two ranks write their blocks' cores into one zarr array concurrently (chunks never
    shared): the reference's volume. The blocks are the reference's (reconcile + write only)."""
    pytest.importorskip("zarr")
    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    store = tmp_path / "vol.zarr"
    cmd = ffn_cmd(data, store, work, 2)
    cmd[cmd.index(f"{store}:seg")] = f"{store}/seg"
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seg, origins, _ = read_zarr(store)
    assert np.array_equal(seg, read(reference[0])[0])
    assert list(origins["id"][...]) == list(range(1, int(seg.max()) + 1))


@pytest.mark.mpi
def test_mpi_two_ranks_split_components(data, reference, tmp_path):
    """split_components with 2 ranks (labelling, face joins and the parallel write spread over
    ranks) == the whole-volume split of the reference output."""
    from floodfilling.postprocess import postprocess

    work = tmp_path / "work"
    shutil.copytree(reference[1], work)
    out = tmp_path / "seg.h5"
    p = subprocess.run(ffn_cmd(data, out, work, 2, "--set", "split_components=true"), capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want, _ = postprocess(read(reference[0])[0], {}, split=True, dust_size=0)
    assert np.array_equal(read(out)[0], want)
    assert not any(p.name.startswith("split-") for p in work.iterdir())


@pytest.mark.mpi
def test_mpi_sigkill_one_rank_and_rerun(data, reference, tmp_path):
    out, work = tmp_path / "seg.h5", tmp_path / "work"
    cmd = ffn_cmd(data, out, work, 2)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=log)
    blocks = work / "blocks"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if blocks.is_dir() and any(p.suffix == ".h5" for p in blocks.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    pids = {}
    t0 = time.time()
    while not pids and time.time() - t0 < 60:  # a claim is created (O_EXCL) before its line is written
        for c in (work / "claims").iterdir():
            fields = c.read_text().split()
            if len(fields) == 4:
                pids[int(fields[3])] = int(fields[2])
        time.sleep(0.01)
    os.kill(pids.get(1, pids[0]), signal.SIGKILL)
    proc.wait(timeout=60)  # mpiexec ends the other rank: no hang
    assert proc.returncode != 0
    assert not out.exists()  # nothing half-written
    done = {p.name: os.stat(p).st_ino for p in blocks.iterdir() if p.suffix == ".h5"}
    assert 0 < len(done) < 8
    for name in done:  # every finished block file is complete
        with h5py.File(blocks / name, "r") as f:
            assert f["seg"].shape and "max_id" in f.attrs
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{len(done)} already done" in p.stderr
    assert {n: os.stat(blocks / n).st_ino for n in done} == done  # skipped, not redone
    assert np.array_equal(read(out)[0], read(reference[0])[0])


@pytest.mark.mpi
def test_mpi_more_ranks_than_blocks(data, tmp_path, one_thread):
    bbox = "0,0,0:24,96,48"  # 2 blocks, 3 ranks
    out = tmp_path / "seg.h5"
    p = subprocess.run(ffn_cmd(data, out, tmp_path / "work", 3, "--bbox", bbox), capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = run_api(data, tmp_path / "one.h5", tmp_path / "work1", bbox=BBox.parse(bbox))
    assert res.n_blocks == 2
    assert np.array_equal(read(out)[0], read(tmp_path / "one.h5")[0])


@pytest.mark.mpi
def test_mpi_error_on_one_rank_aborts_all(data, tmp_path):
    out = tmp_path / "seg.h5"
    p = subprocess.run(ffn_cmd(data, out, tmp_path / "work", 2, "--normalise", "fixed", image="nan"),
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode != 0
    assert "contains NaN" in p.stderr and "aborting all ranks" in p.stderr
    assert not out.exists()
