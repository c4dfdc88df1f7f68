"""The out-of-distribution score from the image decoder (issue 14, item 3): slice choice, the error's
form, the training level in the weights' sidecar, inference's summaries and warning, calibration."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from scripts.infer.ood import (
    OOD_RATIO,
    ReconstructionScorer,
    ood_warning,
    pick_slices,
    reconstruction_error,
)
from scripts.io.volume import write_volume
from scripts.io.weights_metadata import (
    MetadataError,
    WeightsMetadata,
    metadata_path,
    read_metadata,
    write_metadata,
)
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.weights import load_weights
from scripts.train.losses import UnlabeledLoss
from scripts.train.metadata import WeightsMetadataWriter
from torch import nn

from conftest import REPO

CONFIG = REPO / "bundle" / "configs" / "inference.json"
SHIPPED = REPO / "bundle" / "models" / "model.pt"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _volume(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- the measure


def test_pick_slices_spreads_over_the_range_and_skips_the_outer_tenth():
    assert pick_slices(100, 0, 100) == [15, 25, 35, 45, 55, 65, 75, 85]
    # [10, 40): 3 slices left out at each end, 3 spread over [13, 37)
    assert pick_slices(50, 10, 40, count=3) == [17, 25, 33]
    assert pick_slices(5, 0, 5) == [0, 1, 2, 3, 4]  # fewer than count: all
    assert pick_slices(20, 0, 200, count=4) == [4, 8, 12, 16]  # the range is clipped to the depth
    assert pick_slices(10, 0, 10, count=0) == []


class _Identity(nn.Module):
    """A 'network' whose reconstruction is perfect."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def test_reconstruction_error_is_the_unlabeled_loss_on_standardised_slices():
    from skimage.metrics import structural_similarity

    slices = _volume(0, (2, 40, 56)) * 30 + 500  # raw units: the error must not depend on them
    original = slices.copy()
    assert reconstruction_error(_Identity(), slices) == pytest.approx([0, 0], abs=1e-5)
    np.testing.assert_array_equal(slices, original)  # the caller's slices are left as they were

    class Blurred(_Identity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x + 0.3 * torch.roll(x, 1, -1)

    # An independent SSIM (scikit-image, same Gaussian window and constants), each slice's own range.
    x = (slices - slices.mean(axis=(1, 2), keepdims=True)) / slices.std(axis=(1, 2), keepdims=True)
    y = 0.5 * x + 0.3 * np.roll(x, 1, -1)
    expected = []
    for xi, yi in zip(x, y, strict=True):
        ssim = structural_similarity(
            xi, yi, data_range=float(xi.max() - xi.min()), gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        huber = torch.nn.functional.huber_loss(torch.as_tensor(yi), torch.as_tensor(xi), delta=0.1)
        expected.append(0.5 * (1 - ssim) + 0.5 * float(huber))
    assert reconstruction_error(Blurred(), slices) == pytest.approx(expected, abs=1e-5)
    # ... and training's unlabeled loss with the same range says the same.
    loss = [
        float(
            UnlabeledLoss(data_range=float(xi.max() - xi.min()))(
                torch.as_tensor(yi)[None, None], torch.as_tensor(xi)[None, None]
            )
        )
        for xi, yi in zip(x, y, strict=True)
    ]
    assert loss == pytest.approx(expected, abs=1e-5)


def test_scorer_on_a_random_network_gives_finite_scores_and_their_median(weights: Path):
    scorer = ReconstructionScorer(weights, slices=5)
    volume = _volume(1, (30, 40, 56))
    result = scorer.score(volume, 0, 30)
    assert result["slices"] == pick_slices(30, 0, 30, 5)
    assert len(result["per_slice"]) == 5 and all(math.isfinite(e) and e > 0 for e in result["per_slice"])
    assert result["score"] == pytest.approx(float(np.median(result["per_slice"])), abs=1e-6)
    assert (result["training_level"], result["ratio"], result["flagged"]) == (None, None, False)
    # The same slices through a plain two-decoder network (the scorer's is fused, image-only).
    net = load_weights(DoubleDecoderNet(width=4), weights).train()
    plain = reconstruction_error(net, volume[result["slices"]])
    assert plain == pytest.approx(result["per_slice"], abs=1e-4)
    assert net.training and net.outputs == "both"  # its mode and outputs are given back
    assert not ReconstructionScorer(weights, slices=0).enabled  # 0: off, nothing loaded


def test_flag_compares_with_the_level_in_the_sidecar(weights: Path):
    volume = _volume(2, (12, 40, 40))
    write_metadata(weights, WeightsMetadata(width=4, ood_level=1e-4))
    low = ReconstructionScorer(weights, slices=3).score(volume, 0, 12)
    assert low["training_level"] == 1e-4 and low["ratio"] > OOD_RATIO and low["flagged"]
    assert ood_warning("cell.mrc", low).startswith("cell.mrc: reconstruction error ")
    write_metadata(weights, WeightsMetadata(width=4, ood_level=100.0))
    high = ReconstructionScorer(weights, slices=3).score(volume, 0, 12)
    assert high["ratio"] < 1 and not high["flagged"]


# ----------------------------------------------------------------------------- the sidecar


def test_sidecar_round_trips_ood_level_and_refuses_a_bad_one(weights: Path):
    write_metadata(weights, WeightsMetadata(width=4, voxel_size_nm=9.8, ood_level=0.25))
    assert read_metadata(weights).ood_level == 0.25
    sidecar = metadata_path(weights)
    content = json.loads(sidecar.read_text())
    for bad in (-0.5, 0, "high", True, float("nan")):
        sidecar.write_text(json.dumps({**content, "ood_level": bad}))
        with pytest.raises(MetadataError, match="'ood_level' must be a positive number or null"):
            read_metadata(weights)
    sidecar.write_text(json.dumps({**content, "ood_level": None}))
    assert read_metadata(weights).ood_level is None


def _training_data(root: Path) -> dict:
    rng = np.random.default_rng(5)
    for name, depth in (("a", 6), ("u", 20)):
        write_volume(root / f"{name}.mrc", rng.normal(size=(depth, 48, 48)).astype(np.float32), 9.8)
    return {
        "train": [{"image": str(root / "a.mrc"), "label": "unused", "z": z} for z in range(6)],
        "val": [],
        "unlabeled": [{"image": str(root / "u.mrc"), "z": z} for z in range(20)],
    }


def test_training_writer_stores_the_level_of_the_saved_network(tmp_path: Path):
    data = _training_data(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=4).train()
    writer = WeightsMetadataWriter(run, data, tmp_path, width=4, network=net, filenames=("model.pt",))
    torch.save(net.state_dict(), run / "model.pt")  # saved by the run, after the writer was built
    writer()
    sample = writer.ood_sample()
    assert len(sample) == 16 and sample == sorted(set(sample))
    assert all(2 <= z < 18 for image, z in sample if image.endswith("u.mrc"))  # outer 10 % left out
    saved = load_weights(DoubleDecoderNet(width=4), run / "model.pt")
    slices = [mrcfile.read(image)[z] for image, z in sample]
    expected = float(np.median(np.concatenate([reconstruction_error(saved, s[None]) for s in slices])))
    level = read_metadata(run / "model.pt").ood_level
    assert level == pytest.approx(expected, rel=1e-4)
    assert net.training  # training goes on in train mode

    with torch.no_grad():  # the network changes and is saved again: a new level
        for weight in net.image_head.parameters():
            weight.mul_(3.0)
    torch.save(net.state_dict(), run / "model.pt")
    writer()
    assert read_metadata(run / "model.pt").ood_level != pytest.approx(level, rel=1e-3)

    # A resumed run: a checkpoint from before keeps its own level until this run saves it again.
    resumed = WeightsMetadataWriter(
        run, data, tmp_path, width=4, network=DoubleDecoderNet(width=4), filenames=("model.pt",)
    )
    before = read_metadata(run / "model.pt").ood_level
    resumed()
    assert read_metadata(run / "model.pt").ood_level == before


# ----------------------------------------------------------------------------- inference


def _infer(tomograms: Path, out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        str(CONFIG),
        "--dataset_dir",
        str(tomograms),
        "--output_dir",
        str(out),
        "--weights",
        str(weights),
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_inference_reports_the_score_warns_and_leaves_masks_alone(tmp_path: Path, weights: Path):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    write_volume(tomograms / "cell.mrc", _volume(3, (12, 40, 56)), 9.8)
    write_volume(tomograms / "tiny.mrc", _volume(4, (3, 8, 8)), 9.8)  # too small to score
    write_metadata(weights, WeightsMetadata(width=4, ood_level=1e-4))  # a level no tomogram comes near

    on = _infer(tomograms, tmp_path / "on", weights, "--ood_slices", "4")
    assert on.returncode == 0, on.stderr[-3000:]
    ood = json.loads((tmp_path / "on" / "cell_summary.json").read_text())["ood"]
    assert len(ood["slices"]) == 4 and len(ood["per_slice"]) == 4 and ood["seconds"] >= 0
    assert ood["score"] == pytest.approx(float(np.median(ood["per_slice"])), abs=1e-6)
    assert ood["training_level"] == 1e-4 and ood["flagged"]
    assert ood["ratio"] == pytest.approx(ood["score"] / 1e-4, rel=1e-3)
    log = (on.stdout + on.stderr).splitlines()
    warning = [line for line in log if "looks unlike the training data" in line]
    assert len(warning) == 1 and "cell.mrc: reconstruction error" in warning[0]
    assert "python -m monai.bundle run adapting" in warning[0]
    tiny = json.loads((tmp_path / "on" / "tiny_summary.json").read_text())["ood"]
    assert tiny["score"] is None and not tiny["flagged"]
    with open(tmp_path / "on" / "summary.csv", newline="") as handle:
        rows = {row["tomogram"]: row for row in csv.DictReader(handle)}
    assert float(rows["cell.mrc"]["ood_score"]) == pytest.approx(ood["score"])
    assert float(rows["cell.mrc"]["ood_ratio"]) == pytest.approx(ood["ratio"])
    assert rows["tiny.mrc"]["ood_score"] == rows["tiny.mrc"]["ood_ratio"] == ""

    off = _infer(tomograms, tmp_path / "off", weights, "--ood_slices", "0")
    assert off.returncode == 0, off.stderr[-3000:]
    assert "ood" not in json.loads((tmp_path / "off" / "cell_summary.json").read_text())
    assert "looks unlike" not in off.stdout + off.stderr
    for name in ("cell", "tiny"):
        np.testing.assert_array_equal(
            mrcfile.read(tmp_path / "on" / f"{name}_mask.mrc"), mrcfile.read(tmp_path / "off" / f"{name}_mask.mrc")
        )


# ----------------------------------------------------------------------------- calibration


def _calibrate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scripts.infer.ood", "calibrate", *args]
    return subprocess.run(cmd, cwd=REPO / "bundle", env=_env(), capture_output=True, text=True, timeout=300)


def test_calibrate_writes_the_level_and_keeps_the_other_fields(tmp_path: Path, weights: Path):
    data = tmp_path / "data"
    for sub, name, seed in (("images", "a", 6), ("unlabeled", "b", 7), ("unlabeled", "c", 8)):
        (data / sub).mkdir(parents=True, exist_ok=True)
        write_volume(data / sub / f"{name}.mrc", _volume(seed, (10, 40, 40)) * (seed - 5), 9.8)
    write_metadata(weights, WeightsMetadata(4, 9.8, "robust", "three cells", "cells", "2026-01-02"))
    result = _calibrate(str(weights), str(data), "--slices", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = read_metadata(weights)
    assert dataclasses.replace(meta, ood_level=None) == WeightsMetadata(
        4, 9.8, "robust", "three cells", "cells", "2026-01-02"
    )
    scorer = ReconstructionScorer(weights, slices=3)
    scores = [scorer.score(mrcfile.read(p), 0, 10)["score"] for p in sorted(data.glob("*/*.mrc"))]
    assert meta.ood_level == pytest.approx(float(np.median(scores)), rel=1e-5)


def test_calibrate_on_a_missing_folder_fails_with_one_clear_line(tmp_path: Path, weights: Path):
    write_metadata(weights, WeightsMetadata(width=4, ood_level=0.3))
    before = metadata_path(weights).read_text()
    result = _calibrate(str(weights), str(tmp_path / "nowhere"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ERROR: {tmp_path / 'nowhere'}: folder does not exist", last
    assert "Traceback" not in result.stderr
    assert metadata_path(weights).read_text() == before


# ----------------------------------------------------------------------------- shipped weights


def test_inverted_blurred_tomogram_scores_above_in_domain_ones_with_the_shipped_weights():
    from cryosxt_sim.instruments import INSTRUMENTS
    from cryosxt_sim.simulate import simulate_tomogram

    scorer = ReconstructionScorer(SHIPPED)
    unlike = dataclasses.replace(INSTRUMENTS["bessy"], name="inverted-blurred", polarity=-1, psf_fwhm_nm=80.0)
    for seed in (0, 1):
        in_domain = scorer.score(simulate_tomogram((16, 128, 128), "bessy", seed=seed).image, 0, 16)
        shifted = scorer.score(simulate_tomogram((16, 128, 128), unlike, seed=seed).image, 0, 16)
        assert shifted["score"] > in_domain["score"], (seed, shifted["score"], in_domain["score"])
