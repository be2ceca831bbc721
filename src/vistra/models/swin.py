"""Swin Transformer (Liu et al. 2021): attention inside M x M windows, shifted every other
block, and patch merging between stages, so cost grows linearly with image area.

Tokens stay in a [B, H, W, C] map throughout; any image size works: the map is padded to a
multiple of the window inside a block and cropped after, patch merging pads odd sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import VistraModel, check_output_fmt, checkpoint_seq, feature_take_indices
from .layers import (
    Attention,
    ConvStem,
    DropPath,
    Mlp,
    check_image_batch,
    drop_path_rates,
    init_weights,
    to_2tuple,
    tracing,
)

MASK_VALUE = -100.0  # added to logits of token pairs from different regions, as the paper


@dataclass(frozen=True)
class SwinConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    conv_stem: tuple[int, ...] = ()  # widths of 3x3 convs replacing the patch conv (small images)


def relative_position_index(window: int) -> torch.Tensor:
    """[M*M, M*M] index into the (2M-1)^2 bias table:
    (r_i - r_j + M - 1) * (2M - 1) + (c_i - c_j + M - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, N, N]
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, nW, M*M, C], windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """[B, nW, M*M, C] -> [B, H, W, C]."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def window_order(H: int, W: int, window: int, shift: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cyclic shift, window partition and crop of SwinBlock as token indices, for doing
    them in one gather (vistra.accel does, with the indices kept per input size).

    `order` [Hp*Wp] takes the flattened map, padded to Hp x Wp (multiples of M), to its windows
    after rolling by -shift; `restore` [H*W] takes those windows back to the real tokens,
    rolled back and cropped."""
    Hp, Wp = H - H % -window, W - W % -window
    grid = torch.arange(Hp * Wp, device=device).view(1, Hp, Wp, 1)
    order = window_partition(torch.roll(grid, (-shift, -shift), (1, 2)), window).flatten()
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=device)
    return order, position.view(Hp, Wp)[:H, :W].flatten()


def shift_window_mask(H: int, W: int, window: int, shift: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """[nW, M*M, M*M] additive mask for the cyclically shifted map of H x W (multiples of M):
    0 where two tokens of a window came from the same region, MASK_VALUE elsewhere.
    Regions: the slices [0, -M), [-M, -shift), [-shift, end) on each axis."""
    region = torch.zeros(H, W, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[rows, cols] = label
            label += 1
    ids = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
    same = ids[:, :, None] == ids[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, MASK_VALUE)


class PatchEmbed(nn.Module):
    """4x4 patches (48 values for RGB) linearly embedded: Conv2d k=s=4, then LayerNorm.
    [B, 3, H, W] -> [B, H/4, W/4, C]; sizes that 4 does not divide are padded. With
    `conv_stem`, 3x3 convs of that total stride and a 1x1 conv replace the patch conv."""

    def __init__(self, patch_size: int, in_chans: int, dim: int,
                 conv_stem: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.backbone = ConvStem(in_chans, tuple(conv_stem), patch_size) if conv_stem else None
        if self.backbone is not None:
            self.proj = nn.Conv2d(self.backbone.out_channels, dim, 1)
        else:
            self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w or tracing():  # a graph pads by amounts computed from its input
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.backbone is not None:
            x = self.backbone(x)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [B, C, H/p, W/p] -> [B, H/p, W/p, C]


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: concatenate the four sub-grids
    x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], LayerNorm, Linear(4C, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2 or tracing():
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # [B, H/2, row parity, W/2, column parity, C] read column parity first: one copy in
        # the paper's order, a third of the time of concatenating four strided slices.
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(B, H // 2, W // 2, 4 * C)))


class WindowAttention(Attention):
    """Multi-head attention within each window plus a learned relative position bias:
    softmax(QK^T / sqrt(d) + B + mask) V, on windows x [B, nW, M*M, C]."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool,
                 qk_scale: float | None, attn_drop: float, proj_drop: float) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.window_size = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] gathered from the table."""
        N = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1)

    def position_bias(self) -> torch.Tensor:
        return self.relative_position_bias()


class SwinBlock(nn.Module):
    """Pre-norm block: W-MSA when shift is 0, SW-MSA (cyclic shift + mask) otherwise.
    x = x + DropPath(SW-MSA(LN(x))); x = x + DropPath(MLP(LN(x))), on maps [B, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, cfg: SwinConfig,
                 drop_path: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, cfg.qkv_bias, cfg.qk_scale,
                                    cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path2 = DropPath(drop_path)

    def shifted_window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Pad to whole windows, roll by -shift, attend within each window (regions that the
        roll brought together masked apart), roll back, crop: [B, H, W, C] -> same."""
        B, H, W, C = x.shape
        M = self.window_size
        # A map no larger than the window is attended as one window, without a shift.
        shift = self.shift_size if min(H, W) > M else 0
        pad_h, pad_w = -H % M, -W % M
        if pad_h or pad_w or tracing():  # a graph pads by amounts computed from its input
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # [B, Hp, Wp, C]
        Hp, Wp = H + pad_h, W + pad_w
        mask = None
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(1, 2))
            mask = shift_window_mask(Hp, Wp, M, shift, x.device)  # [nW, M*M, M*M]
        windows = self.attn(window_partition(x, M), mask)  # [B, nW, M*M, C]
        x = window_reverse(windows, M, Hp, Wp)  # [B, Hp, Wp, C]
        if shift:
            x = torch.roll(x, (shift, shift), dims=(1, 2))
        if pad_h or pad_w or tracing():
            x = x[:, :H, :W].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.shifted_window_attention(self.norm1(x)))  # [B, H, W, C]
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class SwinStage(nn.Module):
    """Optional patch merging (every stage but the first), then pairs of W-MSA / SW-MSA."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window: int,
                 shift: int, downsample: bool, cfg: SwinConfig, drop_paths: list[float]) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim) if downsample else None
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else shift, cfg, drop_paths[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return checkpoint_seq(self.blocks, x, self.grad_checkpointing)


class SwinTransformer(VistraModel):
    family = "swin"
    no_weight_decay_names = ("relative_position_bias_table",)

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__(cfg)
        self.img_size = to_2tuple(cfg.img_size)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.conv_stem)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        res = [-(-s // cfg.patch_size) for s in self.img_size]
        stages, dim = [], cfg.embed_dim
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            in_dim = dim
            if i > 0:
                res, dim = [-(-r // 2) for r in res], dim * 2
            # As the paper: a stage whose map is no larger than the window gets one window
            # covering it, and no shift.
            window = min(cfg.window_size, *res)
            shift = 0 if min(res) <= cfg.window_size else cfg.window_size // 2
            start = sum(cfg.depths[:i])
            stages.append(SwinStage(in_dim, dim, depth, heads, window, shift, i > 0, cfg,
                                    dpr[start:start + depth]))
        self.layers = nn.Sequential(*stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(cfg.num_classes)
        self.apply(init_weights)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    @property
    def num_classes(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for `num_classes`; 0 makes the model return pooled features. The
        pooling is the mean over the map (global_pool "avg")."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"Swin pools by averaging the map (global_pool='avg'), "
                             f"got global_pool={global_pool!r}")
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        init_weights(self.head)
        self._set_num_classes(num_classes)

    def layer_ids(self) -> dict[str, int]:
        """BEiT's depths with the blocks counted across the stages: 0 the patch embedding,
        k + 1 the k-th block, a patch merging that of the block before it (as SimMIM's
        fine-tuning), the highest the final norm and the head."""
        starts = [sum(self.cfg.depths[:i]) for i in range(len(self.cfg.depths) + 1)]
        top = starts[-1] + 1

        def layer(name: str) -> int:
            parts = name.split(".")
            if parts[0] == "patch_embed":
                return 0
            if parts[0] != "layers":
                return top
            stage = int(parts[1])
            if parts[2] == "downsample":
                return starts[stage]
            return starts[stage] + int(parts[3]) + 1  # layers.<stage>.blocks.<block>...

        return {name: layer(name) for name, _ in self.named_parameters()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @property
    def feature_info(self) -> list[dict]:
        """Each stage's output map: channels, reduction, module."""
        return [dict(num_chs=self.cfg.embed_dim * 2**i, reduction=self.cfg.patch_size * 2**i,
                     module=f"layers.{i}") for i in range(len(self.layers))]

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The output maps of the stages at `indices` (timm's convention: None all, n the last
        n), [B, C_i, H/(4*2^i), W/(4*2^i)] (or NHWC); `norm` applies the final LayerNorm to
        the last stage's map, as timm. Returns the maps, or with intermediates_only False
        (normalised final map [B, h, w, C], maps) as timm."""
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.layers), indices)
        check_image_batch(x, self.cfg.in_chans)
        x = self.pos_drop(self.patch_embed(x))
        last = take[-1] if intermediates_only else len(self.layers) - 1
        maps = []
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage(x)  # [B, H_i, W_i, C_i]
            if i in take:
                y = self.norm(x) if norm and i == len(self.layers) - 1 else x
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        return maps if intermediates_only else (self.norm(x), maps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normalised feature map [B, H/32, W/32, 8C] (sizes rounded up)."""
        check_image_batch(x, self.cfg.in_chans)
        x = self.layers(self.pos_drop(self.patch_embed(x)))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
