"""ViT's and Swin's equivalents in other libraries, declared by their families
(models/family.py): transformers' model with a config's numbers (for side-by-side benchmarks)
and timm's names for the weights of each variant on the HuggingFace hub.

transformers is never imported here: `vistra.analysis.peers` imports it when a peer is asked
for and passes it in.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .swin import SwinConfig
from .vit import ViTConfig


def _hf_common(arch: ViTConfig | SwinConfig, image_size: int) -> dict:
    """The config fields transformers' ViT and Swin share: no dropout, GELU."""
    return dict(image_size=image_size, patch_size=arch.patch_size, num_channels=arch.in_chans,
                num_labels=arch.num_classes, qkv_bias=arch.qkv_bias, hidden_act="gelu",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def vit_hf_peer(transformers: Any, arch: ViTConfig, image_size: int) -> nn.Module | None:
    """ViTForImageClassification with LayerNorm eps 1e-6, for a plain ViT only: transformers
    has no R50 hybrid, distillation token, pre-logits layer or convolutional stem."""
    if arch.hybrid_depths or arch.distilled or arch.representation_size or arch.conv_stem:
        return None
    config = transformers.ViTConfig(
        hidden_size=arch.embed_dim, num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        intermediate_size=int(arch.embed_dim * arch.mlp_ratio), layer_norm_eps=1e-6,
        **_hf_common(arch, image_size))
    return transformers.ViTForImageClassification(config)


def swin_hf_peer(transformers: Any, arch: SwinConfig, image_size: int) -> nn.Module:
    """SwinForImageClassification with LayerNorm eps 1e-5 and no stochastic depth."""
    config = transformers.SwinConfig(
        embed_dim=arch.embed_dim, depths=list(arch.depths), num_heads=list(arch.num_heads),
        window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, drop_path_rate=0.0,
        layer_norm_eps=1e-5, **_hf_common(arch, image_size))
    return transformers.SwinForImageClassification(config)


def _tagged(tags: dict[str, str]) -> dict[str, str]:
    return {name: f"{name}.{tag}" for name, tag in tags.items()}


# timm's default pretrained tag (the first listed in its default_cfgs) of each name vistra
# registers, read from timm/models/{vision_transformer,vision_transformer_hybrid,deit,
# swin_transformer}.py; the `_in21k` / `_in22k` names are timm's deprecated aliases, mapped
# as timm maps them. vit_huge_patch14_224 is left out: timm's default for it is untrained.
VIT_TIMM_NAMES = _tagged({
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "augreg2_in21k_ft_in1k",
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",
    "vit_large_patch32_224": "orig_in21k",
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "orig_in21k_ft_in1k",
    "deit_tiny_patch16_224": "fb_in1k",
    "deit_small_patch16_224": "fb_in1k",
    "deit_base_patch16_224": "fb_in1k",
    "deit_tiny_distilled_patch16_224": "fb_in1k",
    "deit_small_distilled_patch16_224": "fb_in1k",
    "deit_base_distilled_patch16_224": "fb_in1k",
    "vit_base_r50_s16_224": "orig_in21k",
    "vit_base_r50_s16_384": "orig_in21k_ft_in1k",
}) | {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch32_224_in21k": "vit_base_patch32_224.augreg_in21k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.augreg_in21k",
    "vit_large_patch32_224_in21k": "vit_large_patch32_224.orig_in21k",
    "vit_huge_patch14_224_in21k": "vit_huge_patch14_224.orig_in21k",
    "vit_base_r50_s16_224_in21k": "vit_base_r50_s16_224.orig_in21k",
}
SWIN_TIMM_NAMES = _tagged({
    "swin_tiny_patch4_window7_224": "ms_in1k",
    "swin_small_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_base_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_large_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_base_patch4_window12_384": "ms_in22k_ft_in1k",
    "swin_large_patch4_window12_384": "ms_in22k_ft_in1k",
}) | {
    "swin_base_patch4_window7_224_in22k": "swin_base_patch4_window7_224.ms_in22k",
    "swin_base_patch4_window12_384_in22k": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window7_224_in22k": "swin_large_patch4_window7_224.ms_in22k",
    "swin_large_patch4_window12_384_in22k": "swin_large_patch4_window12_384.ms_in22k",
}
