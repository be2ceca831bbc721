"""Swin's maps: Grad-CAM on a stage's token map (the default), Score-CAM on another, and the
window attention of one query token placed back into image coordinates (for teaching W-MSA
and SW-MSA).

Swin has no class token, and each attention sees only its window, so rollout has no row to
read; the CAM family needs only a spatial feature map, and Swin keeps one ([B, H, W, C]) at
every stage. Grad-CAM (Selvaraju et al. 2017) weighs its channels by the gradient of the
class score: one forward and backward. Score-CAM (Wang et al. 2020) weighs each channel by
the class probability of the input masked by that channel's map: a forward per channel,
and the most faithful maps measured here. Both read the LayerNorm entering a stage's last
block; which stage, by measurement (benchmarks/explain.md, docs/explain.md): Grad-CAM the
last (pytorch-grad-cam's choice for Swin), Score-CAM the first, the layers that found the
object most often on a task whose answer is known (tests/test_explain.py) and deleted as
fast as or faster than the others on Fashion-MNIST. Grad-CAM's ReLU leaves nothing where
every token counts against the class (for a share of Fashion-MNIST test images at the last
stage, benchmarks/explain.md); such a map is kept signed, the least negative tokens highest,
not left blank.
"""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import SwinTransformer, TokenGeometry, capture_attention

from .generic import spread, token_geometry


def gradcam(model: SwinTransformer, x: torch.Tensor, target: torch.Tensor | None,
            stage: int | None = None, *, layer: nn.Module | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, TokenGeometry]:
    """relu(sum_c mean_hw(dS/dF_c) F_c), S the target class's logit, F the output of `layer`;
    layer None: the norm1 of the last block of `model.layers[stage]`, stage None: the last.
    Where the sum is negative at every token (the ReLU would leave an empty map), the map is
    the signed sum: the tokens that count least against the class rank first.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, h, w], logits,
    where the map's tokens see)."""
    if layer is None:
        stage = range(len(model.layers))[-1 if stage is None else stage]
        layer = model.layers[stage].blocks[-1].norm1
    else:
        stage = stage_of(model, layer)
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    with torch.enable_grad():
        features, logits = _forward_reading(model, x, layer)
    if target is None:
        target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), features)
    weights = grad.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
    signed = (weights * features.detach()).sum(-1)
    cam = signed.clamp(min=0)
    empty = cam.flatten(1).amax(1) <= 0
    return torch.where(empty[:, None, None], signed, cam), logits.detach(), \
        stage_geometry(model, stage)


@torch.no_grad()
def scorecam(model: SwinTransformer, x: torch.Tensor, target: torch.Tensor | None,
             stage: int | None = None, *, layer: nn.Module | None = None,
             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, TokenGeometry]:
    """relu(sum_c w_c F_c), F the output of `layer`, w_c the target's softmax probability on
    the input times F_c's map, spread over the input (`spread`) and scaled to [0, 1] (0 in the
    normalised input is the dataset's mean colour). A channel whose map is constant gets
    w_c = 0. As the authors' code (haofanwang/Score-CAM, cam/scorecam.py), in batches of
    `batch_size` masked images. layer None: the norm1 of the last block of
    `model.layers[stage]`, stage None: the first.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, h, w], logits,
    where the map's tokens see)."""
    if layer is None:
        stage = range(len(model.layers))[0 if stage is None else stage]
        layer = model.layers[stage].blocks[-1].norm1
    else:
        stage = stage_of(model, layer)
    features, logits = _forward_reading(model, x, layer)
    if target is None:
        target = logits.argmax(1)
    geometry = stage_geometry(model, stage)
    B, h, w, C = features.shape
    weights = torch.zeros(B, C, device=features.device)
    for b in range(B):
        maps = spread(features[b].permute(2, 0, 1).float(), geometry, x.shape[-2:])  # [C, H, W]
        low = maps.amin(dim=(1, 2), keepdim=True)
        span = maps.amax(dim=(1, 2), keepdim=True) - low
        varies = span.flatten() > 0
        masks = (maps[varies] - low[varies]) / span[varies]
        probs = torch.cat([model(x[b] * m[:, None].to(x.dtype)).float().softmax(-1)[:, target[b]]
                           for m in masks.split(batch_size)])
        weights[b, varies] = probs
    cam = (features.float() * weights[:, None, None, :]).sum(-1).clamp(min=0)
    return cam, logits, geometry


def stage_of(model: SwinTransformer, layer: nn.Module) -> int:
    """The index of the stage (`model.layers[i]`) that holds `layer`; the final LayerNorm
    (`model.norm`) counts as the last stage's."""
    if layer is model.norm:
        return len(model.layers) - 1
    found = next((i for i, s in enumerate(model.layers)
                  if any(m is layer for m in s.modules())), None)
    if found is None:
        raise ValueError("layer must be a module of one of the model's stages (model.layers) "
                         "or its final norm")
    return found


def _forward_reading(model: nn.Module, x: torch.Tensor, layer: nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output of `layer` [B, h, w, C], the logits) of one forward."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[0], logits


def stage_geometry(model: SwinTransformer, stage: int) -> TokenGeometry:
    """Where the tokens of `stage` see: each patch merging joins 2 x 2 tokens, so the stride
    doubles and the centre moves to the middle of the four, half a stride on."""
    first = token_geometry(model)
    return TokenGeometry(first.stride * 2 ** stage,
                         first.offset + (2 ** stage - 1) * first.stride / 2)


def swin_blocks(model: SwinTransformer) -> list[nn.Module]:
    """Every block of every stage, in forward order."""
    return [block for stage in model.layers for block in stage.blocks]


def window_attention(model: SwinTransformer, x: torch.Tensor, block: int | None = None,
                     query: tuple[float, float] = (0.5, 0.5)
                     ) -> tuple[torch.Tensor, torch.Tensor, TokenGeometry]:
    """The head-averaged attention of the token at `query` (row, column as fractions of the
    input) in one block, over the token map of that block's stage.

    A block attends in windows of its (padded) map rolled by -shift; here each key's window
    position is rolled back by +shift, so the map shows the keys where they are in the
    image: for SW-MSA one window may cover pieces of up to four regions of the unshifted
    grid, and keys that the shift wrapped around are masked (weight ~0). block None: the
    first shifted-window block (or block 0 if no block shifts).

    -> (map over the block's token grid [B, h, w], logits [B, K], where its tokens see)."""
    blocks = swin_blocks(model)
    if block is None:
        block = next((i for i, b in enumerate(blocks) if b.shift_size), 0)
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block must be in 0..{len(blocks) - 1} (the model's Swin blocks), "
                         f"got {block}")
    chosen = blocks[block]
    sizes: list[tuple[int, int]] = []
    handle = chosen.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[1:3]))
    try:
        with torch.no_grad(), capture_attention(chosen) as (attn_module,):
            logits = model(x)
            attn = attn_module.recorded  # [B, nW, heads, M*M, M*M]
    finally:
        handle.remove()
    H, W = sizes[0]
    M = chosen.window_size
    shift = chosen.shift_size if min(H, W) > M else 0  # as the block decides
    Hp, Wp = H - H % -M, W - W % -M
    r = min(int(query[0] * H), H - 1)
    c = min(int(query[1] * W), W - 1)
    rs, cs = (r - shift) % Hp, (c - shift) % Wp  # the query in the rolled map
    window = (rs // M) * (Wp // M) + cs // M
    row = attn[:, window, :, (rs % M) * M + cs % M].mean(1)  # [B, M*M]
    keys = torch.arange(M * M, device=row.device)
    kr = ((rs // M) * M + keys // M + shift) % Hp  # roll back to image positions
    kc = ((cs // M) * M + keys % M + shift) % Wp
    inside = (kr < H) & (kc < W)  # padding tokens are not in the image
    out = row.new_zeros(x.shape[0], H, W)
    out[:, kr[inside], kc[inside]] = row[:, inside]
    stage = next(i for i, s in enumerate(model.layers) if any(b is chosen for b in s.blocks))
    return out, logits, stage_geometry(model, stage)
