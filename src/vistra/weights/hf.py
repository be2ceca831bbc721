"""HuggingFace transformers checkpoints of ViT, DeiT and Swin (the *ForImageClassification
heads, DeiT's WithTeacher heads, or the bare models), keys with or without the `vit.` /
`deit.` / `swin.` prefix.

HuggingFace keeps separate query / key / value Linears, fused here into vistra's qkv. Its
Swin, like the authors', merges patches at the end of a stage: the index moves up by one.
The ViTModel pooler (Linear + Tanh on the class token) is the pre-logits layer.
"""

from __future__ import annotations

import re

from .keymap import Tensors, fuse_qkv, rename

_PREFIX = re.compile(r"(?:vit|deit|swin)\.")
_QKV = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}
# Files keep the classic names; transformers 5 models hold others in memory (q_proj, mlp.fc1,
# `layers.i` for ViT), which a torch.save of their state_dict() writes. Both are read.
_Q_K_V = r"(?:attention\.(?:attention|self)\.(query|key|value)|attention\.([qkv])_proj)"
_OUT = r"(?:attention\.output\.dense|attention\.o_proj)"
_FC1 = r"(?:intermediate\.dense|mlp\.fc1)"
_FC2 = r"(?:output\.dense|mlp\.fc2)"
_VIT_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_VIT_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_VIT_LAYER + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_VIT_LAYER + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_VIT_LAYER + _Q_K_V + r"\.(weight|bias)",
     lambda m: f"blocks.{m[1]}.attn.{_QKV[m[2] or m[3]]}.{m[4]}"),
    (_VIT_LAYER + _OUT + r"\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_VIT_LAYER + _FC1 + r"\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_VIT_LAYER + _FC2 + r"\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pre_logits.fc.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
]
_SWIN_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (_SWIN_BLOCK + r"layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (_SWIN_BLOCK + r"layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (_SWIN_BLOCK + _Q_K_V + r"\.(weight|bias)",
     lambda m: f"layers.{m[1]}.blocks.{m[2]}.attn.{_QKV[m[3] or m[4]]}.{m[5]}"),
    (_SWIN_BLOCK + r"attention\.(?:self|relative_position_bias)\.(relative_position_\w+)",
     r"layers.\1.blocks.\2.attn.\3"),
    (_SWIN_BLOCK + _OUT + r"\.(weight|bias)", r"layers.\1.blocks.\2.attn.proj.\3"),
    (_SWIN_BLOCK + _FC1 + r"\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (_SWIN_BLOCK + _FC2 + r"\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"encoder\.layers\.(\d+)\.downsample\.(.+)",
     lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]


def _unprefixed(keys) -> list[str]:
    return [_PREFIX.sub("", k, count=1) if _PREFIX.match(k) else k for k in keys]


def describe(keys: set[str]) -> str | None:
    """The layout's name if these keys are HuggingFace's, else None."""
    bare = set(_unprefixed(keys))
    if "embeddings.patch_embeddings.projection.weight" not in bare:
        return None
    if "embeddings.norm.weight" in bare:
        return "HuggingFace Swin"
    return "HuggingFace DeiT" if "embeddings.distillation_token" in bare else "HuggingFace ViT"


def to_vistra(state: Tensors) -> Tensors:
    bare = dict(zip(_unprefixed(state), state.values(), strict=True))
    rules = _SWIN_RULES if "embeddings.norm.weight" in bare else _VIT_RULES
    return fuse_qkv(rename(bare, rules))
