"""The training-safe part of vistra.accel, which `vistra train` applies explicitly: attention
by the CPU's fastest exact kernel with its gradients (vistra.accel.attention), and q, k, v split
into copies whose backward writes each gradient into its slice of one buffer, where autograd's
own backward of the views stacks the three and copies the permuted stack (benchmarks/bf16.md).
Parameters, state-dict keys and gradients stay those of the plain model.
"""

from __future__ import annotations

import torch
from torch import nn

from vistra.models.layers import Attention, split_heads, tracing

from .attention import cpu_attention
from .swap import accelerate


class TrainingAttention(Attention):
    """Attention whose split and products are the CPU's fastest with their gradients."""

    def _plain(self, t: torch.Tensor) -> bool:
        return self.record or tracing() or t.device.type != "cpu"

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._plain(qkv) or not (torch.is_grad_enabled() and qkv.requires_grad):
            return super().split(qkv)
        return SplitHeads.apply(qkv, self.num_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        if self._plain(q):
            return super().attend(q, k, v, bias)
        return cpu_attention(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.0)


class SplitHeads(torch.autograd.Function):
    """split_heads as contiguous copies, with a backward into one [..., N, 3, heads, d] buffer."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        return tuple(p.clone(memory_format=torch.contiguous_format)
                     for p in split_heads(qkv, heads))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        like = next(g for g in grads if g is not None)
        *lead, heads, N, d = like.shape
        out = like.new_empty(*lead, N, 3, heads, d)
        for i, grad in enumerate(grads):
            if grad is None:
                out.select(-3, i).zero_()
            else:
                out.select(-3, i).copy_(grad.transpose(-2, -3))
        return out.view(*lead, N, 3 * heads * d), None


def accelerate_training(model: nn.Module) -> nn.Module:
    """`model` itself with its attention modules trained by TrainingAttention, on the CPU
    (elsewhere, and for an unknown module, unchanged)."""
    if next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            if isinstance(module, Attention):
                accelerate(module, TrainingAttention)
    return model
