"""Losses and metrics of the training step, checked against hand computations."""

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d
from scripts.train.losses import LabeledLoss, UnlabeledLoss, masked_huber
from scripts.train.metrics import image_counts, label_counts, label_scores


def _huber(a: float, b: float, delta: float = 0.1) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < delta else delta * (d - 0.5 * delta)


def test_labeled_loss_matches_formula_on_hand_example():
    label_pred = torch.tensor([0.9, -0.5, 0.2, 1.0]).view(1, 1, 2, 2)
    label = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)  # last pixel not annotated (255)
    image = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    image_pred = torch.tensor([0.05, 1.5, 2.0, 2.0]).view(1, 1, 2, 2)
    # label: |d| = 0.1 (linear branch: 0.1 * (0.1 - 0.05)), 0.5, 0.8; the 4th pixel is masked out
    label_term = (_huber(0.9, 1) + _huber(-0.5, -1) + _huber(0.2, 1)) / 3
    image_term = sum(_huber(a, b) for a, b in [(0.05, 0), (1.5, 1), (2, 2), (2, 3)]) / 4
    assert label_term == pytest.approx((0.005 + 0.045 + 0.075) / 3)
    expected = 0.99 * label_term + 0.01 * image_term
    loss = LabeledLoss()(label_pred, image_pred, label, image, mask)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_masked_huber_is_torch_huber_without_mask_and_ignores_masked_pixels():
    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    ones = torch.ones_like(a)
    reference = torch.nn.HuberLoss(delta=0.1)(a, b)
    assert torch.allclose(masked_huber(a, b, None), reference)
    assert torch.allclose(masked_huber(a, b, ones), reference)
    mask = (torch.rand_like(a) > 0.5).float()
    changed = a + 100 * (1 - mask)  # only where mask is 0
    assert torch.allclose(masked_huber(a, b, mask), masked_huber(changed, b, mask))
    assert float(masked_huber(a, b, torch.zeros_like(a))) == 0.0


def _ssim_numpy(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Reference SSIM: 11-tap Gaussian (sigma 1.5), 'valid' filtering, mean of the SSIM map."""
    t = np.arange(11) - 5.0
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        out = correlate1d(correlate1d(a, g, axis=0), g, axis=1)
        return out[5:-5, 5:-5]  # keep only windows fully inside the image ('valid')

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim.mean())


def test_unlabeled_loss_is_half_ssim_half_huber_with_gaussian_valid_ssim():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 40)).astype(np.float64)
    y = x + 0.3 * rng.normal(size=x.shape)
    loss_fn = UnlabeledLoss(data_range=6.0)
    xt = torch.tensor(x, dtype=torch.float32)[None, None]
    yt = torch.tensor(y, dtype=torch.float32)[None, None]
    ssim = _ssim_numpy(y, x, 6.0)
    huber = np.mean([_huber(a, b) for a, b in zip(y.ravel(), x.ravel(), strict=True)])
    assert float(loss_fn(yt, xt)) == pytest.approx(0.5 * (1 - ssim) + 0.5 * huber, rel=1e-4)
    assert float(loss_fn(xt, xt)) == pytest.approx(0.0, abs=1e-6)


def test_label_metrics_threshold_and_uncertain_pixels():
    # truth: 4 membrane, 4 background, 1 not annotated
    target = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1, 1.0]).view(1, 1, 3, 3)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0.0]).view(1, 1, 3, 3)
    pred = torch.tensor([0.95, 0.95, 0.5, -0.95, 0.95, -0.95, -0.95, 0.1, 0.99]).view(1, 1, 3, 3)
    scores = label_scores(label_counts(pred, target, mask, threshold=0.9))
    # TP 2, FP 1, TN 2, uncertain membrane 1 (missed), uncertain background 1 (wrong)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["accuracy"] == pytest.approx(4 / 8)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # Dice at tanh > 0: predicted {0, 1, 2, 4, 7}, membrane {0, 1, 2, 3}: overlap 3
    assert scores["dice"] == pytest.approx(2 * 3 / (5 + 4))


def test_image_accuracy_counts_pixels_within_one_std():
    image = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(1, 1, 2, 2)  # std 1
    recon = torch.tensor([0.5, 2.0, 1.5, 0.9]).view(1, 1, 2, 2)
    close, total = image_counts(recon, image).tolist()
    assert (close, total) == (2.0, 4.0)
