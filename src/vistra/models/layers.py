"""Building blocks shared by ViT and Swin: multi-head attention, MLP, stochastic depth, init.

Plain PyTorch modules, as in timm: the CPU fast paths live in vistra.accel and are applied to
a finished model by `vistra.optimize`, never here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# One switch, as timm's TIMM_FUSED_ATTN: 0 makes every attention module take the explicit
# products (the maths written out) instead of PyTorch's fused kernel.
FUSED_ATTN = os.environ.get("VISTRA_FUSED_ATTN", "1").strip().lower() not in ("0", "false", "no")


def to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def tracing() -> bool:
    """Whether the forward is being recorded as a graph (ONNX export, torch.jit.trace,
    torch.compile): shape decisions must then be computed from the input, not fixed."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v over the last two dims; q, k, v [..., heads, N, d].

    Returns the output and, on the explicit path (`fused` False), the attention weights.
    The fused path is PyTorch's scaled_dot_product_attention, whose CPU kernels take only
    [batch, heads, N, d] and a 4-D (or 2-D) mask: extra leading dims (Swin's windows) are
    folded into the batch and the bias expanded to match.
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    if not fused:
        weights = ((q * scale) @ k.transpose(-2, -1))  # [..., heads, N, N]
        if bias is not None:
            weights = weights + bias
        weights = weights.softmax(dim=-1)
        return F.dropout(weights, dropout_p) @ v, weights
    lead = q.shape[:-3]
    if len(lead) != 1:
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))  # [B * nW, heads, N, d]
        if bias is not None and bias.ndim > 3:
            bias = bias.expand(*lead, *bias.shape[-3:]).reshape(-1, *bias.shape[-3:])
    if bias is not None and bias.ndim == 3:
        bias = bias[None]  # [1, heads, N, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                         scale=scale)
    return out.view(*lead, *out.shape[-3:]), None


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [..., N, 3 * heads * d] (the packed projection) -> q, k, v [..., heads, N, d]."""
    *lead, N, width = qkv.shape
    L = len(lead)
    parts = qkv.reshape(*lead, N, 3, heads, width // (3 * heads))  # [..., N, 3, heads, d]
    # explicit, non-negative permutation: ONNX's Transpose rejects negative axes
    return parts.permute(L + 1, *range(L), L + 2, L, L + 3).unbind(0)


class Attention(nn.Module):
    """Multi-head self-attention over the last two dims of x [..., N, C]: ViT's over all
    tokens, Swin's (WindowAttention) within each window, with a position bias and a mask.

    `fused_attn` picks PyTorch's fused kernel; `record` (see capture_attention) takes the
    explicit products instead and keeps the weights in `recorded`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.fused_attn = FUSED_ATTN
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record = False
        self.recorded: torch.Tensor | None = None

    def position_bias(self) -> torch.Tensor | None:
        """An additive bias [heads, N, N] on the attention logits; none here."""
        return None

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [..., N, 3C] -> q, k, v [..., heads, N, d]."""
        return split_heads(qkv, self.num_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v: [..., heads, N, d]."""
        x, weights = attention(q, k, v, bias, scale=self.scale,
                               dropout_p=self.attn_drop if self.training else 0.0,
                               fused=self.fused_attn and not self.record)
        if self.record:
            self.recorded = weights.detach()
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., N, C] -> [..., N, C]; mask [nW, N, N] adds to window w's logits (x's
        second-to-last leading dim is the window)."""
        *lead, N, C = x.shape
        q, k, v = self.split(self.qkv(x))  # [..., heads, N, d]
        bias = self.position_bias()
        if mask is not None:
            mask = mask[:, None].to(q.dtype)  # [nW, 1, N, N]
            bias = mask if bias is None else bias + mask  # [nW, heads, N, N]
        x = self.attend(q, k, v, bias)
        x = x.transpose(len(lead), len(lead) + 1).reshape(*lead, N, C)  # [..., N, heads * d]
        return self.proj_drop(self.proj(x))


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[Attention]]:
    """Within the block, every attention module of `model` stores its weights in `.recorded`.

    Yields the attention modules in forward order; read `.recorded` after the forward.
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
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


class ConvStem(nn.Module):
    """3x3 conv-BatchNorm-ReLU layers in place of the single patchify conv (Xiao et al. 2021,
    "Early convolutions help transformers see better"): on small images and short schedules
    they give each token local features that one linear patch cannot, for few extra MACs.

    The last log2(stride) layers have stride 2, so the stem shrinks the image by `stride`
    exactly as a patch of that size would. [B, C, H, W] -> [B, widths[-1], H/stride, W/stride].
    """

    def __init__(self, in_chans: int, widths: tuple[int, ...], stride: int) -> None:
        super().__init__()
        halvings = stride.bit_length() - 1
        if stride != 2**halvings or halvings > len(widths):
            raise ValueError(f"a conv stem needs a power-of-two patch size and at least "
                             f"log2(patch) layers; got patch {stride} and widths {widths}")
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            step = 2 if i >= len(widths) - halvings else 1
            layers += [nn.Conv2d(in_chans, width, 3, step, 1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_chans = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]
        self.reduction = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


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
