"""Building blocks shared by ViT and Swin: one attention path, MLP, stochastic depth, init."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v over the last two dims.

    The fused SDPA kernel is the normal path; the explicit path exists only so analysis can
    look at the attention weights (it is the same maths, kept side by side on purpose).
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        return out, None
    weights = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        weights = weights + bias
    weights = weights.softmax(dim=-1)
    out = F.dropout(weights, dropout_p) @ v if dropout_p else weights @ v
    return out, weights


class AttentionRecorder:
    """Mixin for attention modules: when `record` is set, the next forwards keep their weights."""

    record: bool = False
    recorded: torch.Tensor | None = None


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionRecorder]]:
    """Within the block, every attention module of `model` stores its weights in `.recorded`.

    Yields the attention modules in forward order; read `.recorded` after the forward.
    """
    modules = [m for m in model.modules() if isinstance(m, AttentionRecorder)]
    for m in modules:
        m.record, m.recorded = True, None
    try:
        yield modules
    finally:
        for m in modules:
            m.record = False


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear(D, hD) - GELU - Dropout - Linear(hD, D) - Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def init_weights(module: nn.Module) -> None:
    """Truncated-normal std 0.02 for Linear (as timm and DeiT, whose recipes we follow; the
    blog's 0.01 trains the same but 0.02 keeps fresh heads comparable to published runs),
    kaiming-normal fan-out for Conv2d, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """A clear error for the common input mistakes, before they surface as a matmul shape."""
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D image batch [B, {in_chans}, H, W], got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
            f"convert images to {'RGB' if in_chans == 3 else f'{in_chans} channels'} or build the "
            f"model with in_chans={x.shape[1]}"
        )
