"""Google's original ViT and R50+ViT .npz files (google-research/vision_transformer): the Flax
parameter tree flattened to '/'-joined names.

Flax stores conv kernels HWIO and Dense kernels [in, out] (PyTorch: OIHW and [out, in]);
attention keeps heads apart: query / key / value kernels [D, heads, head_dim] with biases
[heads, head_dim], and the output kernel [heads, head_dim, D]. Names follow Flax's
auto-numbering: in a block LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3.
"""

from __future__ import annotations

import torch

from .keymap import Tensors, fuse_qkv, rename

# Checkpoints saved with their optimizer state keep the parameters under one of these.
_ROOTS = ("opt/target/", "params/")
_BLOCK = r"Transformer/encoderblock_(\d+)/"
_HYBRID = "patch_embed.backbone."
_UNIT = r"block(\d+)/unit(\d+)/"
_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _unit(m) -> str:
    return f"{_HYBRID}stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}."


_RULES = [
    (r"cls", "cls_token"),
    (r"embedding/(kernel|bias)", lambda m: f"patch_embed.proj.{_PARAM[m[1]]}"),
    (r"Transformer/posembed_input/pos_embedding", "pos_embed"),
    (r"Transformer/encoder_norm/(scale|bias)", lambda m: f"norm.{_PARAM[m[1]]}"),
    (_BLOCK + r"LayerNorm_0/(scale|bias)", lambda m: f"blocks.{m[1]}.norm1.{_PARAM[m[2]]}"),
    (_BLOCK + r"LayerNorm_2/(scale|bias)", lambda m: f"blocks.{m[1]}.norm2.{_PARAM[m[2]]}"),
    (_BLOCK + r"MultiHeadDotProductAttention_1/(query|key|value)/(kernel|bias)",
     lambda m: f"blocks.{m[1]}.attn.{m[2][0]}.{_PARAM[m[3]]}"),
    (_BLOCK + r"MultiHeadDotProductAttention_1/out/(kernel|bias)",
     lambda m: f"blocks.{m[1]}.attn.proj.{_PARAM[m[2]]}"),
    (_BLOCK + r"MlpBlock_3/Dense_([01])/(kernel|bias)",
     lambda m: f"blocks.{m[1]}.mlp.fc{int(m[2]) + 1}.{_PARAM[m[3]]}"),
    (r"pre_logits/(kernel|bias)", lambda m: f"pre_logits.fc.{_PARAM[m[1]]}"),
    (r"head/(kernel|bias)", lambda m: f"head.{_PARAM[m[1]]}"),
    (r"conv_root/kernel", _HYBRID + "stem.conv.weight"),
    (r"gn_root/(scale|bias)", lambda m: f"{_HYBRID}stem.norm.{_PARAM[m[1]]}"),
    (_UNIT + r"conv([123])/kernel", lambda m: f"{_unit(m)}conv{m[3]}.weight"),
    (_UNIT + r"gn([123])/(scale|bias)", lambda m: f"{_unit(m)}norm{m[3]}.{_PARAM[m[4]]}"),
    (_UNIT + r"conv_proj/kernel", lambda m: f"{_unit(m)}downsample.conv.weight"),
    (_UNIT + r"gn_proj/(scale|bias)", lambda m: f"{_unit(m)}downsample.norm.{_PARAM[m[3]]}"),
]


def describe(keys: set[str]) -> str | None:
    """The layout's name if these keys are Google's, else None."""
    if any(k.endswith("Transformer/encoder_norm/scale") for k in keys):
        return "Google ViT .npz"
    return None


def _to_torch_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """One Flax array in PyTorch's layout, decided by its name and rank."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("scale", "bias"):  # norms, Dense and attention biases: a flat vector
        return value.reshape(-1)
    if leaf != "kernel":  # cls token, position embedding: already [1, N, D]
        return value
    if value.ndim == 4:  # conv HWIO -> OIHW
        return value.permute(3, 2, 0, 1)
    if value.ndim == 3 and "/out/" in name:  # [heads, head_dim, D] -> [D, heads * head_dim]
        return value.reshape(-1, value.shape[-1]).T
    if value.ndim == 3:  # query / key / value [D, heads, head_dim] -> [heads * head_dim, D]
        return value.reshape(value.shape[0], -1).T
    return value.T  # Dense [in, out] -> [out, in]


def to_vistra(arrays: Tensors) -> Tensors:
    for root in _ROOTS:
        if all(k.startswith(root) for k in arrays):
            arrays = {k[len(root):]: v for k, v in arrays.items()}
    torch_layout = {k: _to_torch_layout(k, v).contiguous() for k, v in arrays.items()}
    return fuse_qkv(rename(torch_layout, _RULES))
