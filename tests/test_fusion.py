"""The fused inference copy (BN folding, merged linear convs, channels_last) computes the eager network."""

import numpy as np
import pytest
import torch
from scripts.infer.predict import SlicePredictor
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import FusedConv, _Lin, _run, fuse_for_inference
from scripts.network.keras import load_keras_weights
from torch import nn


def _randomised(width: int, outputs: str, seed: int = 0) -> DoubleDecoderNet:
    """Random weights with non-trivial BN statistics and biases (fresh ones are identity and zero)."""
    torch.manual_seed(seed)
    net = DoubleDecoderNet(width=width, outputs=outputs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _pairs(a, b):
    return zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]


def _assert_same(eager, fused, atol: float) -> None:
    for e, f in _pairs(eager, fused):
        assert f.shape == e.shape
        assert (f - e).abs().max().item() < atol


@pytest.mark.parametrize("outputs", ["label", "both", "image"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("reuse", [False, True])
def test_fused_random_network_matches_eager(outputs, channels_last, reuse):
    net = _randomised(4, outputs)
    fused = fuse_for_inference(net, channels_last=channels_last, reuse_buffers=reuse)
    x = torch.randn(2, 1, 45, 77)  # not multiples of 16: the network's own padding and crop
    with torch.inference_mode():
        eager, got = net(x), fused(x)
        got = fused(x) if reuse else got  # the second call runs on kept tensors
    _assert_same(eager, got, atol=1e-5)
    label_eager = eager if outputs == "label" else eager[0]
    label_got = got if outputs == "label" else got[0]
    if outputs != "image":
        assert torch.equal(label_got > 0, label_eager > 0)


def test_fused_keras_fixture_weights_match_eager(fixtures_dir):
    net = load_keras_weights(DoubleDecoderNet(width=4), fixtures_dir / "deep_sxt_mf4.h5").eval()
    x = torch.from_numpy(np.load(fixtures_dir / "deep_sxt_mf4_io.npz")["x1"]).permute(0, 3, 1, 2)
    for max_ratio in (1.0, 4.0):  # 4: also the merges that cost more multiply-adds
        fused = fuse_for_inference(net, max_ratio=max_ratio)
        with torch.no_grad():
            (label, image), (f_label, f_image) = net(x), fused(x)
        assert torch.equal(f_label > 0, label > 0)
        assert (f_label - label).abs().max() < 1e-5
        assert (f_image - image).abs().max() < 1e-4 * (1 + image.abs().max())


def test_reused_buffers_give_the_same_outputs_call_after_call():
    net = _randomised(4, "both", seed=5)
    fused = fuse_for_inference(net, reuse_buffers=True)
    rng = np.random.default_rng(2)
    shapes = [(1, 1, 48, 64), (1, 1, 48, 64), (2, 1, 32, 40)]
    inputs = [torch.from_numpy(rng.normal(size=shape).astype(np.float32)) for shape in shapes]
    with torch.inference_mode():
        first = fused(inputs[0])
        kept = [t.clone() for t in first]
        outs = [fused(x) for x in inputs[1:]] + [fused(inputs[0])]
    for a, b in zip(first, kept, strict=True):
        assert torch.equal(a, b)  # a later call did not overwrite an earlier result
    with torch.no_grad():  # buffers made in inference mode are not reused outside it
        again = fused(inputs[0])
        eager = [net(x) for x in inputs[1:]]
    for got, ref in zip(outs[:2], eager, strict=True):
        _assert_same(ref, got, atol=1e-5)
    for a, b in zip(again, first, strict=True):
        assert (a - b).abs().max() < 1e-6
    buffers = [m.buffer for m in fused.modules() if hasattr(m, "buffer")]
    assert buffers and all(b.tensor is not None for b in buffers)
    assert sum(len(waiting) for waiting in fused.pool.free.values()) > 0  # conv outputs kept for reuse
    # A memory budget caps what is kept; results stay the same.
    capped = fuse_for_inference(net, reuse_buffers=True, buffer_limit=0)
    with torch.no_grad():
        _assert_same(capped(inputs[0]), again, atol=1e-6)
    assert all(m.buffer.tensor is None for m in capped.modules() if hasattr(m, "buffer"))
    assert not any(capped.pool.free.values())


def test_fusion_leaves_the_original_network_alone():
    net = _randomised(2, "both").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fuse_for_inference(net, channels_last=True)
    assert net.training and not fused.training
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert value.is_contiguous(), name  # layout unchanged
    assert not any(p is q for p in net.parameters() for q in fused.parameters())
    # Training still works on the original, and the fused copy does not follow it.
    x = torch.randn(2, 1, 32, 32)
    label, image = net(x)
    (label.mean() + image.mean()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in fused.parameters())


def test_merging_saves_work_and_keeps_the_border_exact():
    net = _randomised(4, "both")
    fused = fuse_for_inference(net)
    original = sum(
        m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d)
    )  # multiply-adds per pixel of the convs at their resolution, summed over layers
    merged = sum(m.weight.numel() for m in fused.modules() if isinstance(m, FusedConv))
    assert merged < original
    # The input bottleneck (1x1 with bias, then zero-padded 3x3) needs its border correction.
    assert fused.encoder.initial[0].border is not None


def test_merged_conv_reproduces_a_biased_chain_at_the_border():
    torch.manual_seed(1)
    chain = [
        _Lin(torch.randn(3, 2, 1, 1, dtype=torch.float64), torch.randn(3, dtype=torch.float64)),
        _Lin(torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64), (0, 1, 0, 1)),
        _Lin(torch.randn(4, 3, 1, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64)),
    ]
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    merged = FusedConv(chain).double()
    merged.onednn = False
    exact = _run(chain, x)
    torch.testing.assert_close(merged(x), exact, atol=1e-5, rtol=0)  # weights are stored in float32
    # Without the correction the border rows and columns would be off by the unseen bias.
    border = merged.border
    merged.border = None
    assert (merged(x) - exact)[..., -1, :].abs().min() > 1e-3 or (merged(x) - exact).abs().max() > 1e-2
    assert border is not None


def test_predictor_paths_give_the_same_masks():
    net = _randomised(4, "label", seed=3)
    slices = np.random.default_rng(0).normal(size=(2, 50, 70)).astype(np.float32)
    plain = SlicePredictor(net, channels_last=False, fuse=False).predict(slices).label
    fast = SlicePredictor(net).predict(slices).label
    assert torch.equal(fast > 0, plain > 0)
    assert (fast - plain).abs().max() < 1e-5
    assert all(p.is_contiguous() for p in net.parameters())  # the predictor did not convert the network


def test_bf16_autocast_runs_on_the_fused_network():
    net = _randomised(4, "label", seed=4)
    slices = np.random.default_rng(1).normal(size=(1, 48, 48)).astype(np.float32)
    fp32 = SlicePredictor(net).predict(slices).label
    bf16 = SlicePredictor(net, amp=True).predict(slices).label
    assert bf16.dtype == torch.float32
    assert ((bf16 > 0) == (fp32 > 0)).float().mean() > 0.9
