"""Inference versions of the models' modules, for vistra.optimize.

Each is a subclass of the module it accelerates that overrides `forward` (and is given to that
very object, as torch.nn.utils.parametrize does): the same parameters, the same state-dict
keys, the plain forward kept as `super().forward` for whatever the fast path does not serve
(autocast, autograd, tracing, another device). What they keep between calls: see Frozen, and
Swin's window layouts, which depend on the input size only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from vistra.models.layers import Attention, Mlp, tracing
from vistra.models.swin import shift_window_mask, window_order, window_partition, window_reverse

from .attention import cpu_attention
from .kernels import eager_inference, fused_binary, fused_linear, fused_linear_applies, pack_weight

LAYOUT_CACHE_SIZES = 8  # input sizes whose window layout a Swin block keeps, least recent dropped


class Frozen:
    """What a fast module derives from its own weights (a packed copy, a gathered bias), made
    on first use and kept while those weights are the same tensors at the same versions: an
    in-place change (load_state_dict, an optimizer step) or a cast makes it anew. A write
    through `.data` is not seen; weights made under inference_mode have no version to watch,
    so for them it is made on every call."""

    _frozen: dict | None = None

    def frozen(self, key: str, sources: tuple[torch.Tensor, ...], make):
        try:
            stamp = tuple((id(t), t._version) for t in sources)
        except RuntimeError:  # an inference tensor
            return make()
        if self._frozen is None:
            self._frozen = {}
        kept = self._frozen.get(key)
        if kept is None or kept[0] != stamp:
            # plain tensors even when first called under inference_mode, usable by any forward
            with torch.inference_mode(False), torch.no_grad():
                kept = self._frozen[key] = (stamp, sources, make())  # sources: ids stay theirs
        return kept[2]

    def _apply(self, fn, recurse: bool = True):
        self._frozen = None
        return super()._apply(fn, recurse)


class PackedGemm(Frozen):
    """A module whose weight feeds oneDNN's GEMM: in bf16 packed in oneDNN's blocked layout
    on the first call."""

    def matrix(self) -> torch.Tensor:
        """The weight as the GEMM's [out, in] matrix."""
        return self.weight

    def gemm_weight(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or pack_weight is None:
            return self.matrix()
        rows = x.numel() // x.shape[-1]  # oneDNN sizes the layout for this many rows
        return self.frozen("packed", (self.weight,),
                           lambda: pack_weight(self.matrix().detach(), rows))


class FastLinear(PackedGemm, nn.Linear):
    """oneDNN's fused-bias GEMM; in bf16 from a weight packed in oneDNN's blocked layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_linear_applies(x, self.weight):
            return fused_linear(x, self.gemm_weight(x), self.bias, "none", [], "")
        return super().forward(x)


class FastPatchConv(PackedGemm, nn.Conv2d):
    """A patch embedding (kernel = stride) as one GEMM over the cut-out patches, instead of
    the convolution and the copy to channels-last that the transformer's [B, h, w, D] needs.
    Returns [B, D, h, w] as a view of channels-last tokens, so the model's own permute to
    tokens costs nothing."""

    def matrix(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)  # (c, i, j), as the patches below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_linear_applies(x, self.weight):
            return super().forward(x)
        (ph, pw), (B, C, H, W) = self.kernel_size, x.shape
        h, w = H // ph, W // pw
        patches = x[:, :, :h * ph, :w * pw].reshape(B, C, h, ph, w, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, C * ph * pw)
        tokens = fused_linear(patches, self.gemm_weight(patches), self.bias, "none", [], "")
        return tokens.permute(0, 3, 1, 2)  # [B, h, w, D] seen as [B, D, h, w]


def is_patch_conv(conv: nn.Conv2d) -> bool:
    """A convolution that cuts the image into patches: kernel = stride > 1, nothing else."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride
            and conv.kernel_size != (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class FastMlp(Mlp):
    """fc1 and GELU in one oneDNN call; `residual` lets fc2's GEMM add the block's input."""

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if (isinstance(fc1, FastLinear) and self.act.approximate == "none"
                and fused_linear_applies(x, fc1.weight)):
            return fused_linear(x, fc1.gemm_weight(x), fc1.bias, "gelu", [], "none")
        return self.act(fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return self.fc2(self.hidden(x))

    def residual(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + mlp(h), fc2's GEMM adding x (oneDNN's binary post-op)."""
        fc2 = self.fc2
        hidden = self.hidden(h)
        if (fused_binary is not None and isinstance(fc2, FastLinear) and x.dtype == h.dtype
                and x.shape[:-1] == h.shape[:-1] and x.is_contiguous()
                and fused_linear_applies(hidden, fc2.weight)):
            return fused_binary(hidden, x, fc2.gemm_weight(hidden), fc2.bias, "add")
        return x + fc2(hidden)


class FastAttention(Frozen, Attention):
    """Attention with its position bias gathered once, by the kernel fastest on this CPU."""

    def _plain(self, t: torch.Tensor) -> bool:
        # autocast is welcome here: q, k, v come out of the autocast linear in bf16
        return (self.training or self.record or t.device.type != "cpu" or tracing()
                or (torch.is_grad_enabled() and t.requires_grad))

    def position_bias(self) -> torch.Tensor | None:
        if self.training or tracing():  # a graph gathers it itself, nothing kept
            return super().position_bias()
        return self.frozen("bias", tuple(self.parameters(recurse=False)),
                           lambda: _contiguous(super(FastAttention, self).position_bias()))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        if self._plain(q):
            return super().attend(q, k, v, bias)
        return cpu_attention(q, k, v, bias, self.scale)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


class FastBlock(nn.Module):
    """A pre-norm block (norm1, attn, norm2, mlp) with both residual adds fused away: the
    attention branch's fresh output takes x in place, fc2's GEMM adds the second residual."""

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not eager_inference(x) or not isinstance(self.mlp, FastMlp):
            return super().forward(x)
        x = self.mix(self.norm1(x)).add_(x)
        return self.mlp.residual(x, self.norm2(x))


class FastSwinBlock(FastBlock):
    """SwinBlock whose shift, partition and crop are one gather each way, with the indices
    and the shift mask kept per input size (the LAYOUT_CACHE_SIZES most recent)."""

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        M = self.window_size
        shift = self.shift_size if min(H, W) > M else 0
        pad_h, pad_w = -H % M, -W % M
        if not (shift or pad_h or pad_w):  # plain windows: a permute is the cheapest copy
            return window_reverse(self.attn(window_partition(x, M), None), M, H, W)
        order, restore, mask = self._layout(H, W, shift, x)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        windows = x.reshape(B, -1, C).index_select(1, order).view(B, -1, M * M, C)
        x = self.attn(windows, mask)
        return x.reshape(B, -1, C).index_select(1, restore).view(B, H, W, C)

    def _layout(self, H: int, W: int, shift: int, x: torch.Tensor):
        if self.__dict__.get("_layouts") is None:
            self._layouts: OrderedDict[tuple, tuple] = OrderedDict()
        key = (H, W, x.device, x.dtype)
        layout = self._layouts.pop(key, None)
        if layout is None:
            M = self.window_size
            with torch.inference_mode(False):  # plain tensors, usable by any later forward
                order, restore = window_order(H, W, M, shift, x.device)
                mask = (shift_window_mask(H - H % -M, W - W % -M, M, shift, x.device)
                        .to(x.dtype) if shift else None)
            layout = order, restore, mask
            if len(self._layouts) >= LAYOUT_CACHE_SIZES:
                self._layouts.popitem(last=False)
        self._layouts[key] = layout  # now the most recent
        return layout

    def _apply(self, fn, recurse: bool = True):
        self._layouts = None
        return super()._apply(fn, recurse)
