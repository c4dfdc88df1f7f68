"""Weights metadata, voxel-size matching at inference and polarity TTA (issue 13, item 3).

Random small networks throughout: these tests check behaviour (grids, headers, summaries, exact
polarity invariance, the sidecar's life cycle), not segmentation quality.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from scripts.infer.predict import SlicePredictor
from scripts.infer.resample import match_voxel_size, resample_slices, resampled_size
from scripts.io.volume import open_volume, write_volume
from scripts.io.weights_metadata import WeightsMetadata, metadata_path, write_metadata
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.weights import WeightsError, convert, weights_info

from conftest import REPO, monailabel_module

CONFIGS = REPO / "bundle" / "configs"


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _bundle(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _smooth(shape: tuple[int, int]) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[0]), torch.linspace(0, 1, shape[1]), indexing="ij")
    return (torch.sin(6 * yy) * torch.cos(5 * xx) + 0.5 * yy)[None]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def weights_9_8(weights: Path) -> Path:
    """The random width-4 weights of conftest, with a sidecar saying 9.8 nm."""
    write_metadata(weights, WeightsMetadata(4, 9.8, "reference", "test weights"))
    return weights


# ----------------------------------------------------------------------------- resampling


def test_resampling_round_trip_keeps_the_grid_and_returns_a_smooth_image():
    image = _smooth((48, 60))
    for factor in (2.0, 1.5, 0.5):
        size = resampled_size(image.shape, (factor, factor))
        assert size == (round(48 * factor), round(60 * factor))
        there = resample_slices(image, size)
        back = resample_slices(there, (48, 60))
        assert there.shape == (1, *size) and back.shape == image.shape
        if factor > 1:  # nothing lost on the way: close to itself everywhere, border included
            assert (back - image).abs().max() < 0.03, factor
    # Shrinking is anti-aliased, and a constant slice stays constant up to the border (no false edge).
    flat = resample_slices(torch.ones(1, 64, 72), (30, 33))
    assert torch.allclose(flat, torch.ones_like(flat), atol=1e-6)
    x = torch.randn(2, 40, 56)
    assert torch.equal(resample_slices(-x, (23, 31)), -resample_slices(x, (23, 31)))


def test_voxel_match_decisions():
    twice = match_voxel_size((40.0, 19.6, 19.6), 9.8)
    assert twice.resampled and twice.scale == pytest.approx((2.0, 2.0))
    assert not match_voxel_size((10.5, 10.5, 10.5), 9.8).resampled  # 7 % off: used as it is
    assert match_voxel_size((11.0, 11.0, 11.0), 9.8).resampled  # 12 % off
    off = match_voxel_size((19.6,) * 3, 9.8, enabled=False)
    assert not off.resampled and off.reason == "match_voxel_size is false"
    assert "unknown" in match_voxel_size(None, 9.8).reason
    assert "unknown" in match_voxel_size((19.6,) * 3, None).reason
    assert "check the header" in match_voxel_size((0.2,) * 3, 9.8).reason  # Angstrom taken for nm?
    assert match_voxel_size((20, 25, 19.6), 9.8).scale == pytest.approx((25 / 9.8, 2.0))


def test_prediction_at_a_scale_comes_back_on_the_input_grid():
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=2, outputs="both")
    predictor = SlicePredictor(net, tta=True, max_window=64, weights_voxel_size_nm=9.8)
    slices = np.random.default_rng(0).normal(size=(2, 36, 44)).astype(np.float32)
    plain = predictor.predict(slices)
    scaled = predictor.predict(slices, scale=(2.0, 2.0))  # 72 x 88 through a 64 px window
    for out in (scaled.label, scaled.image, scaled.variance):
        assert out.shape == (2, 36, 44)
    assert not torch.equal(plain.label, scaled.label)  # the network did see another grid


# ----------------------------------------------------------------------------- polarity TTA


@pytest.mark.parametrize("tta", [False, True])
def test_polarity_tta_gives_identical_masks_for_x_and_minus_x(tta: bool):
    torch.manual_seed(1)
    net = DoubleDecoderNet(width=2, outputs="both")
    slices = (np.random.default_rng(1).normal(size=(2, 40, 48)) * 30 + 100).astype(np.float32)
    predictor = SlicePredictor(net, tta=tta, tta_polarity=True, max_window=64)
    pos, neg = predictor.predict(slices), predictor.predict(-slices)
    assert torch.equal(pos.label, neg.label) and torch.equal(pos.label > 0, neg.label > 0)
    assert torch.equal(pos.image, -neg.image)  # the reconstruction follows the input's contrast
    scale = (1.5, 1.5)
    assert torch.equal(predictor.predict(slices, scale).label, predictor.predict(-slices, scale).label)
    plain = SlicePredictor(net, tta=tta, max_window=64)
    assert not torch.equal(plain.predict(slices).label, plain.predict(-slices).label)  # differ without it


# ----------------------------------------------------------------------------- weights metadata


def test_weights_info_reads_the_sidecar_and_ignores_a_stale_one(weights: Path, tmp_path: Path):
    assert weights_info(weights).voxel_size_nm is None  # no sidecar: unknown
    sidecar = write_metadata(weights, WeightsMetadata(4, 19.6, "robust", "random tomograms"))
    assert sidecar == metadata_path(weights) == weights.with_name("w4.pt.json")
    info = weights_info(weights)
    assert (info.width, info.voxel_size_nm, info.recipe) == (4, 19.6, "robust")
    assert info.trained_on == "random tomograms"
    torch.manual_seed(5)
    torch.save(DoubleDecoderNet(width=4).state_dict(), weights)  # other weights, same name
    assert weights_info(weights).voxel_size_nm is None
    # A hand-written sidecar without a SHA-256 is taken as it is; a broken one is named.
    sidecar.write_text(json.dumps({"voxel_size_nm": 25, "recipe": "$eval('1')"}))
    assert weights_info(weights).voxel_size_nm == 25.0 and weights_info(weights).recipe == "$eval('1')"
    sidecar.write_text(json.dumps({"voxel_size_nm": "ten"}))
    with pytest.raises(WeightsError, match=r"w4\.pt\.json.*voxel_size_nm"):
        weights_info(weights)
    sidecar.write_text("{not json")
    with pytest.raises(WeightsError, match=r"w4\.pt\.json"):
        weights_info(weights)


def test_shipped_weights_say_what_training_recorded():
    # Trained on the simulator's `random` instrument (10-40 nm voxels): the median labeled voxel size.
    info = weights_info(REPO / "bundle" / "models" / "model.pt")
    assert (info.width, info.voxel_size_nm, info.recipe) == (8, 28.465, "robust")
    assert "robust_data" in info.trained_on


def test_converted_keras_weights_get_the_papers_voxel_size(fixtures_dir: Path, tmp_path: Path):
    keras = fixtures_dir / "deep_sxt_mf4.h5"
    assert weights_info(keras).voxel_size_nm == 9.8
    out = tmp_path / "published_w4.pt"
    convert(str(keras), str(out))
    info = weights_info(out)
    assert (info.width, info.voxel_size_nm, info.recipe) == (4, 9.8, "published")
    assert json.loads(metadata_path(out).read_text())["weights"] == "published_w4.pt"


# ----------------------------------------------------------------------------- the bundle runner


def _summary(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}_summary.json").read_text())


def test_inference_resamples_to_the_weights_voxel_size_and_keeps_the_input_grid(tmp_path, weights_9_8):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    rng = np.random.default_rng(0)
    coarse = (rng.normal(size=(3, 40, 52)) * 20 + 50).astype(np.float32)
    write_volume(tomograms / "coarse.mrc", coarse, 19.6)  # 2x the weights' 9.8 nm
    write_volume(tomograms / "negative.mrc", -coarse, 19.6)
    write_volume(tomograms / "near.mrc", rng.normal(size=(2, 36, 40)).astype(np.float32), 10.5)  # 7 % off
    common = [
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--dataset_dir",
        str(tomograms),
        "--weights",
        str(weights_9_8),
        "--probability",
        "float16",
        "--reconstruction",
        "true",
        "--tta",
        "true",
        "--tta_polarity",
        "true",
    ]
    out = tmp_path / "out"
    run = _bundle(["inference", *common, "--output_dir", str(out), "--match_voxel_size", "true"])
    assert run.returncode == 0, run.stderr[-3000:]

    for name, shape, voxel in (("coarse", coarse.shape, 19.6), ("near", (2, 36, 40), 10.5)):
        for kind in ("mask", "prob", "recon", "uncertainty"):
            with mrcfile.open(out / f"{name}_{kind}.mrc") as mrc:
                assert mrc.data.shape == shape, (name, kind)
                assert [mrc.voxel_size.x, mrc.voxel_size.z] == pytest.approx([voxel * 10] * 2)
            tif = open_volume(out / f"{name}_{kind}.tif")
            assert tif.shape == shape and tif.voxel_size_nm[1:] == pytest.approx((voxel, voxel)), (name, kind)
    matched = _summary(out, "coarse")["voxel_matching"]
    assert matched["resampled"] is True and matched["scale"] == pytest.approx([2.0, 2.0])
    assert matched["tomogram_voxel_size_nm"] == [19.6, 19.6] and matched["weights_voxel_size_nm"] == 9.8
    near = _summary(out, "near")["voxel_matching"]
    assert near["resampled"] is False and near["scale"] == [1.0, 1.0] and "within 10%" in near["reason"]
    assert _summary(out, "coarse")["tta_polarity"] is True
    # Polarity TTA through the runner: the negative tomogram gets the same mask.
    masks = [open_volume(out / f"{name}_mask.mrc").data for name in ("coarse", "negative")]
    assert np.array_equal(*masks)

    # Switched off: the same tomogram goes through the network as it is.
    (tomograms / "near.mrc").unlink()
    (tomograms / "negative.mrc").unlink()
    off = tmp_path / "off"
    run = _bundle(["inference", *common, "--output_dir", str(off), "--match_voxel_size", "false"])
    assert run.returncode == 0, run.stderr[-3000:]
    unmatched = _summary(off, "coarse")["voxel_matching"]
    assert unmatched["resampled"] is False and unmatched["reason"] == "match_voxel_size is false"
    prob_on, prob_off = (open_volume(d / "coarse_prob.mrc").data for d in (out, off))
    assert prob_on.shape == prob_off.shape and not np.array_equal(prob_on, prob_off)


def test_headerless_tomogram_is_not_resampled_and_the_override_counts(tmp_path, weights_9_8):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    with mrcfile.new(tomograms / "plain.mrc") as mrc:  # voxel size 0: unknown
        mrc.set_data(np.random.default_rng(2).normal(size=(2, 32, 32)).astype(np.float32))
    base = [
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--dataset_dir",
        str(tomograms),
        "--weights",
        str(weights_9_8),
        "--match_voxel_size",
        "true",
    ]
    run = _bundle([*base, "--output_dir", str(tmp_path / "a")])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = _summary(tmp_path / "a", "plain")["voxel_matching"]
    assert summary["resampled"] is False and summary["tomogram_voxel_size_nm"] is None
    log = run.stdout + run.stderr
    assert log.count("slices not resampled: the tomogram's voxel size is unknown") == 1, log[-3000:]
    run = _bundle([*base, "--output_dir", str(tmp_path / "b"), "--voxel_size_nm", "4.9"])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = _summary(tmp_path / "b", "plain")["voxel_matching"]
    assert summary["resampled"] is True and summary["scale"] == pytest.approx([0.5, 0.5])
    assert open_volume(tmp_path / "b" / "plain_mask.mrc").data.shape == (2, 32, 32)


# ----------------------------------------------------------------------------- training and publishing


def test_training_writes_the_sidecar_and_publishing_carries_it(tmp_path: Path):
    """One tiny epoch through the real runner: labeled images at 9.8, 9.8 and 20 nm (median 9.8; the
    mean would be 13.2), an unlabeled one at 30 nm that does not count."""
    data = tmp_path / "cells"
    for sub in ("images", "labels", "unlabeled"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, voxel in (("a", 9.8), ("b", 9.8), ("c", 20.0)):
        write_volume(data / "images" / f"{name}.mrc", rng.normal(size=(3, 64, 64)).astype(np.float32), voxel)
        write_volume(data / "labels" / f"{name}.mrc", (rng.random((3, 64, 64)) > 0.8).astype(np.uint8), voxel)
    write_volume(data / "unlabeled" / "u.mrc", rng.normal(size=(2, 64, 64)).astype(np.float32), 30.0)
    run_dir = tmp_path / "run"
    run = _bundle(
        [
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--dataset_dir",
            str(data),
            "--output_dir",
            str(run_dir),
            "--train#trainer#max_epochs",
            "1",
            "--width",
            "4",
            "--patch_size",
            "64",
            "--num_workers",
            "0",
            "--progress_bar",
            "false",
            "--labeled_repeats",
            "1",
            "--unlabeled_steps_per_epoch",
            "2",
            "--val_fraction",
            "0.34",
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    recipe = json.loads((CONFIGS / "train.json").read_text()).get("recipe", "reference")
    for name in ("model.pt", "last.pt"):
        info = weights_info(run_dir / name)  # the sidecar's SHA-256 matches the final file
        assert (info.width, info.voxel_size_nm, info.recipe) == (4, 9.8, recipe), name
        assert "3 labeled and 1 unlabeled" in info.trained_on
        sidecar = json.loads(metadata_path(run_dir / name).read_text())
        assert sidecar["dataset"] == "cells"
        # train.json hands the network to the writer (tests/test_ood.py); last.pt, rewritten every
        # epoch, is not measured
        assert (sidecar["ood_level"] > 0) if name == "model.pt" else sidecar["ood_level"] is None

    weights_module = monailabel_module("weights")
    target = tmp_path / "models" / "model.pt"
    assert weights_module.publish_weights(run_dir, target) == run_dir / "model.pt"
    assert weights_info(target).voxel_size_nm == 9.8  # re-hashed for the published copy
    assert sorted(p.name for p in target.parent.glob("*.pt")) == ["model.pt"]  # the sidecar is not listed
    metadata_path(run_dir / "model.pt").unlink()  # a run without metadata: no stale sidecar published
    weights_module.publish_weights(run_dir, target)
    assert not metadata_path(target).exists()


def test_monailabel_accepts_tta_polarity_and_copies_the_sidecar(tmp_path: Path):
    options = monailabel_module("request_options")
    typed = options.parse_options({"tta_polarity": "true"}, options.SEGMENTATION_OPTIONS)
    assert typed == {"tta_polarity": True}
    with pytest.raises(options.OptionError, match="tta_polarity"):
        options.parse_options({"tta_polarity": "$x"}, options.SEGMENTATION_OPTIONS)
    bundle_copy = monailabel_module("bundle_copy")
    source = tmp_path / "bundle"
    for name, text in (
        ("configs/metadata.json", '{"name": "demo"}'),
        ("configs/inference.json", "{}"),
        ("scripts/__init__.py", ""),
        ("models/model.pt", "w"),
        ("models/model.pt.json", "{}"),
    ):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    dest = bundle_copy.prepare_working_bundle(source, tmp_path / "app")
    assert (dest / "models" / "model.pt.json").read_text() == "{}"
