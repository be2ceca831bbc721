"""What explain needs of any model, whatever its family: where its tokens see, how a map
over them is spread over the image, and the gradient map.

A token's value belongs where the token looks. A patch conv's token sees its own square,
so its value goes to the square's middle; behind a conv stem or the R50 hybrid's backbone
the receptive field's centre lies elsewhere (for vit_fmnist's stem 1.5 pixels up and left
of the square's middle, for the hybrid 7.5 pixels down and right), and the family says
where (`token_geometry`, models/family.py). `spread` puts each value at its token's centre
and interpolates between centres.

`gradient` is the saliency map of Simonyan et al. 2014 ("Deep inside convolutional
networks"): |dS/dx| over the input's pixels, one forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vistra.models import TokenGeometry, get_family
from vistra.models.family import patch_geometry

PIXELS = TokenGeometry(1, 0.0)  # a map over the input's own pixels


def token_geometry(model: nn.Module, size: tuple[int, int] | None = None) -> TokenGeometry:
    """Where the model's tokens see: its family's `token_geometry`, else the middle of each
    `token_stride` square; for a family without a token grid (or a function batch -> logits),
    squares of an eighth of the shorter side of the input's `size` (H, W)."""
    if isinstance(model, nn.Module):
        family = get_family(model)
        if family.token_geometry is not None:
            return family.token_geometry(model)
        if family.token_stride is not None:
            return patch_geometry(family.token_stride(model))
    if size is None:
        raise ValueError("this model has no token grid: give the input's size")
    return patch_geometry(max(1, min(size) // 8))


def token_stride(model: nn.Module, x: torch.Tensor) -> int:
    """Input pixels per side of a token of the model's grid (see token_geometry)."""
    return token_geometry(model, x.shape[-2:]).stride


def spread(maps: torch.Tensor, geometry: TokenGeometry, size: tuple[int, int],
           mode: str = "bilinear") -> torch.Tensor:
    """Maps over tokens [B, h, w] -> maps over the input's pixels [B, H, W], each token's
    value at its receptive field's centre (`geometry`), "bilinear" between the centres or
    "nearest": the nearest centre's; beyond the outermost centres, their values. With the
    centres in the middle of the squares this is F.interpolate's upsampling by the stride
    (align_corners=False), cropped to the input."""
    rows = _interpolation(size[0], maps.shape[-2], geometry, mode, maps)
    cols = _interpolation(size[1], maps.shape[-1], geometry, mode, maps)
    return rows @ maps @ cols.T


def _interpolation(pixels: int, tokens: int, geometry: TokenGeometry, mode: str,
                   like: torch.Tensor) -> torch.Tensor:
    """[pixels, tokens] weights: pixel y reads the token coordinate (y - offset) / stride."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    position = torch.arange(pixels, device=like.device, dtype=torch.float32)
    u = ((position - geometry.offset) / geometry.stride).clamp(0, tokens - 1)
    if mode == "nearest":
        return F.one_hot(torch.floor(u + 0.5).long(), tokens).to(like.dtype)
    low = u.floor().long()
    high = (low + 1).clamp(max=tokens - 1)
    frac = (u - low)[:, None]
    return ((1 - frac) * F.one_hot(low, tokens) + frac * F.one_hot(high, tokens)).to(like.dtype)


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """max over channels of |dS/dx|, S the target class's logit.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, H, W], logits)."""
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    with torch.enable_grad():
        logits = model(x)
    if target is None:
        target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return grad.abs().amax(1), logits.detach()
