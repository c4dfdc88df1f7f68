"""BioImage Model Zoo export: the shipped weights pass bioimageio's own test, the package says what
the bundle knows (nm, halo, preprocessing), and a bioimage.io consumer gives the bundle's masks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from bioimageio.core import create_prediction_pipeline
from bioimageio.core.digest_spec import create_sample_for_model
from bioimageio.spec import load_model_description
from scripts.infer.predict import SlicePredictor
from scripts.io.volume import VolumeError, write_volume
from scripts.network.bioimageio import DOI, HALO, export_bioimageio
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.weights import load_weights, weights_info

from conftest import REPO
from cryosxt_sim.simulate import get_instrument, simulate_tomogram

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUNDLE = REPO / "bundle"
SHIPPED = BUNDLE / "models" / "model.pt"
FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
# One thread per process: the machine is shared; the simulator comes from the repository root.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(BUNDLE)])}


def _export_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.network.bioimageio", *args], cwd=BUNDLE, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The shipped weights exported through the command line."""
    out = tmp_path_factory.mktemp("zoo") / "cryosxt"
    run = _export_command(str(SHIPPED), str(out))
    assert run.returncode == 0, run.stderr
    return out


@pytest.mark.slow  # the export (~15 s) and bioimageio's test of three weights formats (~40 s)
def test_bioimageio_test_passes(package, tmp_path):
    summary = tmp_path / "summary.json"
    run = _bioimageio_test(package / "rdf.yaml", summary)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(summary.read_text())
    assert report["status"] == "passed"
    details = {d["name"]: d["status"] for d in report["details"]}
    for fmt in FORMATS:  # every weights format reproduced the test output and ran at three sizes
        assert details[f"Reproduce test outputs from test inputs ({fmt})"] == "passed"
        largest = f"Run {fmt} inference for inputs with batch_size: 2 and size parameter n: 2"
        assert details[largest] == "passed"


@pytest.mark.slow
def test_package_describes_the_bundle(package):
    model = load_model_description(package / "rdf.yaml")
    assert model.format_version.startswith("0.5")
    voxel = weights_info(SHIPPED).voxel_size_nm
    (raw,), (out,) = model.inputs, model.outputs
    assert [str(a.id) for a in raw.axes] == ["batch", "channel", "y", "x"]
    for axis in [*raw.axes[2:], *out.axes[2:]]:  # whole picometres (see scripts.network.bioimageio)
        assert (axis.unit, axis.scale) == ("picometer", round(voxel * 1000))
    assert [(a.size.min, a.size.step) for a in raw.axes[2:]] == [(208, 16)] * 2  # > 2 halos, in steps of 16
    assert [a.halo for a in out.axes[2:]] == [HALO] * 2
    (prep,) = raw.preprocessing[1:-1]  # between the dtype steps bioimageio adds
    assert prep.id == "zero_mean_unit_variance"
    assert [str(a) for a in prep.kwargs.axes] == ["channel", "y", "x"]  # per sample
    assert tuple(out.data.range) == (-1.0, 1.0)
    assert [str(c.doi) for c in model.cite] == [DOI]
    assert str(model.license) == "MIT"
    assert {"cryo-SXT", "membrane", "semi-supervised", "soft X-ray tomography"} <= set(model.tags)
    assert {fmt for fmt, entry in model.weights if entry is not None} == set(FORMATS)
    # The architecture is the bundle's own file, copied by the packager.
    arch = model.weights.pytorch_state_dict.architecture
    architecture = (BUNDLE / "scripts" / "network" / "double_decoder.py").read_bytes()
    assert (package / arch.source.path).read_bytes() == architecture
    assert (package / "LICENSE").read_bytes() == (BUNDLE / "LICENSE").read_bytes()
    assert "Threshold at 0" in (package / "README.md").read_text()
    cover = iio.imread(package / "cover.png")
    test_input = np.load(package / "test_input.npy")
    assert cover.shape == (test_input.shape[2], 2 * test_input.shape[3])  # slice | mask


@pytest.fixture(scope="module")
def real_slice() -> np.ndarray:
    """A simulated slice other than the package's test input: another cell, not square."""
    instrument = get_instrument("bessy", voxel_size_nm=weights_info(SHIPPED).voxel_size_nm, tilt_step_deg=3.0,
                                iterations=10)  # fmt: skip
    tomogram = simulate_tomogram((8, 240, 288), instrument, seed=1)
    return tomogram.image[4]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_consumer_gives_the_bundle_prediction(package, real_slice, fmt):
    model = load_model_description(package / "rdf.yaml")
    net = load_weights(DoubleDecoderNet(width=weights_info(SHIPPED).width, outputs="label"), SHIPPED)
    bundle = SlicePredictor(net)
    with create_prediction_pipeline(model, weights_format=fmt) as pipeline:
        # units 1/um as simulated (std ~0.13), and 1000x larger as in integer-stored tomograms
        for factor, tolerance in ((1.0, 5e-4), (1000.0, 1e-4)):
            image = real_slice * np.float32(factor)
            sample = create_sample_for_model(model, inputs={"raw": image[None, None]}, sample_id="slice")
            # The whole slice at once, as the bundle runs slices up to 2048 pixels: no halo padding.
            result = pipeline.predict_sample_without_blocking(sample, skip_input_padding=True,
                                                              skip_output_cropping=True)  # fmt: skip
            label = result.members["membrane"].data.values[0, 0]
            expected = bundle.predict(image[None]).label[0].numpy()
            assert label.shape == expected.shape == real_slice.shape
            # The spec adds eps = 1e-6 to the standard deviation, the bundle does not: its effect,
            # relative eps / std, is the only difference above float32 rounding.
            assert np.abs(label - expected).max() < tolerance
            assert np.array_equal(label > 0, expected > 0)
            assert 0.01 < (label > 0).mean() < 0.5  # membranes were found: not a trivial agreement


def _bioimageio_test(rdf: Path, summary: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bioimageio.core", "test", str(rdf), "--summary", str(summary), *options]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # an export (~15 s) and one weights format's bioimageio test (~5 s)
def test_published_keras_weights_at_9_8_nm(tmp_path):
    """The paper's Keras layout (here random width-8 weights) at the published 9.8 nm, with the test
    slice from a tomogram file: 240 * 9.8 / 9.8 floors to 239 in bioimageio.spec unless the scale is a
    whole number."""
    tomogram = simulate_tomogram((8, 224, 240), get_instrument("bessy", tilt_step_deg=3.0, iterations=10))
    sample = write_volume(tmp_path / "cell.mrc", tomogram.image, tomogram.voxel_size_nm)
    keras = REPO / "tests" / "data" / "deep_sxt" / "deep_sxt_mf8.h5"
    rdf = Path(export_bioimageio(keras, tmp_path / "pkg", sample=sample))
    model = load_model_description(rdf)
    assert [(a.unit, a.scale) for a in model.inputs[0].axes[2:]] == [("picometer", 9800)] * 2
    assert np.load(rdf.parent / "test_input.npy").shape == (1, 1, 224, 224)  # the centre of the middle slice
    run = _bioimageio_test(rdf, tmp_path / "summary.json", "--weight-format", "pytorch_state_dict")
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("kind", ["missing", "foreign", "sidecar"])
def test_bad_weights_end_on_one_error_line(tmp_path, kind):
    weights = tmp_path / "w.pt"
    if kind == "foreign":  # a state dict of another network
        torch.save({"conv.weight": torch.zeros(4, 1, 3, 3)}, weights)
    elif kind == "sidecar":  # the sidecar describes another width than the file holds
        weights.write_bytes(SHIPPED.read_bytes())
        meta = json.loads(Path(f"{SHIPPED}.json").read_text())
        Path(f"{weights}.json").write_text(json.dumps({**meta, "width": 16}))
    out = tmp_path / "package"
    run = _export_command(str(weights), str(out))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and str(weights) in last, run.stderr
    assert not out.exists()


def test_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OSError, match=f"{out}: folder is not empty"):
        export_bioimageio(SHIPPED, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_sample_too_small_for_the_model(tmp_path):
    small = write_volume(tmp_path / "small.mrc", np.zeros((4, 128, 300), np.float32), 28.465)
    out = tmp_path / "package"
    with pytest.raises(VolumeError, match=f"{small}: its slices .* smaller than the model's minimum input"):
        export_bioimageio(SHIPPED, out, sample=small)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["small.mrc"]
