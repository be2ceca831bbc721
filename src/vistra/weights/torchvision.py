"""torchvision's vit_b_16 / vit_b_32 / vit_l_16 / vit_l_32 / vit_h_14 and swin_t / swin_s /
swin_b state dicts.

ViT: nn.MultiheadAttention's in_proj is already a fused q, k, v Linear, so only names change.
Swin: `features` is one Sequential of [patch embedding, stage 0, merging, stage 1, merging,
...], so stage s is `features.{2s+1}` and the merging before it `features.{2s}`.
"""

from __future__ import annotations

from .keymap import Tensors, rename

_ENCODER = r"encoder\.layers\.encoder_layer_(\d+)\."
_VIT_RULES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_ENCODER + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_ENCODER + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_ENCODER + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (_ENCODER + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    # mlp.0 / mlp.3 since torchvision 0.13; linear_1 / linear_2 before.
    (_ENCODER + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_ENCODER + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.pre_logits\.(weight|bias)", r"pre_logits.fc.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]
_SWIN_RULES = [
    (r"features\.0\.0\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"features\.0\.2\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"features\.(\d+)\.(\d+)\.mlp\.0\.(weight|bias)",
     lambda m: f"layers.{int(m[1]) // 2}.blocks.{m[2]}.mlp.fc1.{m[3]}"),
    (r"features\.(\d+)\.(\d+)\.mlp\.3\.(weight|bias)",
     lambda m: f"layers.{int(m[1]) // 2}.blocks.{m[2]}.mlp.fc2.{m[3]}"),
    (r"features\.(\d+)\.(\d+)\.(.+)",
     lambda m: f"layers.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}"),
    (r"features\.(\d+)\.(reduction|norm)\.(.+)",
     lambda m: f"layers.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"),
]


def describe(keys: set[str]) -> str | None:
    """The layout's name if these keys are torchvision's, else None."""
    if "conv_proj.weight" in keys and "class_token" in keys:
        return "torchvision ViT"
    if "features.0.0.weight" in keys:
        return "torchvision Swin"
    return None


def to_vistra(state: Tensors) -> Tensors:
    rules = _VIT_RULES if "class_token" in state else _SWIN_RULES
    return rename(state, rules)
