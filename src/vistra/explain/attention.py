"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted rollout (Chefer et al.,
ICCV 2021 "Generic Attention-model Explainability") for ViT, DeiT and the R50 hybrid.

Both read the attention weights through `capture_attention`, so the model's fused attention
stays its normal path and the explicit one runs only here. The gradient of the target score
with respect to each attention matrix A (heads, N x N) is not taken from A itself (the
recorded weights are detached copies) but from the attention output O = A V, whose gradient
gives dS/dA = dS/dO V^T exactly: forward hooks on the block's `qkv` (for V) and `proj` (for O)
collect both, outside the model's code.

Prefix tokens: the map is the class token's row of the rollout over the patch tokens. A
distilled DeiT averages its two heads in evaluation, so its map is the mean of the class
and distillation tokens' rows.
"""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import VisionTransformer, capture_attention
from vistra.models.layers import Attention

from .generic import token_stride


def _patch_grid(model: VisionTransformer, x: torch.Tensor) -> tuple[int, int]:
    r = token_stride(model, x)
    return x.shape[-2] // r, x.shape[-1] // r


def _read_prefix_rows(relevance: torch.Tensor, model: VisionTransformer,
                      grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, N] token-to-token relevance -> [B, gh, gw]: the prefix tokens' mean row over
    the patch tokens."""
    p = model.num_prefix_tokens
    return relevance[:, :p, p:].mean(1).reshape(-1, *grid)


def rollout(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic rollout: R = prod over layers of rownorm((mean_heads A + I) / 2).

    x [B, C, H, W] -> (map over the patch grid [B, gh, gw], logits [B, K])."""
    with torch.no_grad(), capture_attention(model) as modules:
        logits = model(x)
        layers = [m.recorded for m in modules]
    eye = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype, device=layers[0].device)
    relevance = eye.expand(x.shape[0], -1, -1)
    for attn in layers:
        a = (attn.mean(1) + eye) / 2  # [B, N, N]
        a = a / a.sum(-1, keepdim=True)
        relevance = a @ relevance
    return _read_prefix_rows(relevance, model, _patch_grid(model, x)), logits


def grad_rollout(model: VisionTransformer, x: torch.Tensor, target: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer et al.'s rule for self-attention: R = I, then per layer
    R = R + mean_heads(clamp(dS/dA * A, min=0)) @ R, S the target class's logit.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, gh, gw], logits)."""
    blocks = [m for m in model.modules() if isinstance(m, Attention)]  # forward order
    values, outputs = [], []
    heads = {id(m.qkv): m.num_heads for m in blocks}

    def keep_values(module: nn.Module, inputs, qkv: torch.Tensor) -> None:
        B, N, _ = qkv.shape
        values.append(qkv.reshape(B, N, 3, heads[id(module)], -1)[:, :, 2].transpose(1, 2))

    def keep_output(module: nn.Module, inputs) -> None:
        outputs.append(inputs[0])

    handles = [h for m in blocks for h in (m.qkv.register_forward_hook(keep_values),
                                           m.proj.register_forward_pre_hook(keep_output))]
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    try:
        with torch.enable_grad(), capture_attention(model) as modules:
            logits = model(x)
            layers = [m.recorded for m in modules]
    finally:
        for h in handles:
            h.remove()
    if target is None:
        target = logits.argmax(1)
    score = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, outputs)
    B, N = x.shape[0], layers[0].shape[-1]
    relevance = torch.eye(N, dtype=layers[0].dtype, device=layers[0].device).repeat(B, 1, 1)
    for attn, v, grad_out in zip(layers, values, grads, strict=True):
        grad_out = grad_out.reshape(B, N, attn.shape[1], -1).transpose(1, 2)  # [B, h, N, d]
        grad_attn = grad_out @ v.detach().transpose(-2, -1)  # dS/dA = dS/dO V^T
        cam = (grad_attn * attn).clamp(min=0).mean(1)
        relevance = relevance + cam @ relevance
    return _read_prefix_rows(relevance, model, _patch_grid(model, x)), logits.detach()
