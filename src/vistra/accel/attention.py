"""The fastest exact attention kernel for the CPU at hand, for vistra.optimize (inference) and
vistra.accel.training (training steps).

bf16 on CPU: the explicit products (matmul, softmax, matmul) beat SDPA's flash kernel in
training on every CPU measured, and in inference where the CPU lacks AMX; with AMX the flash
kernel wins in inference. In fp32 SDPA is as fast or faster everywhere. Swin's bias, when it
needs a gradient, also takes the explicit products: no fused CPU kernel differentiates a mask,
so SDPA would run its math fallback with the bias copied per image. Figures:
benchmarks/bf16.md and benchmarks/README.md.
"""

from __future__ import annotations

import torch

from vistra.models.layers import attention as plain_attention

from .capabilities import probe
from .kernels import softmax_backward


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None, scale: float, dropout_p: float = 0.0
                  ) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, q, k, v [..., heads, N, d], by the kernel that is
    fastest here; the same numbers as vistra.models.layers.attention."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if bias is not None:
        bias = bias.to(q.dtype)
    if grad and bias is not None and bias.requires_grad:
        return plain_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p, fused=False)[0]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        if grad and bias is None and not dropout_p:
            return RecomputedAttention.apply(q, k, v, scale)
        if not grad and not probe().amx:
            weights = (q @ k.transpose(-2, -1)).mul_(scale)  # [..., heads, N, N], in place
            if bias is not None:
                weights.add_(bias)
            return weights.softmax(dim=-1) @ v
    return plain_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p)[0]


class RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for training that saves only q, k and v and recomputes the
    probabilities in backward, as flash attention does: the explicit products' speed without
    keeping a [B, heads, N, N] matrix per block until backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return _probabilities(q, k, scale) @ v

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v = ctx.saved_tensors
        probs = _probabilities(q, k, ctx.scale)
        grad_v = probs.transpose(-2, -1) @ grad_out
        grad_scores = softmax_backward(grad_out @ v.transpose(-2, -1), probs).mul_(ctx.scale)
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v, None


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q @ k.transpose(-2, -1)).mul_(scale).softmax(dim=-1)
