import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.keras import KerasWeightsError, load_keras_weights
from scripts.network.weights import convert, weights_info

from conftest import REPO


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    ("width", "weights"),
    [(4, "deep_sxt_mf4.h5"), (4, "deep_sxt_mf4_h5py2attrs.h5"), (8, "deep_sxt_mf8.h5")],
)
def test_converted_network_reproduces_reference_outputs(fixtures_dir, width, weights):
    net = load_keras_weights(DoubleDecoderNet(width=width), fixtures_dir / weights).eval()
    reference = np.load(fixtures_dir / f"deep_sxt_mf{width}_io.npz")
    for case in ("1", "2"):
        with torch.no_grad():
            label, image = net(_nchw(reference["x" + case]))
        label_diff = np.abs(_nhwc(label) - reference["lbl" + case]).max()
        image_diff = np.abs(_nhwc(image) - reference["img" + case]).max()
        print(f"{weights} x{case}: label max diff {label_diff:.2e}, image max diff {image_diff:.2e}")
        assert label_diff < 1e-5
        assert image_diff < 1e-4


def test_intermediate_tensors_match(fixtures_dir):
    """Encoder, skips, neck branches and decoder outputs each equal the reference."""
    net = load_keras_weights(DoubleDecoderNet(width=4), fixtures_dir / "deep_sxt_mf4.h5").eval()
    ref = np.load(fixtures_dir / "deep_sxt_mf4_intermediates_x1.npz")
    x = _nchw(np.load(fixtures_dir / "deep_sxt_mf4_io.npz")["x1"])
    with torch.no_grad():
        bottom, skips = net.encoder(x)
        branches = [branch(bottom) for branch in net.neck.branches]
        neck = torch.cat(branches, dim=1)
        got = {
            "enc_out": bottom,
            **{f"skip{i}": s for i, s in enumerate(skips[::-1])},
            **{f"neck{i}": b for i, b in enumerate(branches)},
            "neck_cat": neck,
            "dec_img": net.image_decoder(neck),
            "dec_lbl": net.label_decoder(neck, skips[::-1]),
        }
    for name, tensor in got.items():
        np.testing.assert_allclose(_nhwc(tensor), ref[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_width_mismatch_fails_cleanly(fixtures_dir):
    net = DoubleDecoderNet(width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(KerasWeightsError, match="deep_sxt_mf4.h5.*width"):
        load_keras_weights(net, fixtures_dir / "deep_sxt_mf4.h5")
    # The failure is detected on the first tensor, before anything is overwritten.
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_foreign_files_are_refused(tmp_path):
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("hello")
    with pytest.raises(KerasWeightsError, match="notes.h5.*not an HDF5"):
        load_keras_weights(DoubleDecoderNet(width=4), not_hdf5)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["layer_names"] = ["dense"]
        f.create_group("dense").attrs["weight_names"] = ["dense/kernel:0"]
        f["dense/kernel:0"] = np.zeros((2, 2))
    with pytest.raises(KerasWeightsError, match="other.h5.*do not match"):
        load_keras_weights(DoubleDecoderNet(width=4), other)
    with pytest.raises(KerasWeightsError, match="missing.h5.*no such file"):
        load_keras_weights(DoubleDecoderNet(width=4), tmp_path / "missing.h5")


def test_infer_width(fixtures_dir):
    assert weights_info(fixtures_dir / "deep_sxt_mf4.h5").width == 4
    assert weights_info(fixtures_dir / "deep_sxt_mf8.h5").width == 8


def test_cli_writes_a_loadable_state_dict(fixtures_dir, tmp_path):
    out = tmp_path / "model.pt"
    subprocess.run(
        [sys.executable, "-m", "scripts.network.weights", str(fixtures_dir / "deep_sxt_mf8.h5"), str(out)],
        cwd=REPO / "bundle",
        check=True,
    )
    net = DoubleDecoderNet(width=8)
    net.load_state_dict(torch.load(out, weights_only=True))
    reference = load_keras_weights(DoubleDecoderNet(width=8), fixtures_dir / "deep_sxt_mf8.h5")
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in net.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]  # + metadata sidecar


def test_cli_reports_wrong_width(fixtures_dir, tmp_path):
    out = tmp_path / "model.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.network.weights",
            str(fixtures_dir / "deep_sxt_mf4.h5"),
            str(out),
            "--width",
            "8",
        ],
        cwd=REPO / "bundle",
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "deep_sxt_mf4.h5" in result.stderr and "width" in result.stderr
    assert not out.exists()
    convert(str(fixtures_dir / "deep_sxt_mf4.h5"), str(out))
    assert out.exists()
