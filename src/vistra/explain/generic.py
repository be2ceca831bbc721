"""What explain needs of any model, whatever its family: the stride of its token grid, and two
maps that only call the model, the methods of a family that declares none of its own.

`gradient` is the saliency map of Simonyan et al. 2014 ("Deep inside convolutional
networks"): |dS/dx| over the input's pixels, one forward and backward. `occlusion` is Zeiler
& Fergus 2014 ("Visualizing and understanding convolutional networks"): how much the class
probability drops when one square of the input is hidden, a forward per square.
"""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import get_family


def token_stride(model: nn.Module, x: torch.Tensor) -> int:
    """Input pixels per side of a token of the model's patch grid (its family's
    `token_stride`); for a family without a token grid, an eighth of x's shorter side."""
    stride = get_family(model).token_stride
    return stride(model) if stride is not None else max(1, min(x.shape[-2:]) // 8)


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


@torch.no_grad()
def occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, patch: int,
              batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The drop in the target class's probability when one `patch` x `patch` square of the
    input is set to 0 (the dataset's mean colour in the normalised input), for each square of
    a grid of that size, in batches of `batch_size` occluded images.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map over the squares
    [B, ceil(H / patch), ceil(W / patch)], logits)."""
    logits = model(x)
    if target is None:
        target = logits.argmax(1)
    B, _, H, W = x.shape
    rows, cols = -(-H // patch), -(-W // patch)
    squares = [(r * patch, c * patch) for r in range(rows) for c in range(cols)]
    base = logits.float().softmax(-1).gather(1, target[:, None])  # [B, 1]
    drops = torch.empty(B, len(squares), device=x.device)
    for b in range(B):
        for start in range(0, len(squares), batch_size):
            chunk = squares[start:start + batch_size]
            hidden = x[b].repeat(len(chunk), 1, 1, 1)
            for i, (top, left) in enumerate(chunk):
                hidden[i, :, top:top + patch, left:left + patch] = 0
            probs = model(hidden).float().softmax(-1)[:, target[b]]
            drops[b, start:start + len(chunk)] = base[b] - probs
    return drops.view(B, rows, cols), logits
