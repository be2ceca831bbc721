"""Maps that only run the model: occlusion and RISE. Each hides parts of the image and
measures how the class's score changes, so the map says what the output depends on by
construction, for any model: every family, a model without one, and a Classifier or any
function batch -> logits (an exported .onnx graph in onnxruntime).

Hidden means, by default, replaced by the image's own mean colour, channel by channel
(`mean_colour`). Not black, nor 0 in the normalised input (the dataset's mean colour): on a
dark or a bright image those make the hidden part an object of its own, far from everything
around it, with strong new edges; the image's mean is the constant closest to all of it. A
blurred copy of the image, which adds no edge at all, was tried first and measured worse:
it leaves the mass of what it hides smeared around the same place, and the model still sees
it there. On the quadrant task of tests/test_explain.py (a ViT trained to 100%, 100
held-out images, the map's peak in the bright square's quadrant), occlusion with 4-pixel
windows found the square for 75% of the images with a blurred copy (sigma twice the window)
and 100% with the mean colour, RISE for 98% and 100%.

`fill="minimum"` hides with each channel's minimum instead: where the background is the
minimum (Fashion-MNIST's flat black) that is the background itself, and the map then says
what the score loses when a part becomes background. Where it is not (a noisy or bright
background), the minimum cuts new dark objects: on the location task of
tests/location_task.py such maps found the object on 5-34% of the images, below chance.
What a deletion score calls faithful depends on how it removes pixels, and each removal is
won by the map that removes the same way: on the Fashion-MNIST recipe models
(benchmarks/explain.md) RISE with the mean colour is the most faithful map under Quantus's
ROAD (pixels imputed from their neighbours) and the same RISE with the minimum under
Quantus's pixel flipping to the minimum, each ahead of every other map on its own measure
and behind the other on the other's.

`occlusion` (Zeiler & Fergus 2014, "Visualizing and understanding convolutional
networks") slides a window over the image, as Captum's Occlusion: a pixel's value is the
mean, over the windows that cover it, of the drop in the target's log-probability when the
window is hidden. The log-probability rather than the probability: for one window the
order is the same, but a confident model's probability rounds to 1 whatever is hidden.

`rise` (Petsiuk et al. 2018, "RISE: Randomized input sampling for explanation of black-box
models") weighs N random smooth masks by the target's probability on the image seen
through them: a grid of cells kept with probability p, upsampled bilinearly to one cell
more than the image and cropped at a random shift within a cell (the authors' code,
eclique/RISE), the image blended with its mean colour by the mask. Each pixel's sum is
divided by how much the masks kept of it, sum_i M_i, where the paper divides by its
expectation N p: the two agree as N grows, but with N p the map also shows where the drawn
masks happen to be dense, the same for any model: on the sanity check's task
(tests/test_explain_perturb.py) the maps of a trained and of a re-initialised ViT had a
rank correlation of 0.97 with 200 masks and 0.93 with 1000, for they showed the masks;
divided by sum_i M_i, 0.00 and -0.02. A model that ignores the image gets a flat map. The
masks are drawn from `seed` on the input's device: the same seed gives the same masks on one
kind of device.

Everything is made on the input's device, in batches of `batch_size` perturbed images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]

RISE_MASKS = 1000  # the paper used 4000 (ResNet-50) and 8000 (VGG-16) on ImageNet
RISE_CELLS = 7  # the paper's grid, s = 7
RISE_KEEP = 0.5  # the paper's p


def logits_of(model: Model, batch: torch.Tensor) -> torch.Tensor:
    """The model's logits [B, K] for a batch, float32 on the batch's device. A module is
    called as it is (explain puts it in eval mode); anything else, such as a Classifier,
    as a function batch -> logits, its answer brought to the batch's device."""
    with torch.no_grad():
        return model(batch).float().to(batch.device)


FILLS = ("mean", "minimum")  # what hides a pixel: the image's mean colour or its minimum


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] -> each image's mean colour, channel by channel, at every pixel."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


def check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")


def hiding(x: torch.Tensor, fill: str) -> torch.Tensor:
    """x [B, C, H, W] -> what a hidden pixel becomes, at every pixel: each image's mean
    colour (`fill` "mean") or its minimum (`fill` "minimum"), channel by channel."""
    check_fill(fill)
    if fill == "mean":
        return mean_colour(x)
    return x.amin(dim=(2, 3), keepdim=True).expand_as(x)


def default_window(x: torch.Tensor) -> int:
    """A seventh of the shorter side: 4 pixels at 28, 32 at 224, so that with the default
    half-window stride an image costs 13 x 13 forwards at any size."""
    return max(1, min(x.shape[-2:]) // 7)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """First pixels of windows of `window` sliding over `size` pixels by `stride`, and one
    more against the far edge where the stride does not land there: every pixel is covered."""
    last = size - window
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def _coverage(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """[windows, size] bool: which pixels along one axis each window covers."""
    starts = torch.tensor(window_starts(size, window, stride), device=device)
    position = torch.arange(size, device=device)
    return (position >= starts[:, None]) & (position < starts[:, None] + window)


def _target_or_predicted(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return logits.argmax(1) if target is None else target.to(logits.device)


@torch.no_grad()
def occlusion(model: Model, x: torch.Tensor, target: torch.Tensor | None, *,
              window: int | None = None, stride: int | None = None, fill: str = "mean",
              batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean drop in the target class's log-probability over the windows covering each
    pixel, each `window` x `window` window (None: `default_window`; clipped to the image)
    hidden in turn (`hiding` by `fill`), sliding by `stride` (None: half the window) and
    against the far edges.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, H, W], logits)."""
    B, _, H, W = x.shape
    window = default_window(x) if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    if window < 1 or stride < 1:
        raise ValueError(f"occlusion needs a window and a stride of 1 pixel or more, got "
                         f"window {window} and stride {stride}")
    logits = logits_of(model, x)
    target = _target_or_predicted(logits, target)
    base = logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
    rows = _coverage(H, min(window, H), stride, x.device)  # [T, H]
    cols = _coverage(W, min(window, W), stride, x.device)  # [L, W]
    T, L = len(rows), len(cols)
    hidden = hiding(x, fill)
    drops = torch.empty(B * T * L, device=x.device)
    for start in range(0, B * T * L, batch_size):
        k = torch.arange(start, min(start + batch_size, B * T * L), device=x.device)
        b, t, c = k // (T * L), k // L % T, k % L  # image, window row, window column
        inside = rows[t][:, :, None] & cols[c][:, None, :]  # [n, H, W]
        scores = logits_of(model, torch.where(inside[:, None], hidden[b], x[b]))
        drops[k] = base[b] - scores.log_softmax(-1).gather(1, target[b][:, None])[:, 0]
    rows, cols = rows.float(), cols.float()
    total = torch.einsum("th,btl,lw->bhw", rows, drops.view(B, T, L), cols)
    return total / (rows.sum(0)[:, None] * cols.sum(0)[None]), logits


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]
               ) -> torch.Tensor:
    """Grids [N, s, s] of kept (1) and hidden (0) cells -> masks [N, H, W] in [0, 1]: each
    grid upsampled bilinearly to s + 1 cells of ceil(H / s) x ceil(W / s) pixels, then the
    H x W crop starting at its shift [N, 2] (rows, columns; within one cell)."""
    N, s, _ = grids.shape
    H, W = size
    up = F.interpolate(grids[:, None], size=((s + 1) * -(-H // s), (s + 1) * -(-W // s)),
                       mode="bilinear")[:, 0]
    rows = shifts[:, :1] + torch.arange(H, device=grids.device)  # [N, H]
    cols = shifts[:, 1:] + torch.arange(W, device=grids.device)  # [N, W]
    which = torch.arange(N, device=grids.device)[:, None, None]
    return up[which, rows[:, :, None], cols[:, None, :]]


def draw_rise_grids(count: int, size: tuple[int, int], *, cells: int = RISE_CELLS,
                    keep: float = RISE_KEEP, seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random grids [count, cells, cells] (each cell kept with probability `keep`)
    and their shifts [count, 2], drawn from `seed` on `device`."""
    if count < 1 or cells < 1 or not 0 < keep <= 1:
        raise ValueError(f"rise needs 1 or more masks and cells and a keep probability in "
                         f"(0, 1], got {count} masks, {cells} cells, keep {keep}")
    generator = torch.Generator(device=device).manual_seed(seed)
    grids = (torch.rand(count, cells, cells, generator=generator, device=device) < keep).float()
    shifts = torch.stack([torch.randint(0, -(-side // cells), (count,), generator=generator,
                                        device=device) for side in size], 1)
    return grids, shifts


@torch.no_grad()
def rise(model: Model, x: torch.Tensor, target: torch.Tensor | None, *,
         masks: int = RISE_MASKS, cells: int = RISE_CELLS, keep: float = RISE_KEEP,
         seed: int = 0, fill: str = "mean", batch_size: int = 64
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i P(target | x_i) M_i / sum_i M_i, x_i = M_i x + (1 - M_i) hiding(x, fill), over
    N = `masks` masks M_i (`rise_masks` of `draw_rise_grids`), the same masks for every
    image; 0 where no mask kept anything.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, H, W], logits)."""
    B, _, H, W = x.shape
    logits = logits_of(model, x)
    target = _target_or_predicted(logits, target)
    grids, shifts = draw_rise_grids(masks, (H, W), cells=cells, keep=keep, seed=seed,
                                    device=x.device)
    hidden = hiding(x, fill)
    saliency = torch.zeros(B, H, W, device=x.device)
    kept = torch.zeros(H, W, device=x.device)
    for start in range(0, masks, batch_size):
        chunk = rise_masks(grids[start:start + batch_size], shifts[start:start + batch_size],
                           (H, W))  # [n, H, W]
        kept += chunk.sum(0)
        blend = chunk[:, None].to(x.dtype)  # [n, 1, H, W]
        for b in range(B):
            seen = x[b] * blend + hidden[b] * (1 - blend)
            probs = logits_of(model, seen).softmax(-1)[:, target[b]]
            saliency[b] += torch.einsum("n,nhw->hw", probs, chunk)
    return saliency / kept.clamp(min=torch.finfo(kept.dtype).tiny), logits
