import pytest
import torch
from scripts.network.double_decoder import DoubleDecoderNet, count_values


@pytest.mark.parametrize(
    ("width", "total", "trainable"),
    [(64, 76_541_230, 76_483_502), (8, 1_208_882, 1_201_666), (16, 4_805_974, 4_791_542)],
)
def test_parameter_counts_match_the_published_network(width, total, trainable):
    assert count_values(DoubleDecoderNet(width=width)) == (total, trainable)


def test_part_counts_at_width_64():
    net = DoubleDecoderNet(width=64)
    assert count_values(net.encoder)[0] == 2_286_240
    assert [count_values(b)[0] for b in net.neck.branches] == [5_259_264, 8_404_992, 13_647_872]
    assert count_values(net.image_decoder)[0] == 19_543_488
    assert count_values(net.label_decoder)[0] == 27_358_656


@pytest.mark.parametrize("shape", [(64, 64), (50, 70), (33, 17), (5, 3)])
def test_output_size_equals_input_size(shape):
    net = DoubleDecoderNet(width=2).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        label, image = net(x)
    assert label.shape == image.shape == x.shape
    assert label.abs().max() <= 1.0


def test_padding_is_invisible_for_a_multiple_of_16_crop():
    """The padded prediction of an odd-sized slice agrees with the network on the same region."""
    net = DoubleDecoderNet(width=2).eval()
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        full, _ = net(x)
        odd, _ = net(x[..., :47, :47])
    assert odd.shape[-2:] == (47, 47)
    # The receptive field makes the border differ; the centre must be close.
    assert torch.allclose(full[..., 8:32, 8:32], odd[..., 8:32, 8:32], atol=0.2)


def test_outputs_selects_one_tensor():
    torch.manual_seed(0)
    both = DoubleDecoderNet(width=2).eval()
    label_only = DoubleDecoderNet(width=2, outputs="label").eval()
    image_only = DoubleDecoderNet(width=2, outputs="image").eval()
    label_only.load_state_dict(both.state_dict())
    image_only.load_state_dict(both.state_dict())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        label, image = both(x)
        assert torch.equal(label_only(x), label)
        assert torch.equal(image_only(x), image)
    with pytest.raises(ValueError, match="outputs"):
        DoubleDecoderNet(width=2, outputs="mask")


def test_segmentation_parameters_are_the_label_branch_only():
    net = DoubleDecoderNet(width=2)
    seg = {id(p) for p in net.segmentation_parameters()}
    label_names = [n for n, p in net.named_parameters() if id(p) in seg]
    assert label_names and all(n.startswith(("label_decoder", "label_head")) for n in label_names)
    assert len(seg) == len(list(net.label_decoder.parameters())) + len(list(net.label_head.parameters()))
