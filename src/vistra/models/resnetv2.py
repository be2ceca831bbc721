"""ResNet-v2-style backbone of the R50+ViT hybrid: weight-standardised convs, GroupNorm.

Google's released hybrid (vit_jax, Flax) was trained with TensorFlow "SAME" padding, which pads
strided convolutions and pooling asymmetrically (more on the bottom/right), kernels
standardised as (w - mean) / (std + 1e-5) and GroupNorm eps 1e-6 (Flax's default). We compute
exactly that, or those weights give wrong outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one spatial axis."""
    out = -(-size // stride)  # ceil in integers: a traced size stays traced (ONNX export)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Conv2d whose kernel is standardised (zero mean, unit standard deviation per output
    channel) on every forward, with TF SAME padding. Weight standardisation lets GroupNorm
    replace BatchNorm without losing accuracy at small per-device batches.

    The eps is added to the standard deviation, not the variance, as in Google's
    `weight_standardize`: the released weights were trained with exactly this."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
                 eps: float = 1e-5) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, correction=0)
        w = (w - mean) / (std + self.eps)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, self.bias, self.stride, 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # Flax's default, which Google's weights use


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (carries the stride) - 1x1 expand, each conv followed by GroupNorm;
    ReLU after the residual sum (the non-pre-activation variant Google's hybrid uses)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        mid = out_chs // 4
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential()
            self.downsample.add_module("conv", StdConv2dSame(in_chs, out_chs, 1, stride=stride))
            self.downsample.add_module("norm", group_norm(out_chs))
        self.conv1 = StdConv2dSame(in_chs, mid, 1)
        self.norm1 = group_norm(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = group_norm(mid)
        self.conv3 = StdConv2dSame(mid, out_chs, 1)
        self.norm3 = group_norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stem(nn.Module):
    """7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool: 224 -> 56."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, width, 7, stride=2)
        self.norm = group_norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """Stem and stages; with depths (3, 4, 9) the output is [B, 1024, H/16, W/16]."""

    def __init__(self, depths: tuple[int, ...] = (3, 4, 9), in_chans: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.stem = Stem(in_chans, width)
        chs = [256 * 2**i for i in range(len(depths))]
        self.stages = nn.Sequential(*[
            ResNetStage(width if i == 0 else chs[i - 1], chs[i], d, 1 if i == 0 else 2)
            for i, d in enumerate(depths)
        ])
        self.out_channels = chs[-1]
        self.reduction = 4 * 2 ** (len(depths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
