"""Losses of the two training steps (Dyhr, Sadeghi et al., PNAS 2023, doi 10.1073/pnas.2209938120).

Labeled step: ``0.99 * Huber_0.1(label, label_hat) + 0.01 * Huber_0.1(image, image_hat)``.
Unlabeled step: ``0.5 * (1 - SSIM(image, image_hat)) + 0.5 * Huber_0.1(image, image_hat)``.
Huber is PyTorch's ``HuberLoss`` (not ``SmoothL1Loss``), mean over pixels; the label term averages
over annotated pixels only (mask 1), so label value 255 never acts as background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn

__all__ = ["LabeledLoss", "UnlabeledLoss", "masked_huber"]


def masked_huber(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, delta: float = 0.1
) -> torch.Tensor:
    """Huber loss averaged over the pixels where ``mask`` is 1 (all pixels without a mask).

    Equals ``nn.HuberLoss(delta=delta)(prediction, target)`` when the mask is all ones; 0 when no
    pixel of the batch is annotated (a crop that fell outside the annotation).
    """
    loss = F.huber_loss(prediction, target, reduction="none", delta=delta)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


class LabeledLoss(nn.Module):
    """Supervised loss; inputs (N, 1, H, W): tanh label prediction, image reconstruction, the {-1, +1}
    label target, the input image and an optional annotation mask."""

    def __init__(self, label_weight: float = 0.99, image_weight: float = 0.01, delta: float = 0.1) -> None:
        super().__init__()
        self.label_weight = label_weight
        self.image_weight = image_weight
        self.delta = delta

    def forward(
        self,
        label_pred: torch.Tensor,
        image_pred: torch.Tensor,
        label: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        label_term = masked_huber(label_pred, label, mask, self.delta)
        image_term = masked_huber(image_pred, image, None, self.delta)
        return self.label_weight * label_term + self.image_weight * image_term


class UnlabeledLoss(nn.Module):
    """Reconstruction loss of the unlabeled step; inputs (N, 1, H, W) with H, W >= ``win_size``.

    SSIM is MONAI's: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, 'valid' filtering (no padding,
    the mean runs over the (H-10) x (W-10) map), as ``tf.image.ssim`` in the reference.

    Args:
        data_range: dynamic range for the SSIM constants; the reference uses max - min of the
            standardised training set (about 76 on the paper's data).
    """

    def __init__(
        self,
        data_range: float = 1.0,
        ssim_weight: float = 0.5,
        huber_weight: float = 0.5,
        delta: float = 0.1,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        self.ssim_weight = ssim_weight
        self.huber_weight = huber_weight
        self.delta = delta
        self.ssim = SSIMLoss(
            spatial_dims=2,
            data_range=float(data_range),
            kernel_type="gaussian",
            win_size=win_size,
            kernel_sigma=kernel_sigma,
            k1=k1,
            k2=k2,
        )

    def forward(self, image_pred: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # SSIM in float32: the squared means lose too much precision under fp16 autocast.
        ssim_loss = self.ssim(image_pred.float(), image.float())
        huber_loss = masked_huber(image_pred, image, None, self.delta)
        return self.ssim_weight * ssim_loss + self.huber_weight * huber_loss
