import json

import numpy as np
import pytest
import torch

from floodfilling.model import ConvStack3D, ModelError, load_model, save_model, select_device


@pytest.mark.device
def test_golden_forward(shared_dir, bundled_device, test_device):
    """The port reproduces TensorFlow's float32 forward passes of the reference model (on the
    device lane's device: on a GPU with TF32 off, fp32 convolutions agree to ~1e-5)."""
    net, info = bundled_device
    g = np.load(shared_dir / "reference" / "fib25_forward_golden.npz")
    image = torch.from_numpy(g["image"][:, None]).to(test_device)
    seed = torch.from_numpy(g["seed_logits"][:, None]).to(test_device)
    with torch.inference_mode():
        out = net(image, seed)
    err = np.abs(out.cpu().numpy()[:, 0] - g["output_logits"]).max()
    assert err <= 1e-4, err
    # channels-last (the inference layout) gives the same answer
    cl = net.to(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        out2 = cl(image[:1].contiguous(memory_format=torch.channels_last_3d),
                  seed[:1].contiguous(memory_format=torch.channels_last_3d))
    assert np.abs(out2.cpu().numpy()[0, 0] - g["output_logits"][0]).max() <= 1e-4


def test_bundled_model_info(bundled):
    net, info = bundled
    assert info.fov_zyx == (33, 33, 33) and info.deltas_zyx == (8, 8, 8)
    assert (info.image_mean, info.image_std) == (128.0, 33.0)
    assert sum(p.numel() for p in net.parameters()) == 638433


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = ConvStack3D(depth=2, features=4)
    p = tmp_path / "m.npz"
    save_model(p, net, {"fov_zyx": [9, 9, 9], "deltas_zyx": [2, 2, 2], "intensity": {"mean": 100.0, "std": 20.0}})
    net2, info = load_model(p)
    assert info.depth == 2 and info.fov_zyx == (9, 9, 9) and info.image_mean == 100.0
    x = torch.randn(1, 1, 9, 9, 9)
    with torch.inference_mode():
        assert torch.equal(net.eval()(x, x), net2(x, x))


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="bad.npz"):
        load_model(bad)
    # weights of the wrong shape
    net = ConvStack3D(depth=2, features=4)
    arrays = net.reference_arrays()
    arrays["conv0_a/weights"] = arrays["conv0_a/weights"][..., :2]
    arrays["__meta__"] = np.frombuffer(json.dumps({"depth": 2, "features": 4}).encode(), np.uint8)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ModelError, match="conv0_a/weights"):
        load_model(tmp_path / "shape.npz")
    arrays = net.reference_arrays()
    arrays["__meta__"] = np.frombuffer(json.dumps({"model": "resnet"}).encode(), np.uint8)
    np.savez(tmp_path / "arch.npz", **arrays)
    with pytest.raises(ModelError, match="unsupported architecture"):
        load_model(tmp_path / "arch.npz")


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "xpu")
    with pytest.raises(ValueError, match="^device='tpu': expected auto"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            select_device("cuda")


def test_model_from_a_training_run_directory(tmp_path):
    """``--model RUN/`` (what ``ffn train --out RUN`` wrote) loads RUN/checkpoint/model.npz;
    a directory holding neither that nor model.npz is an error naming both."""
    net = ConvStack3D(depth=1, features=4)
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    save_model(tmp_path / "run" / "checkpoint" / "model.npz", net, {"fov_zyx": [9, 9, 9], "deltas_zyx": [2, 2, 2]})
    loaded, info = load_model(tmp_path / "run")
    assert info.fov_zyx == (9, 9, 9) and info.source.endswith("checkpoint/model.npz")
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model.npz.*checkpoint/model.npz"):
        load_model(tmp_path / "empty")
