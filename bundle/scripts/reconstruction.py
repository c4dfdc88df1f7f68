"""The image decoder's reconstruction error on a tomogram's slices: the out-of-distribution measure.

Why a module of its own at the bottom of the package: inference scores tomograms with it
(``scripts.infer.ood``) and training stores its level on the training data beside each checkpoint
(``scripts.train.metadata``), and the workflows never import each other (docs/architecture.md).
Imports torch and MONAI only.

The measure is the unlabeled loss (``scripts.train.losses.UnlabeledLoss``): ``0.5 * (1 - SSIM) +
0.5 * Huber_0.1`` with MONAI's SSIM (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03), here with
each slice's own ``data_range`` (max - min of the standardised slice), so scores do not depend on
the dataset a range was measured on; tests/test_ood.py checks that the two agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_tensor
from torch import nn

__all__ = ["EDGE_FRACTION", "MAX_SIDE", "MIN_SIDE", "pick_slices", "reconstruction_error"]

MAX_SIDE = 512  # centre crop: bounds the cost and leaves out the border
MIN_SIDE = 11  # SSIM's Gaussian window, 'valid' filtering
EDGE_FRACTION = 0.1  # outer slices of a tomogram left out (weak, missing-wedge-dominated)
SSIM_WEIGHT, HUBER_WEIGHT, DELTA = 0.5, 0.5, 0.1


def _unlabeled_loss(image: torch.Tensor, target: torch.Tensor) -> float:
    """The unlabeled loss of one (1, 1, H, W) pair, with the target's own range for SSIM."""
    data_range = max(float(target.max() - target.min()), 1e-3)
    ssim = SSIMLoss(
        spatial_dims=2,
        data_range=data_range,
        kernel_type="gaussian",
        win_size=MIN_SIDE,
        kernel_sigma=1.5,
        k1=0.01,
        k2=0.03,
    )
    huber = F.huber_loss(image, target, delta=DELTA)
    return float(SSIM_WEIGHT * ssim(image, target) + HUBER_WEIGHT * huber)


def _centre_crop(x: torch.Tensor, side: int = MAX_SIDE) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return x[..., top : top + min(h, side), left : left + min(w, side)]


def reconstruction_error(network: nn.Module, slices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-slice reconstruction error of ``network``'s image output on ``(B, H, W)`` slices.

    ``network``: a ``DoubleDecoderNet`` (or its fused copy) with the image output (``outputs`` "both"
    or "image"). Each slice is standardised on its own (as inference does), centre-cropped to at most
    512 x 512 and reconstructed one at a time (memory stays that of one slice). The network runs in
    eval mode without gradients and with its image output only; its mode and ``outputs`` are
    restored afterwards.
    """
    if getattr(network, "outputs", "both") == "label":
        raise ValueError("the reconstruction error needs a network built with outputs='both'")
    # A private copy: standardising works in place, and the slices may be a read-only memory map.
    if isinstance(slices, torch.Tensor):
        batch = slices.detach().to("cpu", torch.float32, copy=True)
    else:
        batch = torch.from_numpy(np.array(slices, dtype=np.float32, copy=True))
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3:
        raise ValueError(f"slices must be (B, H, W), got shape {tuple(batch.shape)}")
    if min(batch.shape[-2:]) < MIN_SIDE:
        raise ValueError(
            f"slices of {batch.shape[-2]} x {batch.shape[-1]} pixels are too small for SSIM "
            f"(at least {MIN_SIDE} x {MIN_SIDE})"
        )
    # Slices stacked along the first axis are "channels" here: channel-wise = per slice.
    standardised = NormalizeIntensity(channel_wise=True)(batch)
    batch = _centre_crop(convert_to_tensor(standardised, torch.float32, track_meta=False))
    device = next(network.parameters()).device
    was_training, outputs = network.training, getattr(network, "outputs", None)
    network.eval()
    if outputs == "both":  # the label decoder's half of the work is not needed (restored below)
        network.outputs = "image"
    errors = []
    try:
        with torch.inference_mode():
            for one in batch:
                x = one[None, None].to(device)
                out = network(x)
                image = out[1] if isinstance(out, (tuple, list)) else out
                errors.append(_unlabeled_loss(image.float(), x))
    finally:
        network.train(was_training)
        if outputs is not None:
            network.outputs = outputs
    return np.asarray(errors, dtype=np.float64)


def pick_slices(depth: int, z0: int, z1: int, count: int = 8) -> list[int]:
    """``count`` evenly spaced slices of ``[z0, z1)`` (clipped to ``depth``), leaving out the outer
    10 % at each end; all slices of the range when it holds no more than ``count``."""
    z0, z1, count = max(0, int(z0)), min(int(depth), int(z1)), int(count)
    if count <= 0 or z1 <= z0:
        return []
    if z1 - z0 <= count:
        return list(range(z0, z1))
    skip = int((z1 - z0) * EDGE_FRACTION)
    lo, hi = z0 + skip, z1 - skip
    if hi - lo <= count:
        return list(range(lo, hi))
    return [lo + int((i + 0.5) * (hi - lo) / count) for i in range(count)]
