"""Vision Transformer (Dosovitskiy et al. 2020), DeiT (Touvron et al. 2021) and R50 hybrid.

image [B, 3, H, W] -> patches [B, N, D] -> prepend class (+ distillation) token -> add
position embedding -> pre-norm encoder blocks -> LayerNorm -> class token -> head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
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
from .resample import resample_pos_embed
from .resnetv2 import ResNetV2


@dataclass(frozen=True)
class ViTConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None  # None: head_dim ** -0.5
    representation_size: int | None = None  # pre-logits Linear + Tanh (ImageNet-21k weights)
    distilled: bool = False  # DeiT: a distillation token and a second head
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    hybrid_depths: tuple[int, ...] | None = None  # ResNet-v2 stages before the patch embedding
    dynamic_img_size: bool = False  # resample position embeddings per forward for any size
    conv_stem: tuple[int, ...] = ()  # widths of 3x3 convs replacing the patch conv (small images)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch: [B, C, H, W] -> [B, (H/p)(W/p), D]. In the hybrid,
    a ResNet-v2 backbone runs first and the "patch" is one 1x1 position of its feature map;
    with `conv_stem` a few 3x3 convs do the same job on small images."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.backbone: nn.Module | None = None
        if cfg.hybrid_depths is not None and cfg.conv_stem:
            raise ValueError("choose hybrid_depths or conv_stem, not both")
        if cfg.hybrid_depths is not None:
            self.backbone = ResNetV2(cfg.hybrid_depths, cfg.in_chans)
        elif cfg.conv_stem:
            self.backbone = ConvStem(cfg.in_chans, tuple(cfg.conv_stem), cfg.patch_size)
        if self.backbone is not None:
            self.proj = nn.Conv2d(self.backbone.out_channels, cfg.embed_dim, 1)
            self.reduction = self.backbone.reduction
        else:
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
            self.reduction = cfg.patch_size

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.reduction, img_size[1] // self.reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)  # [B, C', H/p, W/p]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, H/p, W/p] -> [B, N, D]


class Block(nn.Module):
    """x = x + DropPath(Attn(LN(x))); x = x + DropPath(MLP(LN(x)))."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_scale,
                              cfg.attn_drop_rate, cfg.drop_rate)  # over all N tokens
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # [B, N, D]
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PreLogits(nn.Module):
    """Linear(D, D) + Tanh of the ImageNet-21k checkpoints ("representation size")."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class DistilledLogits(NamedTuple):
    """A distilled DeiT's output in training: the class head's and the distillation head's
    logits, each [B, classes] (in eval the model returns their mean, one tensor)."""

    logits: torch.Tensor
    logits_dist: torch.Tensor


class VisionTransformer(VistraModel):
    family = "vit"
    head_modules = ("head", "head_dist", "pre_logits")
    no_weight_decay_names = ("cls_token", "dist_token", "pos_embed")
    default_out_indices = 3  # features_only: the last three blocks, as timm

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg)
        self.img_size = to_2tuple(cfg.img_size)
        self.patch_embed = PatchEmbed(cfg)
        for side in self.img_size:
            if side % self.patch_embed.reduction:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by the patch size "
                    f"{self.patch_embed.reduction}; use a multiple of {self.patch_embed.reduction}"
                )
        self.grid_size = self.patch_embed.grid_size(self.img_size)
        self.num_prefix_tokens = 2 if cfg.distilled else 1
        dim = cfg.embed_dim
        self.num_features = cfg.representation_size or dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.Sequential(*[
            Block(cfg, dp) for dp in drop_path_rates(cfg.drop_path_rate, cfg.depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pre_logits = (PreLogits(dim, cfg.representation_size)
                           if cfg.representation_size else None)
        self.head: nn.Module = nn.Identity()
        self.head_dist: nn.Module | None = None
        self.reset_classifier(cfg.num_classes)
        self.apply(init_weights)
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def num_classes(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The head; for the distilled model (head, head_dist), as timm."""
        return (self.head, self.head_dist) if self.cfg.distilled else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head (two for the distilled model) for `num_classes`; 0 gives features.
        The class token is the only pooling (global_pool "token")."""
        if global_pool not in (None, "token"):
            raise ValueError(f"this ViT pools with its class token (global_pool='token'), "
                             f"got global_pool={global_pool!r}")
        def make() -> nn.Module:
            if not num_classes:
                return nn.Identity()
            head = nn.Linear(self.num_features, num_classes)
            init_weights(head)
            return head
        self.head = make()
        if self.cfg.distilled:
            self.head_dist = make()
        self._set_num_classes(num_classes)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        # A traced graph (ONNX export) resamples always, so its size follows the input's.
        if grid != self.grid_size or tracing():
            if grid != self.grid_size and not self.cfg.dynamic_img_size:
                size = (grid[0] * self.patch_embed.reduction, grid[1] * self.patch_embed.reduction)
                raise ValueError(
                    f"input of {size[0]}x{size[1]} pixels does not match the model's img_size "
                    f"{self.img_size[0]}x{self.img_size[1]}; resize the input, create the model "
                    f"with img_size={size[0]}, or with dynamic_img_size=True"
                )
            pos_embed = resample_pos_embed(pos_embed, grid, self.num_prefix_tokens, self.grid_size)
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        return self.pos_drop(torch.cat(tokens + [x], dim=1) + pos_embed)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C, H, W] -> tokens with position embedding [B, prefix + N, D], and the grid."""
        check_image_batch(x, self.cfg.in_chans)
        r = self.patch_embed.reduction
        if x.shape[-2] % r or x.shape[-1] % r:
            raise ValueError(
                f"input height and width {tuple(x.shape[-2:])} must be multiples of the patch "
                f"size {r}"
            )
        grid = (x.shape[-2] // r, x.shape[-1] // r)
        return self._pos_embed(self.patch_embed(x), grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normalised tokens [B, prefix + N, D]."""
        x, _ = self._embed(x)
        return self.norm(checkpoint_seq(self.blocks, x, self.grad_checkpointing))

    @property
    def feature_info(self) -> list[dict]:
        """Each block's output as a feature map: channels, reduction, module."""
        return [dict(num_chs=self.cfg.embed_dim, reduction=self.patch_embed.reduction,
                     module=f"blocks.{i}") for i in range(len(self.blocks))]

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The outputs of the blocks at `indices` (timm's convention: None all, n the last n)
        as maps: prefix tokens removed, [B, D, H/p, W/p] (or [B, H/p, W/p, D] with "NHWC");
        `norm` passes each through the final LayerNorm. Returns the maps, or with
        intermediates_only False (final normalised tokens, maps) as timm."""
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.blocks), indices)
        x, (h, w) = self._embed(x)
        last = take[-1] if intermediates_only else len(self.blocks) - 1
        maps = []
        for i, block in enumerate(self.blocks[:last + 1]):
            x = block(x)
            if i in take:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
                y = y.reshape(y.shape[0], h, w, -1)  # [B, H/p, W/p, D]
                maps.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        return maps if intermediates_only else (self.norm(x), maps)

    def forward_head(self, x: torch.Tensor,
                     pre_logits: bool = False) -> torch.Tensor | DistilledLogits:
        """Class token (and distillation token) -> logits. In training the distilled model
        returns both heads' logits; in eval their mean."""
        cls = x[:, 0]
        if self.pre_logits is not None:
            cls = self.pre_logits(cls)
        if not self.cfg.distilled:
            return cls if pre_logits else self.head(cls)
        dist = x[:, 1]
        if pre_logits:
            return (cls + dist) / 2
        logits, logits_dist = self.head(cls), self.head_dist(dist)
        if self.training:
            return DistilledLogits(logits, logits_dist)
        return (logits + logits_dist) / 2

    def forward_heads(self, x: torch.Tensor) -> DistilledLogits:
        """[B, C, H, W] -> a distilled model's two heads' logits, in eval mode too (where
        forward returns their mean): to see what each head has learnt."""
        if not self.cfg.distilled:
            raise ValueError(f"{self.name} has one head; forward_heads is for distilled models")
        x = self.forward_features(x)
        cls = x[:, 0] if self.pre_logits is None else self.pre_logits(x[:, 0])
        return DistilledLogits(self.head(cls), self.head_dist(x[:, 1]))

    def layer_ids(self) -> dict[str, int]:
        """BEiT's depths: 0 the patch embedding, tokens and position embedding, i + 1 block
        i, depth + 1 the final norm and the head(s)."""
        top = len(self.blocks) + 1

        def layer(name: str) -> int:
            first, _, rest = name.partition(".")
            if first == "blocks":
                return int(rest.partition(".")[0]) + 1
            return 0 if first in ("patch_embed", "cls_token", "dist_token", "pos_embed") else top

        return {name: layer(name) for name, _ in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor | DistilledLogits:
        """Logits [B, classes]; a distilled model in training: DistilledLogits."""
        return self.forward_head(self.forward_features(x))
