import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePredictor, window_size
from scripts.network.dihedral import DIHEDRAL, dihedral, dihedral_inverse, dihedral_mean
from scripts.network.double_decoder import DoubleDecoderNet


def _net(outputs="label", width=2, seed=0):
    torch.manual_seed(seed)
    return DoubleDecoderNet(width=width, outputs=outputs).eval()


def test_window_is_the_whole_slice_when_it_fits():
    assert window_size((1324, 1284), 2048) == (1324, 1284)
    assert window_size((1324, 1284), (512, 512)) == (512, 512)
    assert window_size((100, 3000), (-1, 1024)) == (100, 1024)


@pytest.mark.parametrize(("k", "flip"), DIHEDRAL)
def test_dihedral_inverse_undoes_the_transform(k, flip):
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    assert torch.equal(dihedral_inverse(dihedral(x, k, flip), k, flip), x)
    assert len(set(DIHEDRAL)) == 8


def test_each_slice_is_standardised_on_its_own():
    predictor = SlicePredictor(_net())
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 48, 48)).astype(np.float32)
    # Same content at another offset and scale in the second slice: same prediction.
    slices = np.concatenate([base, 1000 + 50 * base]).astype(np.float32)
    label = predictor.predict(slices).label
    assert label.shape == (2, 48, 48)
    torch.testing.assert_close(label[0], label[1], atol=1e-4, rtol=1e-4)


def test_tta_gives_mean_and_variance_of_the_8_variants():
    net = _net()
    slices = np.random.default_rng(1).normal(size=(2, 32, 32)).astype(np.float32)
    plain = SlicePredictor(net).predict(slices)
    tta = SlicePredictor(net, tta=True).predict(slices)
    assert plain.variance is None and tta.variance is not None
    x = SlicePredictor(net).normalize(torch.as_tensor(slices)).unsqueeze(1)
    with torch.no_grad():
        variants = torch.stack([dihedral_inverse(net(dihedral(x, k, f)), k, f) for k, f in DIHEDRAL])[:, :, 0]
    torch.testing.assert_close(tta.label, variants.mean(0), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the teacher of adaptation's pseudo labels averages the same eight views
        torch.testing.assert_close(dihedral_mean(net, x)[:, 0], tta.label, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tta.variance, variants.var(0, unbiased=False), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(tta.label, plain.label)


def test_tiled_windows_agree_with_the_whole_slice_mostly():
    net = _net(width=4)
    slices = np.random.default_rng(2).normal(size=(1, 96, 96)).astype(np.float32)
    whole = SlicePredictor(net).predict(slices).label
    inferer = SlidingWindowInferer(roi_size=(64, 64), overlap=0.5, mode="gaussian")
    tiled = SlicePredictor(net, inferer=inferer, max_window=64).predict(slices).label
    assert tiled.shape == whole.shape
    agree = ((tiled > 0) == (whole > 0)).float().mean().item()
    assert agree > 0.8


def test_both_outputs_come_back_with_image():
    prediction = SlicePredictor(_net(outputs="both")).predict(np.zeros((1, 20, 30), np.float32))
    assert prediction.label.shape == prediction.image.shape == (1, 20, 30)


def test_postprocessing_threshold_erosion_border():
    label = -np.ones((1, 12, 12), np.float32)
    label[0, 2:10, 2:10] = 0.5
    assert PostProcessing(threshold=0.0).slices(label).sum() == 64
    assert PostProcessing(threshold=0.6).slices(label).sum() == 0
    assert PostProcessing(erosion_iterations=1).slices(label).sum() == 36
    cropped = PostProcessing(border_crop=3).slices(label)
    assert cropped.sum() == 36 and cropped.dtype == np.uint8


def test_small_objects_are_removed_in_3d():
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[1:5, 2:6, 2:6] = 1  # 64 voxels
    mask[2, 12, 12] = 1  # 1 voxel
    mask[3, 15:17, 15:17] = 1  # 4 voxels
    kept = PostProcessing(min_object_voxels=5).volume(mask.copy())
    assert kept.sum() == 64
    assert PostProcessing(min_object_voxels=4).volume(mask.copy()).sum() == 68


def test_compiled_predictor_gives_the_default_masks():
    # `compile: true` runs the fused network through torch.compile (F.conv2d paths, no kept tensors).
    net = _net(width=4)
    slices = np.random.default_rng(0).normal(size=(2, 48, 64)).astype(np.float32)
    compiled = SlicePredictor(net, compile=True).predict(slices).label
    default = SlicePredictor(net).predict(slices).label
    assert (compiled - default).abs().max() < 1e-5
    assert torch.equal(compiled > 0, default > 0)


def test_a_padded_partial_batch_gives_the_same_labels():
    # On CUDA a last batch smaller than the others is padded with copies of its last slice (no new
    # cuDNN tuning); the padding must not change the slices that are really there.
    net = _net(width=4)
    slices = np.random.default_rng(3).normal(size=(3, 48, 64)).astype(np.float32)
    padded = SlicePredictor(net)
    padded.pad_partial_batches = True
    padded.predict(slices)  # the usual batch size: 3
    label = padded.predict(slices[:2]).label
    assert label.shape == (2, 48, 64)
    torch.testing.assert_close(label, SlicePredictor(net).predict(slices[:2]).label, atol=1e-5, rtol=1e-5)
