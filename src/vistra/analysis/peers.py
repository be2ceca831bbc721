"""HuggingFace transformers' equivalent of a vistra model, randomly initialised from a config
with the same numbers, for side-by-side benchmarks. transformers is optional: imported only
here, and only when a peer is asked for."""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import get_spec
from vistra.models.layers import to_2tuple


class HFClassifier(nn.Module):
    """Calls the transformers model with pixel_values and returns its logits, so a benchmark
    drives both libraries the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _swin_peer(transformers, arch, common: dict) -> nn.Module:
    config = transformers.SwinConfig(
        embed_dim=arch.embed_dim, depths=list(arch.depths), num_heads=list(arch.num_heads),
        window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, drop_path_rate=0.0,
        layer_norm_eps=1e-5, **common)
    return transformers.SwinForImageClassification(config)


def _vit_peer(transformers, arch, common: dict) -> nn.Module | None:
    if arch.hybrid_depths or arch.distilled or arch.representation_size or arch.conv_stem:
        return None
    config = transformers.ViTConfig(
        hidden_size=arch.embed_dim, num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        intermediate_size=int(arch.embed_dim * arch.mlp_ratio), layer_norm_eps=1e-6, **common)
    return transformers.ViTForImageClassification(config)


# Per family: the transformers model of a config, or None where transformers has none.
PEERS = {"vit": _vit_peer, "swin": _swin_peer}


def hf_peer(name: str, img_size: int | tuple[int, int] | None = None) -> HFClassifier:
    """The transformers model (ViTForImageClassification or SwinForImageClassification) with
    the numbers of vistra's `name`: widths, depths, heads, window, MLP ratio, qkv bias, the
    same LayerNorm eps (1e-6 ViT, 1e-5 Swin), no dropout and no stochastic depth."""
    try:
        import transformers
    except ImportError as err:
        raise ValueError("comparing with HuggingFace needs transformers: "
                         "pip install transformers") from err
    spec = get_spec(name)
    arch = spec.arch
    size = to_2tuple(img_size or arch.img_size)
    if size[0] != size[1]:
        raise ValueError(f"transformers' configs take one square image_size, got {size}")
    common = dict(image_size=size[0], patch_size=arch.patch_size, num_channels=arch.in_chans,
                  num_labels=arch.num_classes, qkv_bias=arch.qkv_bias, hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    make = PEERS.get(spec.family)
    peer = make(transformers, arch, common) if make is not None else None
    if peer is None:
        raise ValueError(f"{name} has no transformers equivalent here; compare a plain ViT "
                         "(vit_*_patch*_224) or a Swin (swin_*)")
    return HFClassifier(peer)
