"""Analytic size and cost of vistra's families, from their numbers alone: the complexity
argument of the Swin paper, in code, next to the models it describes. Each family declares
these functions (models/family.py); `vistra.analysis.complexity` asks the family for them.

    Omega(MSA)   = 4 hw C^2 + 2 (hw)^2 C      (qkv + output projection, QK^T and AV)
    Omega(W-MSA) = 4 hw C^2 + 2 M^2 hw C

Only matrix products count (one multiply-add each); softmax, the bias and mask adds, the
scaling, LayerNorm, GELU and residual adds are left out, as in the paper and in torch's FLOP
counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import to_2tuple
from .swin import SwinConfig
from .vit import ViTConfig

KINDS = ("patch_embed", "qkv_proj", "attention", "mlp", "merging", "head")
VIT_WHAT_IF_WINDOW = 7  # ViT has no windows; its W-MSA column shows Swin's default as a what-if


def msa_macs(h: int, w: int, dim: int) -> int:
    """Global multi-head self-attention over an h x w map of `dim` channels."""
    return 4 * h * w * dim**2 + 2 * (h * w) ** 2 * dim


def wmsa_macs(h: int, w: int, dim: int, window: int) -> int:
    """Attention inside non-overlapping window x window windows of the same map."""
    return 4 * h * w * dim**2 + 2 * window**2 * h * w * dim


@dataclass(frozen=True)
class Stage:
    """One resolution of the model. For ViT the single stage holds all blocks and `tokens`
    counts the class (and distillation) token too; `window` is then a what-if."""

    name: str
    h: int
    w: int
    dim: int
    heads: int
    depth: int
    window: int
    tokens: int  # tokens the attention really sees: padded to whole windows, or with prefix

    @property
    def analytic_msa(self) -> int:
        return msa_macs(self.h, self.w, self.dim)

    @property
    def analytic_wmsa(self) -> int:
        return wmsa_macs(self.h, self.w, self.dim, self.window)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def vit_stages(arch: ViTConfig) -> list[Stage]:
    """ViT's one stage: every block at the patch grid, class (and distillation) token too."""
    H, W = to_2tuple(arch.img_size)
    r = (4 * 2 ** (len(arch.hybrid_depths) - 1) if arch.hybrid_depths is not None
         else arch.patch_size)
    h, w = H // r, W // r
    prefix = 2 if arch.distilled else 1
    return [Stage("blocks", h, w, arch.embed_dim, arch.num_heads, arch.depth,
                  VIT_WHAT_IF_WINDOW, h * w + prefix)]


def swin_stages(arch: SwinConfig) -> list[Stage]:
    """Swin's four resolutions, each map padded to whole windows for attention."""
    H, W = to_2tuple(arch.img_size)
    h, w = _ceil_div(H, arch.patch_size), _ceil_div(W, arch.patch_size)
    out, dim = [], arch.embed_dim
    for i, (depth, heads) in enumerate(zip(arch.depths, arch.num_heads, strict=True)):
        if i > 0:
            h, w, dim = _ceil_div(h, 2), _ceil_div(w, 2), dim * 2
        window = min(arch.window_size, h, w)  # as the model: a small map is one window
        padded = _ceil_div(h, window) * window * _ceil_div(w, window) * window
        out.append(Stage(f"stage{i + 1}", h, w, dim, heads, depth, window, padded))
    return out


@dataclass
class Cost:
    """Parameters, and multiply-adds of one image by stage ("embed", stage names, "head")
    and kind (KINDS)."""

    params: int
    macs: dict[str, dict[str, int]]

    @property
    def total_macs(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.macs.values())


def _linear(tokens: int, d_in: int, d_out: int, bias: bool = True) -> tuple[int, int]:
    """(params, MACs) of a Linear applied to `tokens` tokens."""
    return d_in * d_out + (d_out if bias else 0), tokens * d_in * d_out


def _block(tokens: int, mlp_tokens: int, dim: int, hidden: int, qkv_bias: bool,
           attn_window: int) -> tuple[int, dict[str, int]]:
    """(params without the bias table, MACs by kind) of one pre-norm transformer block;
    attention of each token over `attn_window` tokens (the whole sequence, or M^2)."""
    qkv_p, qkv_m = _linear(tokens, dim, 3 * dim, qkv_bias)
    proj_p, proj_m = _linear(tokens, dim, dim)
    fc1_p, fc1_m = _linear(mlp_tokens, dim, hidden)
    fc2_p, fc2_m = _linear(mlp_tokens, hidden, dim)
    params = 2 * 2 * dim + qkv_p + proj_p + fc1_p + fc2_p
    return params, {"qkv_proj": qkv_m + proj_m, "attention": 2 * tokens * attn_window * dim,
                    "mlp": fc1_m + fc2_m}


def _add(into: dict[str, int], macs: dict[str, int], times: int = 1) -> None:
    for kind, n in macs.items():
        into[kind] = into.get(kind, 0) + n * times


def _head(features: int, num_classes: int, heads: int = 1) -> tuple[int, int]:
    if not num_classes:
        return 0, 0
    params, macs = _linear(1, features, num_classes)
    return heads * params, heads * macs


def vit_cost(arch: ViTConfig) -> Cost:
    """Parameters and MACs of a VisionTransformer built from `arch`."""
    (stage,) = vit_stages(arch)
    D, T = arch.embed_dim, stage.tokens
    grid = stage.h * stage.w
    macs: dict[str, dict[str, int]] = {"embed": {}, stage.name: {}, "head": {}}
    if arch.hybrid_depths is not None:
        params, conv_macs = _resnet_cost(arch.hybrid_depths, arch.in_chans,
                                         to_2tuple(arch.img_size))
        proj_p, proj_m = _linear(grid, 256 * 2 ** (len(arch.hybrid_depths) - 1), D)
        params, embed = params + proj_p, conv_macs + proj_m
    else:
        params, embed = _patch_embed_cost(arch, to_2tuple(arch.img_size), grid, D)
    macs["embed"]["patch_embed"] = embed
    prefix = T - grid
    params += prefix * D + T * D  # class / distillation tokens, position embedding
    block_p, block_m = _block(T, T, D, int(D * arch.mlp_ratio), arch.qkv_bias, T)
    params += arch.depth * block_p + 2 * D
    _add(macs[stage.name], block_m, arch.depth)
    features = D
    if arch.representation_size:
        pre_p, pre_m = _linear(1, D, arch.representation_size)
        params, features = params + pre_p, arch.representation_size
        macs["head"]["head"] = pre_m
    head_p, head_m = _head(features, arch.num_classes, 2 if arch.distilled else 1)
    macs["head"]["head"] = macs["head"].get("head", 0) + head_m
    return Cost(params + head_p, macs)


def _patch_embed_cost(arch: ViTConfig | SwinConfig, img_size: tuple[int, int], grid: int,
                      dim: int) -> tuple[int, int]:
    """(params, MACs) of the patchify conv, or of the 3x3 conv stem (bias-free convs and
    BatchNorm, the last log2(patch) with stride 2) and its 1x1 projection."""
    if not arch.conv_stem:
        return _linear(grid, arch.in_chans * arch.patch_size**2, dim)
    p = arch.patch_size
    h, w = _ceil_div(img_size[0], p) * p, _ceil_div(img_size[1], p) * p
    halvings = p.bit_length() - 1
    params = macs = 0
    chs = arch.in_chans
    for i, width in enumerate(arch.conv_stem):
        if i >= len(arch.conv_stem) - halvings:
            h, w = _ceil_div(h, 2), _ceil_div(w, 2)
        params += 9 * chs * width + 2 * width
        macs += h * w * 9 * chs * width
        chs = width
    proj_p, proj_m = _linear(grid, chs, dim)
    return params + proj_p, macs + proj_m


def _resnet_cost(depths: tuple[int, ...], in_chans: int,
                 img_size: tuple[int, int]) -> tuple[int, int]:
    """(params, MACs) of the hybrid's ResNet-v2 (weight-standardised convs without bias,
    GroupNorm, TF-SAME padding: every stride-s layer gives ceil(size / s))."""
    h, w = _ceil_div(img_size[0], 2), _ceil_div(img_size[1], 2)
    params, macs = 49 * in_chans * 64 + 2 * 64, h * w * 49 * in_chans * 64
    h, w = _ceil_div(h, 2), _ceil_div(w, 2)  # max-pool
    chs = 64
    for i, depth in enumerate(depths):
        out = 256 * 2**i
        mid = out // 4
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            oh, ow = _ceil_div(h, stride), _ceil_div(w, stride)
            params += chs * mid + 9 * mid * mid + mid * out + 2 * (2 * mid + out)
            macs += h * w * chs * mid + oh * ow * (9 * mid * mid + mid * out)
            if j == 0:  # projection shortcut
                params += chs * out + 2 * out
                macs += oh * ow * chs * out
            h, w, chs = oh, ow, out
    return params, macs


def swin_cost(arch: SwinConfig) -> Cost:
    """Parameters and MACs of a SwinTransformer built from `arch`."""
    C0 = arch.embed_dim
    shapes = swin_stages(arch)
    embed_p, embed_m = _patch_embed_cost(arch, to_2tuple(arch.img_size),
                                         shapes[0].h * shapes[0].w, C0)
    params = embed_p + 2 * C0
    macs: dict[str, dict[str, int]] = {"embed": {"patch_embed": embed_m}}
    prev = None
    for s in shapes:
        stage_macs: dict[str, int] = {}
        if prev is not None:  # patch merging: LayerNorm(4C) and Linear(4C, 2C) without bias
            merge_p, merge_m = _linear(s.h * s.w, 4 * prev.dim, 2 * prev.dim, bias=False)
            params += merge_p + 2 * 4 * prev.dim
            stage_macs["merging"] = merge_m
        block_p, block_m = _block(s.tokens, s.h * s.w, s.dim, int(s.dim * arch.mlp_ratio),
                                  arch.qkv_bias, s.window**2)
        params += s.depth * (block_p + (2 * s.window - 1) ** 2 * s.heads)
        _add(stage_macs, block_m, s.depth)
        macs[s.name] = stage_macs
        prev = s
    head_p, head_m = _head(shapes[-1].dim, arch.num_classes)
    macs["head"] = {"head": head_m}
    return Cost(params + 2 * shapes[-1].dim + head_p, macs)
