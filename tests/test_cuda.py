"""The GPU path: fused network, AMP and batched slices on CUDA, and the bundle command on a GPU.

Skipped (with the reason) on machines without CUDA, which includes CI; run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import torch
from scripts.infer.predict import SlicePredictor
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import fuse_for_inference
from scripts.network.weights import load_weights

from conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHIPPED = REPO / "bundle" / "models" / "model.pt"


def _simulated_slices(tmp_path, count=4, shape=(16, 256, 256)):
    from cryosxt_sim.simulate import simulate_tomogram

    return simulate_tomogram(shape, "bessy", seed=31).image[6 : 6 + count].astype(np.float32)


def _shipped(outputs="label"):
    return load_weights(DoubleDecoderNet(width=8, outputs=outputs), SHIPPED).eval()


def test_fused_network_on_cuda_matches_the_eager_network():
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=4, outputs="both").cuda().eval()
    fused = fuse_for_inference(net)
    x = torch.randn(2, 1, 100, 132, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.backends.cudnn.allow_tf32 = False  # compare in true float32
        try:
            (label, image), (label_f, image_f) = net(x), fused(x)
        finally:
            torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(label_f, label, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(image_f, image, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("amp", ["float16", "bfloat16"])
def test_amp_masks_agree_with_float32_on_a_real_slice(tmp_path, amp):
    slices = _simulated_slices(tmp_path)
    net = _shipped()
    reference = SlicePredictor(net, device="cuda").predict(slices).label
    cpu = SlicePredictor(net).predict(slices).label
    low = SlicePredictor(net, device="cuda", amp=amp).predict(slices).label
    assert reference.device.type == low.device.type == "cpu" and low.dtype == torch.float32
    assert ((reference > 0) == (cpu > 0)).double().mean() > 0.9999  # the GPU gives the CPU's masks
    assert ((low > 0) == (reference > 0)).double().mean() >= 0.995


def test_slices_share_forward_passes_on_the_gpu(tmp_path):
    slices = _simulated_slices(tmp_path)
    predictor = SlicePredictor(_shipped(), device="cuda", amp="float16")
    plan = predictor.memory_plan(slices.shape[1:], len(slices))
    assert plan.slices_per_pass == len(slices) and not plan.tiles  # a GPU has room for 4 small slices
    one_by_one = torch.cat([predictor.predict(s[None]).label for s in slices])
    batched = predictor.predict(slices).label
    assert ((one_by_one > 0) == (batched > 0)).double().mean() > 0.999


def test_compiled_network_gives_the_same_masks(tmp_path):
    slices = _simulated_slices(tmp_path, count=2)
    plain = SlicePredictor(_shipped(), device="cuda").predict(slices).label
    compiled = SlicePredictor(_shipped(), device="cuda", compile=True).predict(slices).label
    assert ((plain > 0) == (compiled > 0)).double().mean() > 0.999


def test_bundle_inference_runs_on_the_gpu(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    with mrcfile.new(data / "t.mrc") as mrc:
        mrc.set_data(_simulated_slices(tmp_path, count=6))
        mrc.voxel_size = 284.65
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", str(REPO / "bundle" / "configs" / "inference.json"),
        "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--amp", "float16",
        "--batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "t_summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert "memory plan for" in result.stdout + result.stderr  # the bundle logs to stdout
    with mrcfile.open(tmp_path / "out" / "t_mask.mrc") as mask:
        assert mask.data.shape == (6, 256, 256) and 0.01 < mask.data.mean() < 0.6
