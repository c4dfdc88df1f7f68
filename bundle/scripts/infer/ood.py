"""Out-of-distribution score: how badly the image decoder reconstructs a tomogram's slices.

Why: the image decoder was trained (unlabeled loss) to reconstruct standardised slices of the
training data. A tomogram unlike that data (another microscope: inverted contrast, coarser blur)
reconstructs worse, and its masks deserve less trust. The score is the unlabeled loss itself,
``0.5 * (1 - SSIM) + 0.5 * Huber_0.1`` (``scripts.reconstruction``, shared with training), per slice
on a few slices, its median per tomogram. The
level measured on the training data is stored with the weights (sidecar ``ood_level``, written by
training or by ``calibrate``); a score above ``OOD_RATIO`` times that level flags the tomogram.

SSIM's ``data_range`` is max - min of each standardised slice itself, so the score does not depend
on the dataset a ``data_range`` was measured on and scores compare across tomograms.

CLI (from ``bundle/``): ``python -m scripts.infer.ood calibrate WEIGHTS DATA_DIR [--slices 16]``
measures the level on a folder (the training layout's images/ and unlabeled/, or a plain folder of
tomograms) and writes it into the weights' sidecar.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.infer.resample import resample_slices, resampled_size
from scripts.io.volume import VolumeError, find_volumes, open_volume
from scripts.io.weights_metadata import WeightsMetadata, metadata_path, read_metadata, write_metadata
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import fuse_for_inference
from scripts.network.weights import load_weights, weights_info
from scripts.reconstruction import MIN_SIDE, pick_slices, reconstruction_error
from torch import nn

__all__ = [
    "OOD_RATIO",
    "ReconstructionScorer",
    "calibrate",
    "ood_warning",
    "pick_slices",
    "reconstruction_error",
]

logger = logging.getLogger(__name__)

# A tomogram is flagged when its score exceeds this many times the training level: above every
# in-domain ratio of the generalisation benchmark with the shipped weights (1.29 at most; the held-out
# instrument scored 1.17-1.24, so it is not flagged: docs/inference.md).
OOD_RATIO = 1.5
DEFAULT_SLICES = 8


class ReconstructionScorer:
    """The OOD score of tomograms, with its own network.

    Inference's network may be label-only, so the scorer loads the weights itself, into a
    ``DoubleDecoderNet`` that runs only the image decoder (``outputs="image"``: the same weights, the
    label decoder skipped) fused for inference (``scripts.network.fusion``): about 3x cheaper than
    the plain two-decoder network.

    Args:
        weights: the weights file (its sidecar's ``ood_level`` is the training level).
        width: network width; None: read from the weights.
        device: where the network runs.
        slices: slices scored per tomogram; 0 turns the score off (nothing is loaded).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None,
        width: int | None = None,
        device: str | torch.device = "cpu",
        slices: int = DEFAULT_SLICES,
    ) -> None:
        if isinstance(slices, bool) or not str(slices).strip().isdigit():
            raise ValueError(f"ood_slices must be a whole number >= 0 (0: off), got {slices!r}")
        self.slices = int(slices)
        self.weights = Path(weights) if weights is not None else None
        self.network: nn.Module | None = None
        self.training_level: float | None = None
        if not self.enabled:
            return
        if width in (None, "", "null", "None"):
            width = weights_info(self.weights).width if self.weights is not None else 64
        net = DoubleDecoderNet(width=int(width), outputs="image")
        net = load_weights(net, self.weights).to(torch.device(device)).eval()
        self.network = fuse_for_inference(net, channels_last=True)
        meta = read_metadata(self.weights, int(width)) if self.weights is not None else None
        self.training_level = meta.ood_level if meta is not None else None

    @property
    def enabled(self) -> bool:
        return self.slices > 0

    def score(self, volume_data: np.ndarray, z0: int, z1: int, scale: Sequence[float] | None = None) -> dict:
        """The score of slices ``[z0, z1)`` of a (z, y, x) volume.

        ``scale``: the in-plane resampling factors inference applies (voxel-size matching), so the
        network sees the slices as it does when segmenting. Returns ``score`` (median of
        ``per_slice``, None for slices too small to score), ``slices``, ``per_slice``,
        ``training_level``, ``ratio`` (score / level), ``flagged`` (ratio > OOD_RATIO),
        ``threshold`` and ``seconds``.
        """
        if self.network is None:
            raise RuntimeError("the OOD score is off (slices = 0)")
        start = time.perf_counter()
        picked = pick_slices(volume_data.shape[0], z0, z1, self.slices)
        if not picked:
            raise ValueError(f"slice range [{z0}, {z1}) is empty for {volume_data.shape[0]} slices")
        result: dict = {
            "score": None,
            "slices": picked,
            "per_slice": [],
            "training_level": self.training_level,
            "ratio": None,
            "flagged": False,
            "threshold": OOD_RATIO,
        }
        stack = torch.as_tensor(np.stack([np.asarray(volume_data[z], dtype=np.float32) for z in picked]))
        if scale is not None:
            stack = resample_slices(stack, resampled_size(stack.shape, scale))
        if picked and min(stack.shape[-2:]) >= MIN_SIDE:
            # A few slices of a new shape: cuDNN's autotuning (on for segmenting) would cost seconds
            # at width 64 on a GPU, more than the passes themselves (docs/performance.md).
            with torch.backends.cudnn.flags(enabled=True, benchmark=False):
                errors = reconstruction_error(self.network, stack)
            score = float(np.median(errors))
            result["score"] = round(score, 6)
            result["per_slice"] = [round(float(e), 6) for e in errors]
            if self.training_level:
                result["ratio"] = round(score / self.training_level, 4)
                result["flagged"] = result["ratio"] > OOD_RATIO
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result


def ood_warning(name: str, result: dict) -> str:
    """The warning for a flagged tomogram: its score against the training level, and what to do."""
    return (
        f"{name}: reconstruction error {result['score']:.3g} is {result['ratio']:.1f}x the training "
        f"level {result['training_level']:.3g}: this tomogram looks unlike the training data; consider "
        f"adapting the model (python -m monai.bundle run adapting ..., docs/training.md)"
    )


# ----------------------------------------------------------------------------- calibration


def _calibration_volumes(data_dir: Path) -> list[Path]:
    """The training layout's images/ and unlabeled/ volumes, or the folder's own volumes."""
    if not data_dir.is_dir():
        raise VolumeError(f"{data_dir}: folder does not exist")
    layout = [data_dir / sub for sub in ("images", "unlabeled") if (data_dir / sub).is_dir()]
    if not layout:
        return find_volumes(data_dir)
    found = [p for folder in layout for p in _volumes_or_none(folder)]
    if not found:
        raise VolumeError(f"{data_dir}: no volume files in {' or '.join(str(f) for f in layout)}")
    return found


def _volumes_or_none(folder: Path) -> list[Path]:
    try:
        return find_volumes(folder)
    except VolumeError:
        return []


def calibrate(weights: str, data_dir: str, slices: int = 16, width: int | None = None, device: str = "cpu") -> None:
    """Measure the median OOD score of the tomograms in ``data_dir`` and store it as the weights'
    ``ood_level`` (every other sidecar field kept).

    Args:
        weights: the weights file whose sidecar gets the level.
        data_dir: a training folder (images/, unlabeled/) or a folder of tomograms.
        slices: slices scored per tomogram.
        width: network width; read from the weights when omitted.
        device: "cpu" or "cuda".
    """
    weights_path = Path(weights)
    info = weights_info(weights_path)  # a clear error for a missing or foreign file
    volumes = _calibration_volumes(Path(data_dir))
    scorer = ReconstructionScorer(weights_path, width or info.width, device, max(1, int(slices)))
    scores = []
    for path in volumes:
        volume = open_volume(path)
        result = scorer.score(volume.data, 0, volume.data.shape[0])
        if result["score"] is None:
            print(f"{path.name}: too small to score, left out")
            continue
        scores.append(result["score"])
        print(f"{path.name}: reconstruction error {result['score']:.4g} ({len(result['slices'])} slices)")
    if not scores:
        raise VolumeError(f"{data_dir}: no tomogram large enough to score (slices of at least {MIN_SIDE} px)")
    level = round(statistics.median(scores), 6)
    if level <= 0:
        raise ValueError(f"{data_dir}: median reconstruction error {level} is not positive; cannot calibrate")
    sidecar = metadata_path(weights_path)
    meta = read_metadata(weights_path, info.width)
    if meta is None and sidecar.is_file():  # describes other weights: keep it rather than overwrite it
        raise ValueError(f"{sidecar}: describes other weights than {weights_path.name}; move it away and rerun")
    if meta is None:  # no sidecar: start from what weights_info knows (the published network's for Keras)
        meta = WeightsMetadata(info.width, info.voxel_size_nm, info.recipe, info.trained_on)
    write_metadata(weights_path, dataclasses.replace(meta, ood_level=level))
    print(f"ood_level {level} (median over {len(scores)} tomograms) written to {sidecar}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m scripts.infer.ood calibrate ...``; errors end on one ``ERROR:`` line."""
    from scripts.cli import install, run_main

    if argv is None:
        install(force=True)
        argv = sys.argv[1:]
    argv = list(argv)
    if not argv or argv[0] != "calibrate":
        raise ValueError("usage: python -m scripts.infer.ood calibrate WEIGHTS DATA_DIR [--slices 16]")
    run_main(calibrate, argv[1:], name="python -m scripts.infer.ood calibrate")


if __name__ == "__main__":
    main()
