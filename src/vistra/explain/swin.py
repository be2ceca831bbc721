"""Swin's maps: Grad-CAM on a stage's token map (the default), and the window attention of
one query token placed back into image coordinates (for teaching W-MSA and SW-MSA).

Swin has no class token, and each attention sees only its window, so rollout has no row to
read; Grad-CAM (Selvaraju et al. 2017) needs only a spatial feature map and the gradient of
the class score, and Swin keeps one ([B, H, W, C]) at every stage. Which stage: the one
before the last, by measurement (benchmarks/explain.md): on a task whose answer is known
(tests/test_explain.py) its maps found the object where the last stage's, at half the
resolution and just before the final LayerNorm, often pointed elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import SwinTransformer, capture_attention
from vistra.models.swin import SwinBlock


def gradcam(model: SwinTransformer, x: torch.Tensor, target: torch.Tensor | None,
            stage: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """relu(sum_c mean_hw(dS/dF_c) F_c) on the output F of `model.layers[stage]`, S the
    target class's logit; stage None: the one before the last (the only one if just one).

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, h, w], logits,
    pixels per token of the map)."""
    if stage is None:
        stage = max(len(model.layers) - 2, 0)
    stage = range(len(model.layers))[stage]
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs, output: torch.Tensor) -> None:
        captured.append(output)

    handle = model.layers[stage].register_forward_hook(keep)
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        handle.remove()
    if target is None:
        target = logits.argmax(1)
    features = captured[0]  # [B, h, w, C]
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), features)
    weights = grad.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
    cam = (weights * features.detach()).sum(-1).clamp(min=0)
    return cam, logits.detach(), stage_stride(model, stage)


def stage_stride(model: SwinTransformer, stage: int) -> int:
    """Input pixels per token side at `stage`: the patch, then halved by each merging."""
    return model.cfg.patch_size * 2 ** stage


def swin_blocks(model: SwinTransformer) -> list[SwinBlock]:
    return [m for m in model.modules() if isinstance(m, SwinBlock)]


def window_attention(model: SwinTransformer, x: torch.Tensor, block: int | None = None,
                     query: tuple[float, float] = (0.5, 0.5)
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The head-averaged attention of the token at `query` (row, column as fractions of the
    input) in one block, over the token map of that block's stage.

    A block attends in windows of its (padded) map rolled by -shift; here each key's window
    position is rolled back by +shift, so the map shows the keys where they are in the
    image: for SW-MSA one window may cover pieces of up to four regions of the unshifted
    grid, and keys that the shift wrapped around are masked (weight ~0). block None: the
    first shifted-window block (or block 0 if no block shifts).

    -> (map over the block's token grid [B, h, w], logits [B, K], pixels per token)."""
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
    keys = torch.arange(M * M)
    kr = ((rs // M) * M + keys // M + shift) % Hp  # roll back to image positions
    kc = ((cs // M) * M + keys % M + shift) % Wp
    inside = (kr < H) & (kc < W)  # padding tokens are not in the image
    out = torch.zeros(x.shape[0], H, W, dtype=row.dtype)
    out[:, kr[inside], kc[inside]] = row[:, inside]
    stage = next(i for i, s in enumerate(model.layers) if any(b is chosen for b in s.blocks))
    return out, logits, stage_stride(model, stage)
