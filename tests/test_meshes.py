"""``ffn export --meshes --skeletons``: igneous' meshes, skeletons and the segment properties
of a hand-built segmentation (boxes: their voxel counts, physical bounds and lengths known),
read back with CloudVolume; 2 workers joining from another process give the same layer as one;
a killed export resumes without redoing the tasks that finished."""

import json
import subprocess
import sys
import os
import time

import h5py
import numpy as np
import pytest

pytest.importorskip("cloudvolume")
pytest.importorskip("igneous", reason="the meshes extra (igneous-pipeline) is not installed")

from cloudvolume import CloudVolume  # noqa: E402

from floodfilling.cli import main  # noqa: E402
from floodfilling.export import export  # noqa: E402
from floodfilling.meshes import MeshOptions  # noqa: E402

RES_ZYX = (8, 4, 4)
# objects: id -> (z, y, x) box, half-open
BOXES = {1: ((5, 10, 10), (30, 50, 40)), 2: ((30, 20, 45), (55, 60, 65)), 3: ((40, 55, 5), (58, 78, 20)),
         7: ((2, 70, 60), (4, 72, 62))}  # 7: 8 voxels, below the skeleton dust
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("meshes")
    seg = np.zeros((60, 80, 70), np.uint32)
    for i, (a, b) in BOXES.items():
        seg[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = i
    with h5py.File(d / "v.h5", "w") as f:
        f.create_dataset("seg", data=seg).attrs["resolution_zyx_nm"] = RES_ZYX
        f["img"] = (seg * 40).astype(np.uint8)
    return d, seg


def mesh_vertices(path):
    cv = CloudVolume(f"file://{path}", progress=False)
    return {i: np.asarray(cv.mesh.get(i)[i].vertices) for i in BOXES}


def test_export_meshes_skeletons_properties(vol, tmp_path, capsys):
    d, seg = vol
    dest = tmp_path / "layer"
    assert main(["export", f"{d / 'v.h5'}:seg", str(dest), "--meshes", "--skeletons", "--skeleton-dust", "100",
                 "-q"]) == 0
    assert "with meshes, skeletons, segment properties" in capsys.readouterr().out
    info = json.loads((dest / "info").read_text())
    assert {"mesh", "skeletons", "segment_properties"} <= set(info)
    assert json.loads((dest / info["mesh"] / "info").read_text())["@type"] == "neuroglancer_multilod_draco"
    # segment properties: every object's voxel count (reference: np.unique)
    props = json.loads((dest / "segment_properties" / "info").read_text())["inline"]
    u, c = np.unique(seg[seg > 0], return_counts=True)
    assert props["ids"] == [str(i) for i in u] and props["properties"][0]["values"] == c.tolist()
    # each mesh spans its box in nm (x, y, z), to within a voxel (marching cubes at voxel centres, simplification)
    verts = mesh_vertices(dest)
    res_xyz = np.array(RES_ZYX[::-1], float)
    for i, (a, b) in BOXES.items():
        lo, hi = np.array(a[::-1]) * res_xyz, np.array(b[::-1]) * res_xyz
        v = verts[i]
        assert np.all(np.abs(v.min(0) - lo) <= res_xyz + 1e-3), (i, v.min(0), lo)
        assert np.all(np.abs(v.max(0) - hi) <= res_xyz + 1e-3), (i, v.max(0), hi)
    # skeletons: inside their boxes, none for the dust object; ffn stats reads their cable length
    cv = CloudVolume(f"file://{dest}", progress=False)
    lengths = {}
    for i in (1, 2, 3):
        sk = cv.skeleton.get(i)
        a, b = BOXES[i]
        assert np.all(sk.vertices >= np.array(a[::-1]) * res_xyz - 1e-3)
        assert np.all(sk.vertices <= np.array(b[::-1]) * res_xyz + 1e-3)
        lengths[i] = sk.cable_length()
        assert lengths[i] > 0
    assert not (dest / info["skeletons"] / "7.gz").exists() and not (dest / info["skeletons"] / "7").exists()
    out = tmp_path / "objects.csv"
    assert main(["stats", f"{d / 'v.h5'}:seg", "--skeletons", str(dest), "--out", str(out)]) == 0
    rows = {r.split(",")[0]: r.split(",") for r in out.read_text().splitlines()[1:]}
    head = out.read_text().splitlines()[0].split(",")
    k = head.index("cable_length_nm")
    for i in (1, 2, 3):
        assert float(rows[str(i)][k]) == pytest.approx(lengths[i], abs=0.1)
    assert rows["7"][k] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer", "objects.csv"]  # no work dir, no lock


def test_two_joined_workers_match_one(vol, tmp_path):
    """The multi-node path: a planner with no workers of its own (--parallel 0, another process)
    and 2 workers joining it through the file queue; the layer equals a one-worker export."""
    d, _ = vol
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["export", f"{d / 'v.h5'}:seg", str(one), "--meshes", "-q"]) == 0
    argv = ["export", f"{d / 'v.h5'}:seg", str(two), "--meshes", "-q"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    planner = subprocess.Popen([sys.executable, "-m", "floodfilling.cli", *argv, "--parallel", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert main([*argv, "--join", "--parallel", "2"]) == 0
        out, err = planner.communicate(timeout=120)
    finally:
        planner.kill()
    assert planner.returncode == 0, err
    a, b = mesh_vertices(one), mesh_vertices(two)
    for i in BOXES:
        assert np.array_equal(np.unique(a[i], axis=0), np.unique(b[i], axis=0)), i
    assert not (tmp_path / "two.partial").exists()


def test_killed_export_resumes_without_redoing_tasks(vol, tmp_path, monkeypatch):
    from igneous.tasks.mesh.mesh import MeshTask

    d, _ = vol
    opts = MeshOptions(meshes=True, mesh_shape=(32, 32, 32))  # 3 x 3 x 2 = 18 mesh tasks
    real = MeshTask.execute
    calls = []

    def killed_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while running its third task
        return real(self, *a, **k)

    monkeypatch.setattr(MeshTask, "execute", killed_on_third)
    dest = tmp_path / "layer"
    with pytest.raises(KeyboardInterrupt):
        export(f"{d / 'v.h5'}:seg", str(dest), meshes=opts)
    assert not dest.exists() and (tmp_path / "layer.partial").is_dir() and not (tmp_path / "layer.lock").exists()
    calls.clear()
    monkeypatch.setattr(MeshTask, "execute", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    export(f"{d / 'v.h5'}:seg", str(dest), meshes=opts)
    assert len(calls) == 18 - 2  # the two finished tasks were not run again; the killed one was
    fresh = tmp_path / "fresh"
    export(f"{d / 'v.h5'}:seg", str(fresh), meshes=opts)
    a, b = mesh_vertices(dest), mesh_vertices(fresh)
    for i in BOXES:
        assert np.array_equal(np.unique(a[i], axis=0), np.unique(b[i], axis=0)), i
    assert not (tmp_path / "layer.partial").exists()


def test_meshes_of_an_image_are_refused(vol, tmp_path, capsys):
    d, _ = vol
    assert main(["export", f"{d / 'v.h5'}:img", str(tmp_path / "l"), "--meshes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "img" in err and "not a label volume" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(vol, tmp_path, capsys, monkeypatch):
    d, _ = vol
    for name in ("igneous", "igneous.task_creation"):
        monkeypatch.setitem(sys.modules, name, None)  # as if igneous-pipeline were not installed
    assert main(["export", f"{d / 'v.h5'}:seg", str(tmp_path / "l"), "--meshes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "floodfilling[meshes]" in err and "igneous-pipeline" in err
    assert list(tmp_path.iterdir()) == []


def test_killed_export_of_a_changed_input_starts_over(vol, tmp_path, monkeypatch):
    import shutil

    from igneous.tasks.mesh.mesh import MeshTask

    d, _ = vol
    src = tmp_path / "v.h5"
    shutil.copy(d / "v.h5", src)
    opts = MeshOptions(meshes=True, mesh_shape=(32, 32, 32))
    real = MeshTask.execute
    calls = []

    def killed_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(MeshTask, "execute", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        export(f"{src}:seg", str(tmp_path / "layer"), meshes=opts)
    with h5py.File(src, "r+") as f:  # the input changes before the rerun
        f["seg"][0, 0, 0] = 9
    calls.clear()
    monkeypatch.setattr(MeshTask, "execute", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    export(f"{src}:seg", str(tmp_path / "layer"), meshes=opts)
    assert len(calls) == 18  # nothing of the killed run was trusted
    props = json.loads((tmp_path / "layer" / "segment_properties" / "info").read_text())["inline"]
    assert "9" in props["ids"]
