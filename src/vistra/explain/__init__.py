"""Where a model looked: heat maps over the input image, and how faithful they are.

    import vistra
    exp = vistra.explain(model, Image.open("cat.jpg"))     # the family's default method
    from vistra.explain import overlay, METHODS, methods_for
    overlay(image, exp).save("cat.grad-rollout.png")

`vistra.explain` (the attribute of the top-level package) is the function; the package of
the same name holds it with the rest (`Explanation`, `overlay`, `METHODS`, `methods_for`,
and `faithfulness` for deletion / insertion scores). Import those with `from vistra.explain
import ...`, which always reaches the package (`import vistra.explain as x` binds the
function, as the attribute wins there).

Methods: each model family declares those that apply to it, its default first (its
`explain_methods`, models/family.py): `rollout` and `grad-rollout` (the default) for ViT /
DeiT / R50 hybrid, `gradcam` (the default), `scorecam` and `window` for Swin; `gradient` and
`occlusion` work on any model, and are the methods of a family that declares none. Each runs
the model's own forward (the plain model; an optimized one takes its plain path while
gradients or recorded attention weights are asked for); attention weights are recorded only
for the duration of the call. A new method is its module and its entry in METHODS (and, if
it suits some families only, their `explain_methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vistra.data import eval_transform
from vistra.models import get_family

from .attention import grad_rollout, rollout
from .generic import gradient, occlusion, token_stride
from .render import overlay
from .swin import gradcam, scorecam, window_attention


@dataclass(frozen=True)
class Options:
    """What some methods read beyond the batch and the target: see explain_batch."""

    block: int | None = None
    query: tuple[float, float] = (0.5, 0.5)
    stage: int | None = None
    layer: nn.Module | None = None


@dataclass(frozen=True)
class Method:
    """run(model, x, target, options) -> (map over tokens [B, h, w], logits, pixels per
    token); `upsample`: how that map grows to the image ("nearest" keeps squares visible)."""

    run: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, Options],
                  tuple[torch.Tensor, torch.Tensor, int]]
    upsample: str = "bilinear"


def _with_token_stride(maps_and_logits, model, x) -> tuple[torch.Tensor, torch.Tensor, int]:
    grid, logits = maps_and_logits
    return grid, logits, token_stride(model, x)


METHOD_TABLE: dict[str, Method] = {
    "rollout": Method(lambda m, x, t, o: _with_token_stride(rollout(m, x), m, x)),
    "grad-rollout": Method(lambda m, x, t, o: _with_token_stride(grad_rollout(m, x, t), m, x)),
    "gradcam": Method(lambda m, x, t, o: gradcam(m, x, t, o.stage, layer=o.layer)),
    "scorecam": Method(lambda m, x, t, o: scorecam(m, x, t, o.stage, layer=o.layer)),
    "window": Method(lambda m, x, t, o: window_attention(m, x, o.block, o.query), "nearest"),
    "occlusion": Method(lambda m, x, t, o: _with_token_stride(
        occlusion(m, x, t, token_stride(m, x)), m, x)),
    "gradient": Method(lambda m, x, t, o: (*gradient(m, x, t), 1), "nearest"),
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)

__all__ = ["METHODS", "Explanation", "default_method", "explain", "explain_batch",
           "methods_for", "overlay"]


@dataclass
class Explanation:
    map: torch.Tensor  # [H, W] float32 in [0, 1] at the input image's resolution
    method: str
    target: int  # class index explained
    label: str | None  # its class name if the model has classes
    probability: float  # softmax probability of target


def _family(model: nn.Module) -> tuple[str, ...]:
    """The model family's methods, the default first."""
    family = get_family(model)
    unknown = [m for m in family.explain_methods if m not in METHODS]
    if unknown or not family.explain_methods:
        raise ValueError(f"the {family.label} family declares the explain methods "
                         f"{family.explain_methods}; expected one or more of "
                         f"{', '.join(METHODS)}")
    return family.explain_methods


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The methods that apply to this model, in the order of METHODS."""
    return tuple(m for m in METHODS if m in _family(model))


def default_method(model: nn.Module) -> str:
    """The family's default: grad-rollout for ViT-like models, gradcam for Swin."""
    return _family(model)[0]


def _check_method(model: nn.Module, method: str | None) -> str:
    if method is None:
        return default_method(model)
    if method not in methods_for(model):
        known = "" if method in METHODS else f"unknown method {method!r}; "
        raise ValueError(f"{known or f'method {method!r} does not apply to this model; '}"
                         f"for {type(model).__name__} use one of {', '.join(methods_for(model))}")
    return method


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own min and max (an all-constant map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp(min=torch.finfo(maps.dtype).tiny)
    return ((maps - low[:, None, None]) / span[:, None, None]).clamp(0, 1)


def explain_batch(model: nn.Module, x: torch.Tensor, method: str | None = None,
                  target: torch.Tensor | None = None, *, block: int | None = None,
                  query: tuple[float, float] = (0.5, 0.5), stage: int | None = None,
                  layer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps for a preprocessed batch x [B, C, H, W] -> (maps [B, H, W] in [0, 1], logits
    [B, K]). target [B] class indices, or None for each image's predicted class.

    `stage` picks the Swin stage whose last block's norm1 Grad-CAM (None: the last stage)
    and Score-CAM (None: the first) read, or `layer` the module whose [B, h, w, C] output
    they read; `block` (index over the model's Swin blocks, None: the first shifted one)
    and `query` (row, column as fractions of the input) pick what `window` shows. The model
    runs in eval mode for the call."""
    method = _check_method(model, method)
    device = next(model.parameters()).device
    x = x.to(device)
    if target is not None:
        target = target.to(device)
    was_training = model.training
    model.eval()
    chosen = METHOD_TABLE[method]
    try:
        grid, logits, stride = chosen.run(model, x, target, Options(block, query, stage, layer))
    finally:
        model.train(was_training)
    h, w = grid.shape[-2:]
    up = F.interpolate(grid[:, None].float(), size=(h * stride, w * stride),
                       mode=chosen.upsample)
    return _normalise(up[:, 0, :x.shape[-2], :x.shape[-1]]).cpu(), logits.float().cpu()


def explain(model: nn.Module, image: Image.Image | torch.Tensor, *, method: str | None = None,
            target: int | None = None, block: int | None = None,
            query: tuple[float, float] = (0.5, 0.5), stage: int | None = None
            ) -> Explanation:
    """Explain the model's score for `target` (default: its top class) on one image.

    A PIL image is preprocessed with the model's evaluation transform (resize, centre crop,
    normalise) and the map is returned at the image's own size: the crop's map is placed on
    the resized image and scaled back; what the crop cut off gets 0. A tensor [C, H, W] or
    [1, C, H, W] is taken as already preprocessed; the map has its H x W. method None: the
    family's default (see `default_method`); other options as in `explain_batch`."""
    if isinstance(image, Image.Image):
        x = _preprocess(model, image)
    elif isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one image [C, H, W] or [1, C, H, W], got a tensor of "
                             f"shape {tuple(image.shape)}; use explain_batch for batches")
    else:
        raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    method = _check_method(model, method)
    targets = None
    if target is not None:
        classes = model.arch.num_classes
        if not 0 <= target < classes:
            raise ValueError(f"target must be a class index in 0..{classes - 1}, got {target}")
        targets = torch.tensor([target])
    maps, logits = explain_batch(model, x, method, targets, block=block, query=query,
                                 stage=stage)
    index = int(logits[0].argmax()) if target is None else target
    heat = maps[0]
    if isinstance(image, Image.Image):
        heat = _to_image_size(model, heat, image.size)
    names = getattr(model, "classes", None)
    return Explanation(map=heat, method=method, target=index,
                       label=names[index] if names else None,
                       probability=float(logits[0].softmax(-1)[index]))


def _preprocess(model: nn.Module, image: Image.Image) -> torch.Tensor:
    if not hasattr(model, "data_config"):
        raise ValueError("the model carries no preprocessing (.data_config); build it with "
                         "vistra.create_model or load a vistra checkpoint, or pass a tensor")
    return eval_transform(model)(image)[None]


def _to_image_size(model: nn.Module, heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map over the centre crop [h, w] -> the map over the original image of `size`
    (width, height), 0 where the crop cut the image off."""
    (rw, rh), (left, top, right, bottom) = eval_transform(model).geometry(*size)
    canvas = torch.zeros(rh, rw)  # the resize covers the crop, so the box lies inside
    canvas[top:bottom, left:right] = heat
    if (rw, rh) == size:
        return canvas
    out = F.interpolate(canvas[None, None], size=(size[1], size[0]), mode="bilinear",
                        antialias=rw > size[0])
    return out[0, 0].clamp(0, 1)
