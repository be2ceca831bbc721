"""HuggingFace transformers' equivalent of a vistra model, randomly initialised from a config
with the same numbers, for side-by-side benchmarks. transformers is optional: imported only
here, and only when a peer is asked for."""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import SwinConfig, ViTConfig, get_spec
from vistra.models.vit import to_2tuple


class HFClassifier(nn.Module):
    """Calls the transformers model with pixel_values and returns its logits, so a benchmark
    drives both libraries the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_peer(name: str, img_size: int | tuple[int, int] | None = None) -> HFClassifier:
    """The transformers model (ViTForImageClassification or SwinForImageClassification) with
    the numbers of vistra's `name`: widths, depths, heads, window, MLP ratio, qkv bias, the
    same LayerNorm eps (1e-6 ViT, 1e-5 Swin), no dropout and no stochastic depth."""
    try:
        import transformers
    except ImportError as err:
        raise ValueError("comparing with HuggingFace needs transformers: "
                         "pip install transformers") from err
    arch = get_spec(name).arch
    size = to_2tuple(img_size or arch.img_size)
    if size[0] != size[1]:
        raise ValueError(f"transformers' configs take one square image_size, got {size}")
    common = dict(image_size=size[0], patch_size=arch.patch_size, num_channels=arch.in_chans,
                  num_labels=arch.num_classes, qkv_bias=arch.qkv_bias, hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if isinstance(arch, SwinConfig):
        config = transformers.SwinConfig(
            embed_dim=arch.embed_dim, depths=list(arch.depths), num_heads=list(arch.num_heads),
            window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, drop_path_rate=0.0,
            layer_norm_eps=1e-5, **common)
        return HFClassifier(transformers.SwinForImageClassification(config))
    if isinstance(arch, ViTConfig) and not (arch.hybrid_depths or arch.distilled
                                            or arch.representation_size or arch.conv_stem):
        config = transformers.ViTConfig(
            hidden_size=arch.embed_dim, num_hidden_layers=arch.depth,
            num_attention_heads=arch.num_heads,
            intermediate_size=int(arch.embed_dim * arch.mlp_ratio), layer_norm_eps=1e-6,
            **common)
        return HFClassifier(transformers.ViTForImageClassification(config))
    raise ValueError(f"{name} has no transformers equivalent here; compare a plain ViT "
                     "(vit_*_patch*_224) or a Swin (swin_*)")
