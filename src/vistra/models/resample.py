"""Resizing learned position tables to a new grid: ViT position embeddings, Swin bias tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import tracing


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[1, prefix + h*w, D] -> [1, prefix + H*W, D]: bicubic over the 2-D grid, class and
    distillation tokens kept as they are. A square old grid is assumed when not given."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(grid.shape[1] ** 0.5))
        if side * side != grid.shape[1]:
            raise ValueError(
                f"position embedding has {grid.shape[1]} grid tokens, not a square; pass old_grid"
            )
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid) and not tracing():
        return pos_embed  # a traced graph keeps the resize: its grid follows the input
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_rel_pos_bias_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """[(2M-1)^2, heads] -> [(2M'-1)^2, heads], bicubic over the (2M-1) x (2M-1) offset grid.
    The centre entry (zero offset) stays at the centre."""
    old_side = int(round(table.shape[0] ** 0.5))
    new_side = 2 * new_window - 1
    if old_side == new_side:
        return table
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, old_side, old_side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)
