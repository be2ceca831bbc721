"""Building blocks shared by ViT and Swin: one attention path, MLP, stochastic depth, init."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from . import fastpath


def to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
    """softmax(q k^T * scale + bias) v over the last two dims; q, k, v [..., heads, N, d].

    The fused SDPA kernel is the normal path. The explicit path, the same maths, serves when
    the weights are asked for (analysis) and when the bias needs a gradient (Swin's table in
    training): no fused CPU kernel differentiates a mask, so SDPA would run its math fallback
    on windows folded into the batch, with the bias copied per image and its gradient summed
    back: a 10-25% slower Swin-T training step (benchmarks/README.md).
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    grad = torch.is_grad_enabled()
    explicit = need_weights or (bias is not None and bias.requires_grad and grad)
    if not explicit and _explicit_is_faster(q, grad):
        if grad and bias is None and not dropout_p:
            return _RecomputedAttention.apply(q, k, v, scale), None
        explicit = not grad  # inference: the explicit path below, in place
    if not explicit:
        return _fused_attention(q, k, v, bias, scale, dropout_p), None
    weights = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        weights = weights + bias if grad else weights.add_(bias)
    weights = weights.softmax(dim=-1)
    out = F.dropout(weights, dropout_p) @ v if dropout_p else weights @ v
    return out, weights if need_weights else None


def _explicit_is_faster(q: torch.Tensor, grad: bool) -> bool:
    """bf16 on CPU takes the explicit products (matmul, softmax, matmul) where they beat
    SDPA's flash kernel (benchmarks/bf16.md). In training they always do, as
    _RecomputedAttention: a ViT-S/16 step under autocast 10-20% faster on a CPU with
    AVX512_BF16 alone (AMD Zen 4/5), 17% with AMX (Intel Sapphire Rapids and later), where
    the flash kernel's backward is slow. In inference only without AMX, where the flash
    kernel takes 1.5-1.6x their time for every shape vistra's models use; with AMX the flash
    kernel wins: 1.3x at Swin-T's first stage, 3.2x for ViT-B/16 at 384. In fp32 SDPA is as
    fast or faster everywhere."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and fastpath.enabled()
            and (grad or not _cpu_has_amx()))


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent: assume not
    return bool(probe and probe())


class _RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for training that saves only q, k and v and recomputes the
    probabilities in backward, as flash attention does: the explicit products' speed without
    keeping a [B, heads, N, N] matrix per block until backward (keeping them cost ViT-S/16 at
    batch 16 85 MB more than SDPA, by `vistra benchmark --mode train --dtype bf16`)."""

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
        grad_probs = grad_out @ v.transpose(-2, -1)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_scores = grad_scores.mul_(ctx.scale)
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v, None


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [..., N, 3 * heads * d] (the packed projection) -> q, k, v [..., heads, N, d].

    Views when no gradient is needed. In training, contiguous copies whose backward writes
    each gradient into its slice of one buffer: autograd's own backward of the views (stack
    the three gradients, then copy the permuted stack) took 47 ms per block at Swin-T's first
    stage under bf16 autocast at batch 16, about 5% of a training step (benchmarks/bf16.md)."""
    if torch.is_grad_enabled() and qkv.requires_grad and fastpath.enabled() and not tracing():
        return _SplitHeads.apply(qkv, heads)
    return _head_views(qkv, heads)


def _head_views(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    # explicit, non-negative permutation: ONNX's Transpose rejects negative axes
    *lead, N, width = qkv.shape
    L = len(lead)
    parts = qkv.reshape(*lead, N, 3, heads, width // (3 * heads))
    return parts.permute(L + 1, *range(L), L + 2, L, L + 3).unbind(0)


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        return tuple(p.clone(memory_format=torch.contiguous_format)
                     for p in _head_views(qkv, heads))

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


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q @ k.transpose(-2, -1)).mul_(scale).softmax(dim=-1)


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None, scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA over 4-D inputs. Its CPU flash kernel takes only [batch, heads, N, d] and a 4-D
    (or 2-D) mask: anything else runs the slow math path. So extra leading dims (Swin's
    windows) are folded into the batch, a bias that varies along them is expanded to match,
    and a per-head bias [heads, N, N] gets its batch dim."""
    lead = q.shape[:-3]
    if len(lead) != 1:
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
        if bias is not None and bias.ndim > 3:
            bias = bias.expand(*lead, *bias.shape[-3:]).reshape(-1, *bias.shape[-3:])
    if bias is not None and bias.ndim == 3:
        bias = bias[None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out.view(*lead, *out.shape[-3:])


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


def tracing() -> bool:
    """Whether the forward is being recorded as a graph (ONNX export, torch.jit.trace): the
    graph must hold standard operators only and no state kept between calls."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# oneDNN's linear adds the bias, and optionally GELU, inside the GEMM; addmm first writes the
# bias into the whole output in a separate pass, and GELU is one more. On CPU in fp32 that is
# 17% (27% with GELU) less time for Swin-T's layers (benchmarks/README.md); in bf16, with the
# weight kept in oneDNN's own blocked layout, 5-66% per layer (benchmarks/bf16.md).
_fused_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_pack_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_fused_binary = getattr(_fused_linear, "binary", None)  # the GEMM plus an elementwise op
_FUSED_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if torch.backends.mkldnn.is_available()
    and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused CPU linear serves eager inference with the fast paths on, in fp32, or in bf16
    with bf16 weights (a model cast once: vistra.models.bf16): it has no autograd formula,
    under autocast the ordinary path is the one that casts to bf16, and tracers (export,
    torch.compile) need standard operators (`fastpath.enabled`)."""
    return (_fused_linear is not None and x.device.type == "cpu" and x.dtype in _FUSED_DTYPES
            and weight.dtype == x.dtype and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and fastpath.enabled())


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook watches any of `modules` or their sub-modules (or all
    modules, through torch's global hooks): a fast path that skips a module's call or rewrites
    its output in place must then step aside."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               for top in modules for m in top.modules())


class PackedGemm:
    """For a module whose weight serves oneDNN's fused GEMM: with `packing` set
    (vistra.models.bf16 sets it), a bf16 weight is also kept in oneDNN's blocked layout, made
    on the first call (sized for that call's rows) and used while the weight is the same
    tensor at the same version: an in-place change (load_state_dict, an optimizer step) or a
    cast drops it. A write through `.data` is not seen."""

    packing: bool = False
    _packed: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (weight, version, packed)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the GEMM's [out, in] matrix."""
        return weight

    def gemm_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight for the fused GEMM of `x`: the packed copy where there is one."""
        w = self.weight
        if not (self.packing and x.dtype == torch.bfloat16 and _pack_weight is not None):
            return self.matrix(w)
        try:
            version = w._version
        except RuntimeError:  # made under inference_mode: no version to watch, so no copy
            return self.matrix(w)
        packed = self._packed
        if packed is None or packed[0] is not w or packed[1] != version:
            rows = x.numel() // x.shape[-1]
            with torch.inference_mode(False), torch.no_grad():
                packed = w, version, _pack_weight(self.matrix(w.detach()), rows)
            self._packed = packed
        return packed[2]

    def _apply(self, fn, recurse: bool = True):
        self._packed = None
        return super()._apply(fn, recurse)


class Linear(PackedGemm, nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) taking oneDNN's fused-bias GEMM
    when `fused_linear_applies`, with the weight packed where `packing` is set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_linear_applies(x, self.weight):
            return _fused_linear(x, self.gemm_weight(x), self.bias, "none", [], "")
        return super().forward(x)


class PatchConv(PackedGemm, nn.Conv2d):
    """The patch embedding, nn.Conv2d with kernel = stride (same parameters and keys), whose
    `tokens` gives the channels-last map [B, H/p, W/p, D] the transformer reads.

    Where `fused_linear_applies`, the patches are cut out in one copy and embedded by the
    fused GEMM (a packed weight with `packing`) instead of the convolution and the copy to
    channels-last after it: Swin-T's 4x4 patches at batch 16, 2.6 ms instead of 8.2 in bf16,
    3.5 instead of 4.4 in fp32, on a CPU with AMX (benchmarks/bf16.md)."""

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)  # (c, i, j) order, as the patches below

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (sh, sw) = self.kernel_size, self.stride
        plain_conv = ((ph, pw) != (sh, sw) or self.padding != (0, 0) or self.groups != 1
                      or self.dilation != (1, 1))
        if plain_conv or not fused_linear_applies(x, self.weight) or hooked(self):
            return self(x).permute(0, 2, 3, 1)
        B, C, H, W = x.shape
        h, w = H // ph, W // pw
        patches = x[:, :, :h * ph, :w * pw].reshape(B, C, h, ph, w, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, C * ph * pw)
        return _fused_linear(patches, self.gemm_weight(patches), self.bias, "none", [], "")


class Mlp(nn.Module):
    """Linear(D, hD) - GELU - Dropout - Linear(hD, D) - Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.hidden(x))))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(fc1(x)): one oneDNN call where the fused linear applies, unless someone hooks
        fc1 or act to watch them."""
        if (fused_linear_applies(x, self.fc1.weight) and self.act.approximate == "none"
                and not hooked(self.fc1, self.act)):
            return _fused_linear(x, self.fc1.gemm_weight(x), self.fc1.bias, "gelu", [], "none")
        return self.act(self.fc1(x))


def add_mlp(x: torch.Tensor, mlp: Mlp, h: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """x + drop_path(mlp(h)): a block's second residual. In fast-path inference fc2's GEMM adds
    x itself (oneDNN's binary post-op), one pass over the block's output less: 1.6 ms instead
    of 2.3 for fc2 and the add at Swin-T's first stage, bf16, batch 16, on a CPU with AMX
    (benchmarks/bf16.md)."""
    if (_fused_binary is not None and not (mlp.training or drop_path.training)
            and fused_linear_applies(h, mlp.fc2.weight) and x.dtype == h.dtype
            and x.shape[:-1] == h.shape[:-1] and x.is_contiguous() and not hooked(mlp, drop_path)):
        hidden = mlp.hidden(h)
        return _fused_binary(hidden, x, mlp.fc2.gemm_weight(hidden), mlp.fc2.bias, "add")
    return add_residual(x, drop_path(mlp(h)), mlp, drop_path)


def add_residual(x: torch.Tensor, branch: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
    """x + branch. In fast-path inference, written into `branch`: one allocation less per
    residual, and on CPU a fresh allocation costs page faults that take longer than the add
    itself (benchmarks/README.md).

    `branch` may be the very tensor one of `producers` (the modules that computed it, with their
    sub-modules) returned: an eval-mode DropPath or Dropout returns its input. So when a hook
    watches any of them, the add is out of place and the hooked tensor keeps its value."""
    if (torch.is_grad_enabled() or branch.shape != x.shape or branch.dtype != x.dtype
            or not branch.is_contiguous() or not fastpath.enabled() or hooked(*producers)):
        return x + branch
    return branch.add_(x)


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
