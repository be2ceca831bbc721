"""Are the maps faithful to the model? Deletion and insertion curves (Petsiuk et al. 2018,
"RISE"), against a random-order baseline, and the model-randomisation check (Adebayo et al.
2018, "Sanity checks for saliency maps").

Deletion: replace the input's pixels, most important first by the map, with the image's
mean colour in `steps` equal steps and follow the target class's probability: a faithful
map makes it fall fast (low area under the curve). Insertion: start from a blurred copy
(Gaussian, sigma a tenth of the side) and put the pixels back in the same order: the
probability should rise fast (high area). A map no better than chance scores as the random
order does; a random map on the model's token grid is the control of the maps' grain
(`random_grid_maps`). ROAD deletion (Rong et al. 2022, on request) fills the removed pixels
from their neighbours instead of the mean colour, so that neither the mask's shape nor the
texture of scattered constant pixels tells the model anything (`imputation`). Pixels are
those of the model's input (after the evaluation transform); ties in a map are broken at
random, so a coarse map is not favoured by the raster order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vistra.data import eval_transform, load_rgb, scan_image_folder

from .generic import spread, token_geometry
from .imputation import linear_imputation

RANDOM = "random"  # the name of the baseline order in reports
RANDOM_GRID = "random-grid"  # random values per token, upsampled as the maps are
BASELINES = (RANDOM, RANDOM_GRID)


def blurred(x: torch.Tensor, sigma_fraction: float = 0.1) -> torch.Tensor:
    """x [B, C, H, W] blurred by a separable Gaussian of sigma = fraction of the longer side
    (reflect padding)."""
    sigma = max(x.shape[-2:]) * sigma_fraction
    radius = min(int(3 * sigma), min(x.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    C = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def random_grid_maps(model: nn.Module, x: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, H, W] maps of random values on the model's token grid (one per patch), spread
    bilinearly over the input as the methods' maps are. The control for a coarse map: every
    method ranks pixels in blobs of about a patch, and deleting pixels scattered at random
    changes an image more than deleting the same number in a few blobs, so a map should be
    measured against a random order of the same grain too. On the CPU (maps are)."""
    B, _, H, W = x.shape
    geometry = token_geometry(model, (H, W))
    grid = torch.rand(B, -(-H // geometry.stride), -(-W // geometry.stride),
                      generator=generator, device="cpu")
    return spread(grid, geometry, (H, W))


def pixel_order(heat: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat pixel indices of a map [H, W], highest first, ties in random order."""
    shuffle = torch.randperm(heat.numel(), generator=generator)
    ranked = torch.argsort(heat.flatten()[shuffle], descending=True, stable=True)
    return shuffle[ranked]


class Curves(NamedTuple):
    """Target-class probabilities [B, steps + 1] along each curve."""
    deletion: torch.Tensor  # pixels replaced by the image's mean colour
    insertion: torch.Tensor  # pixels put back into a blurred copy
    road: torch.Tensor | None  # deletion with the pixels imputed from their neighbours


@torch.inference_mode()
def curves(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
           steps: int = 32, generator: torch.Generator | None = None, road: bool = False
           ) -> Curves:
    """The deletion and insertion curves (and with `road`, deletion with noisy linear
    imputation, `imputation.linear_imputation`) for images x [B, C, H, W] and maps [B, H, W]
    at the input's resolution."""
    model.eval()
    device = next(model.parameters()).device
    # The sequences are built on the CPU (ROAD's solver runs there); each chunk of them
    # goes to the model's device and its logits come back.
    x, maps, target = x.cpu(), maps.cpu(), target.cpu()
    B, C, H, W = x.shape
    counts = torch.linspace(0, H * W, steps + 1).round().long()
    ranks = torch.empty(B, H * W, dtype=torch.long)
    for b in range(B):
        ranks[b, pixel_order(maps[b], generator)] = torch.arange(H * W)
    # [B, steps+1, 1, H, W]: step k changes the pixels ranked below counts[k]
    chosen = (ranks[:, None, :] < counts[None, :, None]).view(B, steps + 1, 1, H, W)
    mean = x.mean(dim=(2, 3), keepdim=True)[:, None]
    blur = blurred(x)[:, None]
    image = x[:, None]
    sequences = [torch.where(chosen, mean, image), torch.where(chosen, image, blur)]
    if road:
        sequences.append(torch.stack([
            torch.stack([linear_imputation(x[b], chosen[b, k, 0], generator=generator)
                         for k in range(steps + 1)]) for b in range(B)]))
    probs = []
    for sequence in sequences:
        logits = torch.cat([model(chunk.to(device)).float().cpu()
                            for chunk in sequence.flatten(0, 1).split(256)])
        p = logits.softmax(-1).view(B, steps + 1, -1)
        probs.append(p.gather(2, target.view(B, 1, 1).expand(B, steps + 1, 1))[..., 0])
    return Curves(probs[0], probs[1], probs[2] if road else None)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under [..., steps + 1] values at equally spaced fractions of [0, 1]."""
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation of each pair of maps [B, H, W] (ties broken by position)."""
    def ranks(m: torch.Tensor) -> torch.Tensor:
        return m.flatten(1).argsort(1).argsort(1).double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with freshly initialised weights (Adebayo et al.'s full
    randomisation), in eval mode on the model's device."""
    with torch.random.fork_rng():  # leave the caller's random state as it was
        torch.manual_seed(seed)
        fresh = type(model)(model.cfg)
    for name in ("name", "arch", "data_config", "classes"):
        if hasattr(model, name):
            setattr(fresh, name, getattr(model, name))
    return fresh.to(next(model.parameters()).device).eval()


@dataclass
class MethodScore:
    deletion: float  # mean AUC, lower is better
    insertion: float  # mean AUC, higher is better
    seconds_per_image: float  # the map alone, batched
    randomised_spearman: float | None = None  # vs the re-initialised model; near 0 is good
    road: float | None = None  # mean AUC of deletion with linear imputation, lower is better
    empty: float = 0.0  # share of maps that are constant (no ranking: a random order)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FaithfulnessReport:
    images: int
    steps: int
    accuracy: float  # of the model on the evaluated images
    scores: dict[str, MethodScore] = field(default_factory=dict)  # method or baseline -> score

    def to_dict(self) -> dict:
        return {"images": self.images, "steps": self.steps, "accuracy": self.accuracy,
                "methods": {m: s.to_dict() for m, s in self.scores.items()}}

    def format(self) -> str:
        road = any(s.road is not None for s in self.scores.values())
        lines = [f"{self.images} images, {self.steps} steps, model accuracy "
                 f"{100 * self.accuracy:.1f}%",
                 f"{'method':<14} {'deletion AUC':>13} {'insertion AUC':>14} "
                 + (f"{'ROAD deletion':>14} " if road else "")
                 + f"{'empty maps':>11} {'s / image':>10} {'rank corr. vs random model':>27}"]
        for name, s in self.scores.items():
            corr = "" if s.randomised_spearman is None else f"{s.randomised_spearman:+.3f}"
            lines.append(f"{name:<14} {s.deletion:>13.3f} {s.insertion:>14.3f} "
                         + (f"{s.road:>14.3f} " if road else "")
                         + f"{100 * s.empty:>10.1f}% {s.seconds_per_image:>10.4f} {corr:>27}")
        lines.append("deletion" + (" and ROAD deletion" if road else "")
                     + ": lower is better; insertion: higher is better")
        return "\n".join(lines)


def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, methods: list[str], *,
             steps: int = 32, batch_size: int = 32, sanity: bool = True, seed: int = 0,
             road: bool = False, **options) -> FaithfulnessReport:
    """Deletion / insertion AUC per method and for the random orders (`BASELINES`), on
    preprocessed images x [N, C, H, W] explained for their labels [N]; with `road`, ROAD
    deletion too; with `sanity`, each method's rank correlation between the maps of the
    model and of a re-initialised copy."""
    from . import explain_batch

    generator = torch.Generator().manual_seed(seed)
    randomised = randomised_copy(model, seed) if sanity else None
    sums: dict[str, list[float]] = {}
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], labels[start:start + batch_size]
        with torch.inference_mode():
            correct += int((model.eval()(xb.to(next(model.parameters()).device)).argmax(1).cpu()
                            == yb).sum())
        for method in [*methods, *BASELINES]:
            began = time.perf_counter()
            if method == RANDOM:
                maps = torch.rand(xb.shape[0], *xb.shape[-2:], generator=generator)
            elif method == RANDOM_GRID:
                maps = random_grid_maps(model, xb, generator)
            else:
                maps, _ = explain_batch(model, xb, method, yb, **options)
            seconds = time.perf_counter() - began
            found = curves(model, xb, maps, yb, steps=steps, generator=generator, road=road)
            corr = 0.0
            if randomised is not None and method not in BASELINES:
                corr = float(spearman(maps, explain_batch(randomised, xb, method, yb,
                                                          **options)[0]).sum())
            flat = maps.flatten(1)
            empty = float((flat.amax(1) <= flat.amin(1)).sum())
            acc = sums.setdefault(method, [0.0] * 6)
            for i, value in enumerate((
                    float(auc(found.deletion).sum()), float(auc(found.insertion).sum()),
                    seconds, corr, float(auc(found.road).sum()) if road else 0.0, empty)):
                acc[i] += value
    n = len(x)
    report = FaithfulnessReport(n, steps, correct / max(n, 1))
    for method, (deletion, insertion, seconds, corr, road_deletion, empty) in sums.items():
        report.scores[method] = MethodScore(
            deletion / n, insertion / n, seconds / n,
            corr / n if randomised is not None and method not in BASELINES else None,
            road_deletion / n if road else None, empty / n)
    return report


def load_labelled(model: torch.nn.Module, data: Path, limit: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` images of a labelled folder (a seeded random subset), preprocessed for
    the model, with their class indices in the model's classes."""
    classes = getattr(model, "classes", None)
    if not classes:
        raise ValueError("the checkpoint records no class names, so the folder's labels "
                         "cannot be matched to its outputs")
    split = scan_image_folder(data, val_fraction=0.0)
    samples = split.val if split.split_source == "folders" else split.train
    unknown = sorted(set(split.classes) - set(classes))
    if unknown:
        raise ValueError(f"{data} has classes the model does not know: {', '.join(unknown)}")
    if not samples:
        raise ValueError(f"{data} holds no readable labelled images")
    known = [classes.index(name) for name in split.classes]
    return labelled_images(model, [(path, known[label]) for path, label in samples], limit,
                           seed)


def labelled_images(model: torch.nn.Module, samples: list[tuple[Path, int]], limit: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` of (image path, class index) `samples` (a seeded random subset, in their
    order), preprocessed for the model, and their class indices."""
    if len(samples) > limit:
        pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        samples = [samples[i] for i in sorted(pick[:limit].tolist())]
    transform = eval_transform(model)
    x = torch.stack([transform(load_rgb(path)) for path, _ in samples])
    return x, torch.tensor([label for _, label in samples])
