"""The semi-supervised double-decoder network of Dyhr, Sadeghi et al. (PNAS 2023).

One encoder feeds a three-branch neck; an image decoder (no skips) reconstructs the input and a
label decoder (U-Net skips) segments membranes. Sub-modules are declared in the order the
published Keras model builds its layers, so ``named_parameters()`` and the BN buffers follow the
order of a Keras ``save_weights`` file (see ``scripts.network.keras``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional, Tuple, Union  # TorchScript does not read PEP 585/604 annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DoubleDecoderNet", "Bottleneck", "ResidualBlock", "count_values", "pad_to_grid"]

# Keras BatchNormalization defaults used by the reference (momentum 0.99 == PyTorch 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class Activation(nn.Sequential):
    """BatchNorm followed by ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)


class Bottleneck(nn.Sequential):
    """Linear factorised convolution: 1x1 (cin -> r), kxk (r -> r), 1x1 (r -> cout), r = max(1, cout // 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = False) -> None:
        super().__init__()
        reduced = max(1, out_channels // 2)
        self.conv_1 = nn.Conv2d(in_channels, reduced, 1, bias=bias)
        # Keras 'same' pads (k-1)//2 before and the rest after; explicit padding avoids the
        # copy PyTorch makes for padding="same" with even kernels.
        before, after = (kernel_size - 1) // 2, kernel_size // 2
        self.pad = nn.ZeroPad2d((before, after, before, after))
        self.conv_2 = nn.Conv2d(reduced, reduced, kernel_size, bias=bias)
        self.conv_3 = nn.Conv2d(reduced, out_channels, 1, bias=bias)


class ResidualBlock(nn.Module):
    """Concatenating residual block: ``Act(cat[x, B(Act(B(x)))])`` with ``cin + filters`` channels."""

    def __init__(self, in_channels: int, filters: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.out_channels = in_channels + filters
        self.conv = nn.ModuleList(
            [Bottleneck(in_channels, filters, kernel_size), Bottleneck(filters, filters, kernel_size)]
        )
        self.act = nn.ModuleList([Activation(filters), Activation(self.out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act[0](self.conv[0](x))
        h = self.conv[1](h)
        return self.act[1](torch.cat([x, h], dim=1))


class Encoder(nn.Module):
    """Initial bottleneck, then four residual stages, each kept as a skip and max-pooled."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.initial_conv = Bottleneck(1, width, 3, bias=True)
        self.initial_act = Activation(width)
        stages = []
        channels = width
        for filters in (width, 2 * width, 4 * width, 8 * width):
            stages.append(ResidualBlock(channels, filters))
            channels += filters
        self.stages = nn.ModuleList(stages)
        self.out_channels = channels
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the bottom features (16w channels, 1/16 size) and skips, shallowest first."""
        x = self.initial_act(self.initial_conv(x))
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        return x, skips


class NeckBranch(nn.Module):
    """Four ``B(k) -> Act`` layers at constant width; the four convs precede the four BNs in order."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int, depth: int = 4) -> None:
        super().__init__()
        self.conv = nn.ModuleList(
            [Bottleneck(in_channels if i == 0 else channels, channels, kernel_size) for i in range(depth)]
        )
        self.act = nn.ModuleList([Activation(channels) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.conv, self.act):
            x = act(conv(x))
        return x


class Neck(nn.Module):
    """Three parallel branches with kernels 1, 2, 3, concatenated ("cardinality 3")."""

    def __init__(self, in_channels: int, kernel_sizes: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([NeckBranch(in_channels, in_channels, k) for k in kernel_sizes])
        self.out_channels = in_channels * len(kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class UpConv(nn.Module):
    """3x3 stride-2 transposed conv with TensorFlow 'same' geometry: output exactly 2H x 2W.

    PyTorch's ``padding=1, output_padding=1`` has the right size but is shifted by one pixel;
    padding 0 then keeping the first 2H rows and 2W columns is the exact equivalent.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        return self.conv(x)[..., : 2 * height, : 2 * width]


class Decoder(nn.Module):
    """Four upsampling stages; with ``use_skips`` each stage concatenates the encoder skip first."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        skip_channels: Sequence[int] | None,
        blocks_per_stage: int,
    ) -> None:
        super().__init__()
        self.use_skips = skip_channels is not None
        filters = (8 * width, 4 * width, 2 * width, width)
        skips = list(skip_channels) if skip_channels is not None else [0] * len(filters)
        ups, stages = [], []
        channels = in_channels
        for stage_filters, skip in zip(filters, skips, strict=True):
            ups.append(UpConv(channels, stage_filters))
            channels = skip + stage_filters
            blocks = []
            for _ in range(blocks_per_stage):
                blocks.append(ResidualBlock(channels, stage_filters))
                channels += stage_filters
            stages.append(nn.Sequential(*blocks))
        # Keras builds all four transposed convs before the residual blocks.
        self.up = nn.ModuleList(ups)
        self.stages = nn.ModuleList(stages)
        self.final_conv = Bottleneck(channels, width, 3)
        self.final_act = Activation(width)

    def forward(self, x: torch.Tensor, skips: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``skips`` deepest first, as many as stages, when the decoder uses them."""
        i = 0
        for up, stage in zip(self.up, self.stages):
            x = up(x)
            if skips is not None:
                x = torch.cat([skips[i], x], dim=1)
            x = stage(x)
            i += 1
        return self.final_act(self.final_conv(x))


class LabelHead(nn.Module):
    """BN -> ``B(w -> w, k3, bias)`` -> 1x1 conv -> tanh."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv = Bottleneck(width, width, 3, bias=True)
        self.out = nn.Conv2d(width, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.conv(self.norm(x))))


def pad_to_grid(x: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Pad height and width to multiples of 16 (the four 2x2 poolings), centred; ``pad_mode`` as in
    ``F.pad``. Shared by the network and its fused inference copy (``scripts.network.fusion``)."""
    height, width = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (-height) % 16, (-width) % 16
    if pad_h == 0 and pad_w == 0:
        return x
    mode = pad_mode
    # Reflection needs the padding to be smaller than the side; tiny inputs fall back.
    if mode == "reflect" and (pad_h >= height or pad_w >= width):
        mode = "replicate"
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], mode=mode)


class DoubleDecoderNet(nn.Module):
    """Double-decoder network for 2D slices.

    Args:
        width: the reference's ``m_f``; every filter count scales with it (64 in the paper).
        outputs: ``"both"`` returns ``(label, image)``; ``"label"`` or ``"image"`` return one tensor
            (for inferers, export and MONAI Label).
        pad_mode: how inputs whose height or width is not a multiple of 16 are padded before the
            network (``"reflect"``, ``"replicate"`` or ``"constant"``); outputs are cropped back.

    Input ``(N, 1, H, W)``; outputs ``(N, 1, H, W)``: label in ``[-1, 1]`` (tanh, > 0 is membrane),
    image linear (reconstruction of the standardised input).
    """

    def __init__(self, width: int = 64, outputs: str = "both", pad_mode: str = "reflect") -> None:
        super().__init__()
        if outputs not in ("both", "label", "image"):
            raise ValueError(f"outputs must be 'both', 'label' or 'image', got {outputs!r}")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        self.width = width
        self.outputs = outputs
        self.pad_mode = pad_mode
        self.encoder = Encoder(width)
        self.neck = Neck(self.encoder.out_channels)
        skip_channels = [stage.out_channels for stage in self.encoder.stages][::-1]
        self.image_decoder = Decoder(self.neck.out_channels, width, None, blocks_per_stage=1)
        self.image_head = nn.Sequential(
            Bottleneck(width, width, 3, bias=True),
            Bottleneck(width, width, 3, bias=True),
            Bottleneck(width, 1, 3, bias=True),
        )
        self.label_decoder = Decoder(self.neck.out_channels, width, skip_channels, blocks_per_stage=2)
        self.label_head = LabelHead(width)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        height, width = x.shape[-2], x.shape[-1]
        x = pad_to_grid(x, self.pad_mode)
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        bottom, skips = self.encoder(x)
        features = self.neck(bottom)
        if self.outputs != "image":
            label = self.label_head(self.label_decoder(features, skips[::-1]))
            label = label[..., top : top + height, left : left + width]
            if self.outputs == "label":
                return label
            image = self.image_head(self.image_decoder(features))
            return label, image[..., top : top + height, left : left + width]
        image = self.image_head(self.image_decoder(features))
        return image[..., top : top + height, left : left + width]

    def segmentation_parameters(self) -> list[nn.Parameter]:
        """Parameters of the label decoder and head: frozen during unlabeled steps."""
        return [*self.label_decoder.parameters(), *self.label_head.parameters()]


def count_values(net: nn.Module) -> tuple[int, int]:
    """(parameters + BN running means and variances, trainable parameters), as Keras counts them."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    params = sum(p.numel() for p in net.parameters())
    stats = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    return params + stats, trainable
