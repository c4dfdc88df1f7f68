"""Inference-time simplification of ``DoubleDecoderNet`` (eval mode only).

``fuse_for_inference(net)`` builds a new module that computes the same function with less work:

- every BatchNorm that follows a linear conv is folded into that conv (exact algebra); the BN after
  a residual concatenation is split: its part on the new features is folded, its part on the
  block input stays a per-channel scale and shift written straight into the concatenation buffer;
- the BN that opens the label head is folded forward into the head's first 1x1 conv;
- runs of linear convs (the three convs of a bottleneck, and the head's bottleneck + 1x1 output)
  are merged where the merged conv costs no more multiply-adds (a 1x1 next to a kxk conv becomes one
  kxk conv). A 1x1 conv with a bias in front of a zero-padded kxk conv changes the border, so the
  merged conv carries the exact per-border-row/column bias correction;
- symmetric 'same' padding is done inside the conv (no padded copy), ReLUs are in place;
- optionally channels_last weights and activations (oneDNN's fast path on CPU).

Weights are composed in float64, so the fused network matches the eager one to float32 rounding.
The original module is only read: training is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scripts.network.buffers import BufferBudget, OutputBuffer, TensorPool, give_back
from scripts.network.double_decoder import (
    Bottleneck,
    Decoder,
    DoubleDecoderNet,
    NeckBranch,
    ResidualBlock,
    pad_to_grid,
)
from torch import nn

__all__ = ["FusedDoubleDecoderNet", "fuse_for_inference"]

Pad = tuple[int, int, int, int]  # F.pad order: left, right, top, bottom


@dataclass
class _Lin:
    """A linear conv in float64: weight (out, in, kh, kw), bias, zero padding applied before it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    pad: Pad = (0, 0, 0, 0)

    @property
    def is_pointwise(self) -> bool:
        return self.weight.shape[-2:] == (1, 1) and not any(self.pad)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias)


def _lin(conv: nn.Conv2d, pad: Pad = (0, 0, 0, 0)) -> _Lin:
    bias = conv.bias.detach().double() if conv.bias is not None else None
    return _Lin(conv.weight.detach().double(), bias, pad)


def _bottleneck_chain(block: Bottleneck) -> list[_Lin]:
    pad = tuple(int(p) for p in block.pad.padding)
    return [_lin(block.conv_1), _lin(block.conv_2, pad), _lin(block.conv_3)]


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``scale * x + shift`` (float64)."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    return scale, shift


def _affine_after(lin: _Lin, scale: torch.Tensor, shift: torch.Tensor) -> _Lin:
    bias = lin.bias if lin.bias is not None else torch.zeros_like(scale)
    return _Lin(lin.weight * scale[:, None, None, None], bias * scale + shift, lin.pad)


def _affine_before(lin: _Lin, scale: torch.Tensor, shift: torch.Tensor) -> _Lin:
    # Exact only without padding between the affine map and the conv (padding zeros are not mapped).
    assert lin.is_pointwise, "a BN can only be folded forward into an unpadded 1x1 conv"
    bias = lin.bias
    if bias is None:
        bias = torch.zeros(lin.weight.shape[0], dtype=torch.float64, device=lin.weight.device)
    return _Lin(lin.weight * scale[None, :, None, None], bias + lin.weight[:, :, 0, 0] @ shift, lin.pad)


def _compose(a: _Lin, b: _Lin) -> torch.Tensor:
    """Weight of ``b`` after ``a`` (one of them 1x1 unpadded)."""
    if a.is_pointwise:
        return torch.einsum("nmyx,mc->ncyx", b.weight, a.weight[:, :, 0, 0])
    return torch.einsum("on,nmyx->omyx", b.weight[:, :, 0, 0], a.weight)


def _run(chain: Sequence[_Lin], x: torch.Tensor) -> torch.Tensor:
    for lin in chain:
        x = lin(x)
    return x


class FusedConv(nn.Module):
    """A conv (with its own zero padding) that stands for a run of linear convs.

    ``border`` (when not None) is the exact bias minus the interior bias for the border rows and
    columns, laid out on a minimal image of ``top + 1 + bottom`` by ``left + 1 + right`` pixels: a
    1x1 conv's bias in front of a zero-padded conv is not seen where the kernel hits the padding.
    """

    def __init__(self, chain: Sequence[_Lin], relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        self.onednn = True  # oneDNN conv with the ReLU as a post-op on CPU (see _use_onednn)
        self.pool: TensorPool | None = None  # where outputs come from (fuse_for_inference sets it)
        head, rest = chain[0], chain[1:]
        weight = head.weight
        pad = head.pad
        for lin in rest:  # _plan puts at most one padded kxk conv in a run
            weight = _compose(_Lin(weight, None, pad), lin)
            pad = pad if not any(lin.pad) else lin.pad
        left, right, top, bottom = pad
        # The chain is affine: its response to zeros on a minimal image is the exact bias everywhere.
        zeros = torch.zeros(
            1, weight.shape[1], top + 1 + bottom, left + 1 + right, dtype=torch.float64, device=weight.device
        )
        bias_map = _run(chain, zeros)[0]
        interior = bias_map[:, top, left]
        delta = bias_map - interior[:, None, None]
        self.kernel = tuple(weight.shape[-2:])
        self.pad = pad
        self.symmetric = left == right == top == bottom
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = nn.Parameter(interior.float(), requires_grad=False)
        has_border = bool(delta.abs().max() > 1e-12 * (1.0 + bias_map.abs().max()))
        self.register_buffer("border", delta.float() if has_border else None)

    @property
    def macs(self) -> int:
        return self.weight[0].numel() * self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse_relu = self.relu and self.border is None
        if self.symmetric and self.onednn and _use_onednn(x):
            attr = "relu" if fuse_relu else "none"
            padding, ones = [self.pad[0]] * 2, [1, 1]
            if self.pool is None:
                y = torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, padding, ones, ones, 1, attr, [], ""
                )
            else:
                # Into a kept tensor: oneDNN's in-place form adds the conv to it, so it starts at 0.
                n, _, height, width = x.shape
                y = self.pool.take((n, self.weight.shape[0], height, width), x.dtype, x).zero_()
                torch.ops.mkldnn._convolution_pointwise_.binary(
                    y, x, self.weight, self.bias, padding, ones, ones, 1, "add", 1.0,
                    "relu" if fuse_relu else None, [], "",
                )  # fmt: skip
            if self.border is not None:
                y = _add_border(y, self.border, self.pad)
            return y if fuse_relu or not self.relu else F.relu(y, inplace=True)
        if self.symmetric:
            y = F.conv2d(x, self.weight, self.bias, padding=self.pad[0])
        else:
            y = F.conv2d(F.pad(x, self.pad), self.weight, self.bias)
        if self.border is not None:
            y = _add_border(y, self.border, self.pad)
        return F.relu(y, inplace=True) if self.relu else y


def _use_onednn(x: torch.Tensor) -> bool:
    """The fused oneDNN op serves float32 CPU eager runs; autocast, tracing and compile use F.conv2d."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and _HAS_ONEDNN
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
    )


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _add_border(y: torch.Tensor, delta: torch.Tensor, pad: Pad) -> torch.Tensor:
    """Add the per-border-class bias correction in place (rows, columns, then the corner overlap)."""
    left, right, top, bottom = pad
    height, width = y.shape[-2], y.shape[-1]
    # (slice of y, slice of delta) for the top/bottom rows and the left/right columns
    rows = [(slice(0, top), slice(0, top)), (slice(height - bottom, height), slice(top + 1, None))]
    cols = [(slice(0, left), slice(0, left)), (slice(width - right, width), slice(left + 1, None))]
    for ys, ds in rows:
        y[..., ys, :] += delta[:, ds, left : left + 1]
    for xs, ds in cols:
        y[..., :, xs] += delta[:, top : top + 1, ds]
    for ys, dys in rows:
        for xs, dxs in cols:
            corner = delta[:, dys, dxs] - delta[:, dys, left : left + 1] - delta[:, top : top + 1, dxs]
            y[..., ys, xs] += corner
    return y


def _merge_cost(chain: Sequence[_Lin]) -> int:
    """Multiply-adds of the merged conv (kernel of the padded member, in of first, out of last)."""
    kernel = next((lin.weight.shape[-2:] for lin in chain if not lin.is_pointwise), (1, 1))
    return chain[0].weight.shape[1] * chain[-1].weight.shape[0] * kernel[0] * kernel[1]


def _plan(chain: list[_Lin], max_ratio: float) -> list[list[_Lin]]:
    """Group consecutive linear convs greedily where merging costs <= ``max_ratio`` x the separate convs.

    At most one kxk conv per group (merging two would grow the kernel).
    """
    groups = [[lin] for lin in chain]
    while True:
        best, best_gain = None, None
        for i in range(len(groups) - 1):
            merged = groups[i] + groups[i + 1]
            if sum(not lin.is_pointwise for lin in merged) > 1:
                continue
            separate = _merge_cost(groups[i]) + _merge_cost(groups[i + 1])
            cost = _merge_cost(merged)
            if cost <= max_ratio * separate and (best_gain is None or separate - cost > best_gain):
                best, best_gain = i, separate - cost
        if best is None:
            return groups
        groups[best : best + 2] = [groups[best] + groups[best + 1]]


class ConvChain(nn.Sequential):
    """Fused convs run one after the other; each intermediate output goes back to the pool once used."""

    pool: TensorPool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self):
            y = conv(x)
            if i > 0:  # the chain's own input belongs to the caller
                give_back(self.pool, x)
            x = y
        return x


class LinearStack(ConvChain):
    """Merged linear convs, optionally followed by a ReLU (done by the last conv)."""

    def __init__(self, chain: list[_Lin], relu: bool, max_ratio: float) -> None:
        groups = _plan(chain, max_ratio)
        super().__init__(*[FusedConv(g, relu=relu and i == len(groups) - 1) for i, g in enumerate(groups)])


def _bottleneck_act(block: Bottleneck, act: nn.Module | None, max_ratio: float) -> LinearStack:
    chain = _bottleneck_chain(block)
    if act is not None:
        chain[-1] = _affine_after(chain[-1], *_bn_affine(act.norm))
    return LinearStack(chain, relu=act is not None, max_ratio=max_ratio)


class FusedResidual(nn.Module):
    """``relu(cat[scale * x + shift, B'(relu(B'(x)))])`` with the BNs folded into the bottlenecks."""

    def __init__(self, block: ResidualBlock, max_ratio: float) -> None:
        super().__init__()
        self.first = _bottleneck_act(block.conv[0], block.act[0], max_ratio)
        chain = _bottleneck_chain(block.conv[1])
        scale, shift = _bn_affine(block.act[1].norm)
        cin = scale.numel() - chain[-1].weight.shape[0]
        chain[-1] = _affine_after(chain[-1], scale[cin:], shift[cin:])
        self.second = LinearStack(chain, relu=True, max_ratio=max_ratio)
        self.in_channels = cin
        self.buffer = OutputBuffer()
        self.register_buffer("scale", scale[:cin].float().reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift[:cin].float().reshape(1, -1, 1, 1))

    pool: TensorPool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        h = self.second(a)
        give_back(self.pool, a)
        del a  # without a pool: freed before the output buffer is allocated (lower peak memory)
        dtype = torch.promote_types(x.dtype, h.dtype)  # autocast may leave x and h in different dtypes
        scale, shift = self.scale.to(dtype), self.shift.to(dtype)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return torch.cat([F.relu(torch.addcmul(shift, x, scale)), h.to(dtype)], dim=1)
        # One output buffer: the affine part is written straight into it (no cat of fresh copies).
        n, _, height, width = x.shape
        out = self.buffer.get((n, self.in_channels + h.shape[1], height, width), dtype, x)
        head = out[:, : self.in_channels]
        torch.addcmul(shift, x, scale, out=head)
        head.relu_()
        out[:, self.in_channels :].copy_(h)
        give_back(self.pool, h)
        return out


class FusedEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, max_ratio: float) -> None:
        super().__init__()
        self.initial = _bottleneck_act(encoder.initial_conv, encoder.initial_act, max_ratio)
        self.stages = nn.ModuleList([FusedResidual(stage, max_ratio) for stage in encoder.stages])

    pool: TensorPool | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottom features (the caller's to give back) and the skips (the stages' own buffers)."""
        x = self.initial(x)
        skips = []
        for stage in self.stages:
            skip = stage(x)
            give_back(self.pool, x)  # the initial conv's output or a pooled map
            skips.append(skip)
            x = _max_pool(skip, self.pool)
        return x, skips


def _max_pool(x: torch.Tensor, pool: TensorPool | None) -> torch.Tensor:
    """2x2 max pooling; on the CPU as three element-wise maxima into a kept tensor (3x faster)."""
    n, channels, height, width = x.shape
    if pool is None or height % 2 or width % 2 or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    out = pool.take((n, channels, height // 2, width // 2), x.dtype, x)
    # (N, H, W, C) memory viewed as (N, H/2, 2, W/2, 2, C): the 2x2 window is dims 2 and 4.
    window = x.permute(0, 2, 3, 1).reshape(n, height // 2, 2, width // 2, 2, channels)
    result = out.permute(0, 2, 3, 1)
    torch.maximum(window[:, :, 0, :, 0], window[:, :, 0, :, 1], out=result)
    torch.maximum(result, window[:, :, 1, :, 0], out=result)
    torch.maximum(result, window[:, :, 1, :, 1], out=result)
    return out


class FusedNeck(nn.Module):
    def __init__(self, neck: nn.Module, max_ratio: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_branch(b, max_ratio) for b in neck.branches])

    pool: TensorPool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        features = torch.cat(outputs, dim=1)
        give_back(self.pool, *outputs)
        return features


def _branch(branch: NeckBranch, max_ratio: float) -> ConvChain:
    pairs = zip(branch.conv, branch.act, strict=True)
    return ConvChain(*[conv for c, a in pairs for conv in _bottleneck_act(c, a, max_ratio)])


class FusedUp(nn.Module):
    """The decoder's 3x3 stride-2 transposed conv ('same': output exactly 2H x 2W) as four small convs.

    Output pixel (2m + py, 2n + px) sees input rows m - 1, m through kernel rows 2, 0 when py = 0 and
    row m through kernel row 1 when py = 1, likewise for columns. So each of the four output phases is
    an ordinary conv (2x2, 2x1, 1x2, 1x1: the transposed conv's 9 taps, no zero taps), written straight
    into the buffer that also holds the skip. oneDNN's transposed conv is 1.5-3x slower on CPU.
    """

    _TAPS = {0: (2, 0), 1: (1,)}  # phase -> kernel indices for input offsets (-1, 0) or (0,)

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        weight = conv.weight.detach()  # (cin, cout, 3, 3)
        self.out_channels = weight.shape[1]
        self.buffer = OutputBuffer()
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.phases = nn.ParameterList()
        for rows in self._TAPS.values():
            for cols in self._TAPS.values():
                phase = weight[:, :, list(rows)][:, :, :, list(cols)].transpose(0, 1).contiguous()
                self.phases.append(nn.Parameter(phase, requires_grad=False))

    def _phase(self, x: torch.Tensor, i: int) -> torch.Tensor:
        weight = self.phases[i]
        # Two taps look one row/column up or left: pad 1 on both sides and drop the extra last one.
        padding = [weight.shape[2] - 1, weight.shape[3] - 1]
        if _use_onednn(x):
            ones = [1, 1]
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, padding, ones, ones, 1, "none", [], "")
        else:
            y = F.conv2d(x, weight, self.bias, padding=padding)
        return y[..., : x.shape[2], : x.shape[3]]

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        n, _, height, width = x.shape
        phases = [self._phase(x, i) for i in range(4)]  # (py, px) = (0, 0), (0, 1), (1, 0), (1, 1)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            rows = [torch.stack(phases[2 * py : 2 * py + 2], dim=-1).flatten(-2) for py in range(2)]
            up = torch.stack(rows, dim=-2).flatten(-3, -2)
            return up if skip is None else torch.cat([skip, up.to(skip.dtype)], dim=1)
        skip_channels = 0 if skip is None else skip.shape[1]
        dtype = phases[0].dtype if skip is None else torch.promote_types(phases[0].dtype, skip.dtype)
        out = self.buffer.get((n, skip_channels + self.out_channels, 2 * height, 2 * width), dtype, x)
        if skip is not None:
            out[:, :skip_channels].copy_(skip)
        up = out[:, skip_channels:]
        for i, phase in enumerate(phases):
            up[..., i // 2 :: 2, i % 2 :: 2].copy_(phase)
        return out


class FusedDecoder(nn.Module):
    def __init__(self, decoder: Decoder, max_ratio: float) -> None:
        super().__init__()
        self.up = nn.ModuleList([FusedUp(up.conv) for up in decoder.up])
        self.stages = nn.ModuleList(
            [nn.Sequential(*[FusedResidual(b, max_ratio) for b in stage]) for stage in decoder.stages]
        )
        self.final = _bottleneck_act(decoder.final_conv, decoder.final_act, max_ratio)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``skips`` deepest first; the list is emptied as they are used, so each skip can be freed
        once it is copied into its stage's buffer (the full-resolution one is 2 * width channels)."""
        for up, stage in zip(self.up, self.stages, strict=True):
            x = up(x, None if skips is None else skips.pop(0))  # up writes [skip, upsampled]
            x = stage(x)  # the previous x is dropped first
        return self.final(x)


class FusedDoubleDecoderNet(nn.Module):
    """Inference-only equivalent of a :class:`DoubleDecoderNet` (same inputs, outputs, padding)."""

    pool: TensorPool | None = None

    def __init__(self, net: DoubleDecoderNet, max_ratio: float = 1.0) -> None:
        super().__init__()
        self.width = net.width
        self.outputs = net.outputs
        self.pad_mode = net.pad_mode
        self.channels_last = False
        self.encoder = FusedEncoder(net.encoder, max_ratio)
        self.neck = FusedNeck(net.neck, max_ratio)
        if self.outputs != "label":
            self.image_decoder = FusedDecoder(net.image_decoder, max_ratio)
            chain = [lin for block in net.image_head for lin in _bottleneck_chain(block)]
            self.image_head = LinearStack(chain, relu=False, max_ratio=max_ratio)
        if self.outputs != "image":
            self.label_decoder = FusedDecoder(net.label_decoder, max_ratio)
            head = net.label_head
            chain = _bottleneck_chain(head.conv) + [_lin(head.out)]
            chain[0] = _affine_before(chain[0], *_bn_affine(head.norm))
            self.label_head = LinearStack(chain, relu=False, max_ratio=max_ratio)

    budgets: tuple[BufferBudget, ...] = ()

    def set_kept_bytes(self, limit: int) -> None:
        """Cap the kept tensors (concatenation buffers and pool, half each); 0 keeps none from now on.
        Tensors kept already stay until their shape changes."""
        for budget in self.budgets:
            budget.limit = int(limit) // max(1, len(self.budgets))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2], x.shape[-1]
        x = pad_to_grid(x, self.pad_mode)  # the network's own padding to a multiple of 16
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        bottom, skips = self.encoder(x)
        del x  # the padded input
        features = self.neck(bottom)
        give_back(self.pool, bottom)
        del bottom
        outputs = []
        if self.outputs != "image":
            skips.reverse()  # deepest first; the decoder empties the list
            decoded = self.label_decoder(features, skips)
            head = self.label_head(decoded)
            label = torch.tanh(head)
            give_back(self.pool, decoded, head)
            del decoded, head  # not kept alive while the image decoder runs
            outputs.append(label[..., top : top + height, left : left + width])
        if self.outputs != "label":
            decoded = self.image_decoder(features)
            image = self.image_head(decoded)  # returned to the caller: never given back
            give_back(self.pool, decoded)
            outputs.append(image[..., top : top + height, left : left + width])
        give_back(self.pool, features)
        return outputs[0] if len(outputs) == 1 else (outputs[0], outputs[1])


@torch.no_grad()
def fuse_for_inference(
    net: DoubleDecoderNet,
    channels_last: bool = True,
    max_ratio: float = 1.0,
    onednn: bool = True,
    reuse_buffers: bool = False,
    buffer_limit: int = 4 << 30,
) -> FusedDoubleDecoderNet:
    """A fused, eval-only copy of ``net`` on ``net``'s device; ``net`` itself is not modified.

    Args:
        net: the network (any mode: BNs are folded with their running statistics).
        channels_last: weights and activations in channels_last (NHWC) memory format.
        max_ratio: also merge linear convs whose merged kernel costs up to this many times the separate
            convs' multiply-adds (1: only merges that save work; more was slower where measured).
        onednn: on CPU, run convs through oneDNN with the ReLU as a post-op.
        reuse_buffers: on CPU, keep tensors for reuse instead of allocating fresh ones (see
            ``scripts.network.buffers``): the concatenation buffers between calls, at most ``buffer_limit``
            bytes of them (the first ones a forward pass creates), and dead conv outputs in a pool
            of up to ``buffer_limit`` bytes more.
    """
    # Folding uses the running statistics: the copy is the eval-mode network whatever net's mode.
    fused = FusedDoubleDecoderNet(net, max_ratio=max_ratio).eval()
    device = next(net.parameters()).device
    fused = fused.to(device)
    budget = BufferBudget(buffer_limit) if reuse_buffers else None
    pool = TensorPool(BufferBudget(buffer_limit)) if reuse_buffers else None
    for module in fused.modules():
        if isinstance(module, FusedConv):
            module.onednn = onednn
        if isinstance(module, (FusedResidual, FusedUp)):
            module.buffer = OutputBuffer(budget)
        if isinstance(module, (FusedConv, ConvChain, FusedResidual, FusedEncoder, FusedNeck)):
            module.pool = pool
    fused.pool = pool
    fused.budgets = (budget, pool.budget) if reuse_buffers else ()
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        fused.channels_last = True
    return fused
