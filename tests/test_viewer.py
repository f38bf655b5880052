"""``ffn view``: neuroglancer layers served lazily from the files (chunks compared with the
arrays), bbox offsets, bad input, and the command end to end (URL answered, Ctrl-C exits 0)."""

import io
import signal
import subprocess
import sys
import urllib.request
import zlib

import h5py
import numpy as np
import pytest

pytest.importorskip("neuroglancer")

from floodfilling.cli import main  # noqa: E402
from floodfilling.viewer import make_viewer  # noqa: E402
from floodfilling.boxes import BBox  # noqa: E402


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("view")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, size=(20, 30, 40), dtype=np.uint8)
    seg = rng.integers(0, 50, size=raw.shape, dtype=np.uint32)
    gt = rng.integers(-5, 5, size=raw.shape).astype(np.int16)
    with h5py.File(d / "v.h5", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution_zyx_nm"] = [40, 8, 8]
        f["seg"] = seg
        f["gt"] = gt
        f["float"] = raw.astype(np.float64)
        f["small"] = seg[:5]
    return d / "v.h5", raw, seg, gt


def chunk(layer, start, end):
    data, _ = layer.source.get_encoded_subvolume(data_format="npz", start=np.array(start), end=np.array(end),
                                                  scale_key="1,1,1")
    return np.load(io.BytesIO(zlib.decompress(data))).reshape(tuple(e - s for s, e in zip(start, end)))


def test_layers_serve_the_files(vol):
    path, raw, seg, gt = vol
    viewer, layers = make_viewer(f"{path}:raw", [f"{path}:seg", f"{path}:gt"], bbox=BBox.parse("2,3,4:18,27,36"))
    assert [lay.name for lay in layers] == ["raw", "seg", "gt"]
    assert [lay.kind for lay in layers] == ["image", "segmentation", "segmentation"]
    st = viewer.state
    assert [lay.name for lay in st.layers] == ["raw", "seg", "gt"]
    assert list(st.dimensions.names) == ["z", "y", "x"] and list(st.dimensions.scales) == pytest.approx([40e-9, 8e-9, 8e-9])
    assert list(layers[0].source.voxel_offset) == [2, 3, 4]
    # chunks are relative to the box
    assert np.array_equal(chunk(layers[0], (0, 0, 0), (8, 8, 8)), raw[2:10, 3:11, 4:12])
    assert np.array_equal(chunk(layers[1], (4, 8, 16), (16, 24, 32)), seg[6:18, 11:27, 20:36])
    assert np.array_equal(chunk(layers[2], (0, 0, 0), (4, 4, 4)), gt[2:6, 3:7, 4:8].astype(np.uint64))
    url = viewer.get_viewer_url()
    assert url.startswith("http://127.0.0.1:")
    assert urllib.request.urlopen(url, timeout=30).status == 200


def test_origins_become_points(tmp_path):
    from floodfilling.results import ORIGIN_DTYPE

    seg = np.zeros((10, 12, 14), np.uint32)
    org = np.zeros(3, ORIGIN_DTYPE)
    org["id"], org["z"], org["y"], org["x"] = [1, 2, 5], [1, 5, 9], [2, 6, 11], [3, 7, 13]
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["raw"] = np.zeros(seg.shape, np.uint8)
        f["seg"] = seg
        f["seg_origins"] = org
    viewer, layers = make_viewer(f"{tmp_path / 's.h5'}:raw", [f"{tmp_path / 's.h5'}:seg"], bbox=BBox.parse("0,0,0:8,12,14"))
    st = viewer.state
    assert [lay.name for lay in st.layers] == ["raw", "seg", "seg_origins"]
    pts = st.layers["seg_origins"].annotations
    assert [p.id for p in pts] == ["1", "2"]  # id 5 lies outside the box (z 9 >= 8)
    assert list(pts[1].point) == [5.5, 6.5, 7.5]


def test_bad_inputs(vol, capsys):
    path = vol[0]

    def err(*args):
        assert main(["view", *args]) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("ffn: error:") and "\n" not in e, e
        return e

    assert f"{path}:small: shape (5, 30, 40) does not match" in err(f"{path}:raw", f"{path}:small")
    assert f"{path}:float: dtype float64 is not a label (integer) type" in err(f"{path}:raw", f"{path}:float")
    assert "nope" in err(f"{path}:raw", f"{path}:nope")
    assert "--bbox 0,0,0:50,5,5: bbox 0,0,0:50,5,5 is outside the volume" in err(f"{path}:raw", "--bbox", "0,0,0:50,5,5")
    assert "--bbox 0,0: bbox '0,0' must look like" in err(f"{path}:raw", "--bbox", "0,0")
    assert "--port 70000" in err(f"{path}:raw", "--port", "70000")


def test_missing_neuroglancer_is_a_clear_error(vol, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "neuroglancer", None)  # import fails
    assert main(["view", f"{vol[0]}:raw"]) == 2
    assert "install floodfilling[viewer]" in capsys.readouterr().err


def test_command_prints_url_and_stops_on_ctrl_c(vol):
    path = vol[0]
    p = subprocess.Popen([sys.executable, "-m", "floodfilling.cli", "view", f"{path}:raw", f"{path}:seg"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, p.stderr.read() if p.poll() is not None else "")
        assert urllib.request.urlopen(url, timeout=30).status == 200
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
