"""TorchScript (MONAI ckpt_export) and ONNX exports give the eager network's masks."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.export import export_onnx

from conftest import REPO


@pytest.fixture
def trained_like(tmp_path):
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=4, outputs="label").eval()
    path = tmp_path / "w4.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _slice() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 48, 80)).astype(np.float32))


def test_ckpt_export_torchscript_matches_eager(tmp_path, trained_like):
    net, weights = trained_like
    ts_file = tmp_path / "model.ts"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_file),
         "--ckpt_file", str(weights), "--key_in_ckpt", "", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--width", "4"],
        cwd=REPO / "bundle", check=True, capture_output=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(ts_file))
    x = _slice()
    odd = x[..., :45, :77]  # scripting keeps the network's own padding for any size
    with torch.no_grad():
        for inp in (x, odd):
            eager, exported = net(inp), scripted(inp)
            assert torch.equal(exported > 0, eager > 0)
            assert (exported - eager).abs().max() < 1e-5


def test_onnx_export_matches_eager(tmp_path, trained_like):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the test extra")
    net, weights = trained_like
    onnx_file = export_onnx(weights, tmp_path / "model.onnx", width=4)
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = torch.cat([_slice(), -_slice()])
    (exported,) = session.run(None, {"image_in": x.numpy()})
    with torch.no_grad():
        eager = net(x).numpy()
    assert exported.shape == eager.shape
    assert np.array_equal(exported > 0, eager > 0)
    assert np.abs(exported - eager).max() < 1e-4
