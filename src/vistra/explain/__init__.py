"""Where a model looked: heat maps over the input image, and how faithful they are.

    import vistra
    exp = vistra.explain(model, Image.open("cat.jpg"))     # the model's default method
    from vistra.explain import overlay, METHODS, methods_for
    overlay(image, exp).save("cat.grad-rollout.png")

`vistra.explain` (the attribute of the top-level package) is the function; the package of
the same name holds it with the rest (`Explanation`, `overlay`, `METHODS`, `methods_for`,
and `faithfulness` for deletion / insertion scores). Import those with `from vistra.explain
import ...`, which always reaches the package (`import vistra.explain as x` binds the
function, as the attribute wins there).

Methods: each model family declares those that apply to it, its default first (its
`explain_methods`, models/family.py): `rise` (the default of both; see below), `rollout`
and `grad-rollout` for ViT / DeiT / R50 hybrid, `gradcam`, `scorecam` and `window` for Swin,
and `lrp` (AttnLRP, Achtibat et al. 2024: relevance at the pixels in one backward) for both.
RISE is the families' default because on tests/test_explain_location.py's task (the class
is where a bright object lies, a dim one elsewhere) its maximum fell on the object for
92-100% of the images with the Fashion-MNIST ViT and Swin, where grad-rollout (58%) and
Grad-CAM (7-25%) missed it; it costs RISE_MASKS forward passes per image. `gradient`,
`occlusion` and `rise` work on any model (the first two are the methods of a family that
declares none); `occlusion` and `rise` only run it, so they also explain a Classifier
(vistra.runtime, an .onnx file in onnxruntime included) or any function batch -> logits,
whose default is `occlusion`. A model whose card records the method measured most faithful
for it (`choose.py`: `vistra explain --choose`, the end of `vistra train`) defaults to that
one instead (`default_method`, `default_reason`), and so does an .onnx file exported from
it, while the record names occlusion or rise. Each runs the model's own forward (the
plain model; an optimized one takes its plain path while gradients or recorded attention
weights are asked for); attention weights are recorded only for the duration of the call.
Token maps are placed where each token sees (`generic.spread`). A new method is its module
and its entry in METHOD_TABLE (and, if it suits some families only, their
`explain_methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vistra.data import eval_transform
from vistra.models import ExplainChoice, TokenGeometry, get_family

from .attention import grad_rollout, rollout
from .generic import PIXELS, gradient, spread, token_geometry
from .lrp import lrp
from .perturbation import RISE_MASKS, Model, check_fill, logits_of, occlusion, rise
from .render import overlay
from .swin import gradcam, scorecam, window_attention


@dataclass(frozen=True)
class Options:
    """What some methods read beyond the batch and the target: see explain_batch."""

    block: int | None = None
    query: tuple[float, float] = (0.5, 0.5)
    stage: int | None = None
    layer: nn.Module | None = None
    window: int | None = None
    stride: int | None = None
    masks: int = RISE_MASKS
    seed: int = 0
    fill: str = "mean"


@dataclass(frozen=True)
class Method:
    """run(model, x, target, options) -> (map over tokens [B, h, w], logits, where its tokens
    see); `upsample`: how that map is spread over the image ("nearest" keeps squares
    visible)."""

    run: Callable[[Model, torch.Tensor, torch.Tensor | None, Options],
                  tuple[torch.Tensor, torch.Tensor, TokenGeometry]]
    upsample: str = "bilinear"


def _on_token_grid(maps_and_logits, model: nn.Module
                   ) -> tuple[torch.Tensor, torch.Tensor, TokenGeometry]:
    grid, logits = maps_and_logits
    return grid, logits, token_geometry(model)


METHOD_TABLE: dict[str, Method] = {
    "rollout": Method(lambda m, x, t, o: _on_token_grid(rollout(m, x), m)),
    "grad-rollout": Method(lambda m, x, t, o: _on_token_grid(grad_rollout(m, x, t), m)),
    "gradcam": Method(lambda m, x, t, o: gradcam(m, x, t, o.stage, layer=o.layer)),
    "scorecam": Method(lambda m, x, t, o: scorecam(m, x, t, o.stage, layer=o.layer)),
    "window": Method(lambda m, x, t, o: window_attention(m, x, o.block, o.query), "nearest"),
    "occlusion": Method(lambda m, x, t, o: (
        *occlusion(m, x, t, window=o.window, stride=o.stride, fill=o.fill), PIXELS),
        "nearest"),
    "rise": Method(lambda m, x, t, o: (
        *rise(m, x, t, masks=o.masks, seed=o.seed, fill=o.fill), PIXELS), "nearest"),
    "gradient": Method(lambda m, x, t, o: (*gradient(m, x, t), PIXELS), "nearest"),
    "lrp": Method(lambda m, x, t, o: (*lrp(m, x, t), PIXELS), "nearest"),
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
ANY_MODEL = ("occlusion", "rise", "gradient")  # whatever the family declares
ONLY_RUNNING = ("occlusion", "rise")  # for a Classifier or a function batch -> logits

__all__ = ["METHODS", "Explanation", "default_method", "default_reason", "explain",
           "explain_batch", "methods_for", "overlay"]


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


def methods_for(model: Model) -> tuple[str, ...]:
    """The methods that apply to this model, in the order of METHODS: its family's and
    `ANY_MODEL`; for a Classifier or another function batch -> logits, `ONLY_RUNNING`."""
    if not isinstance(model, nn.Module):
        return ONLY_RUNNING
    declared = _family(model)
    return tuple(m for m in METHODS if m in declared or m in ANY_MODEL)


def default_method(model: Model) -> str:
    """The method used when none is asked for, the one place that decides it: the method
    measured most faithful for this model (`vistra explain --choose`, the end of `vistra
    train`: its card's `explain`) while it still applies, else its family's default
    (rise for ViT-like models and Swin); for a Classifier or another function batch ->
    logits, the choice an .onnx file records if it is occlusion or rise, else occlusion."""
    return _default(model)[0]


def default_reason(model: Model) -> str:
    """Why `default_method` chose what it chose, in a few words for a person."""
    return _default(model)[1]


def _default(model: Model) -> tuple[str, str]:
    if not isinstance(model, nn.Module):
        return _default_only_run(getattr(model, "explain", None))
    family = get_family(model).name
    choice = model.card.explain
    if choice is None:
        return _family(model)[0], f"the {family} family's default (no recorded choice)"
    if choice.method not in methods_for(model):
        return _family(model)[0], (f"the {family} family's default (the recorded "
                                   f"{choice.method} does not apply to this model)")
    return choice.method, _recorded(choice)


def _default_only_run(choice: ExplainChoice | None) -> tuple[str, str]:
    """A model that is only run: the choice its .onnx file records (a Classifier's
    `explain`) when it can run it, else occlusion."""
    default = "the default of a model that is only run ({})"
    if choice is None:
        return ONLY_RUNNING[0], default.format("no PyTorch module")
    if choice.method not in ONLY_RUNNING:
        return ONLY_RUNNING[0], default.format(
            f"the checkpoint's recorded choice {choice.method} needs the PyTorch model; an "
            f".onnx file runs {' and '.join(ONLY_RUNNING)} only")
    return choice.method, _recorded(choice)


def _recorded(choice: ExplainChoice) -> str:
    return (f"recorded by {choice.by} on {choice.images} images of {choice.data}: ROAD "
            f"deletion {choice.versus_random(choice.method, 'road'):.2f}x and mean-colour "
            f"deletion {choice.versus_random(choice.method, 'deletion'):.2f}x the random "
            f"order's (the lowest mean of the {len(choice.scores) - 1} methods scored)")


def _check_method(model: Model, method: str | None) -> str:
    if method is None:
        return default_method(model)
    if method not in methods_for(model):
        known = "" if method in METHODS else f"unknown method {method!r}; "
        raise ValueError(f"{known or f'method {method!r} does not apply to this model; '}"
                         f"for {_name(model)} use one of {', '.join(methods_for(model))}")
    return method


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own min and max (an all-constant map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp(min=torch.finfo(maps.dtype).tiny)
    return ((maps - low[:, None, None]) / span[:, None, None]).clamp(0, 1)


def explain_batch(model: Model, x: torch.Tensor, method: str | None = None,
                  target: torch.Tensor | None = None, *, block: int | None = None,
                  query: tuple[float, float] = (0.5, 0.5), stage: int | None = None,
                  layer: nn.Module | None = None, window: int | None = None,
                  stride: int | None = None, masks: int = RISE_MASKS, seed: int = 0,
                  fill: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Maps for a preprocessed batch x [B, C, H, W] -> (maps [B, H, W] in [0, 1], logits
    [B, K]), on the CPU. target [B] class indices, or None for each image's predicted class.
    model: a module (x goes to its device), or a Classifier or any function batch -> logits
    (x stays where it is).

    `stage` picks the Swin stage whose last block's norm1 Grad-CAM (None: the last stage)
    and Score-CAM (None: the first) read, or `layer` the module whose [B, h, w, C] output
    they read; `block` (index over the model's Swin blocks, None: the first shifted one)
    and `query` (row, column as fractions of the input) pick what `window` shows. `window`
    and `stride` (pixels; None: a seventh of the shorter side, and half the window) are
    occlusion's, `masks` and `seed` RISE's; `fill` what both hide with ("mean": each image's
    mean colour, "minimum": its minimum, the background of a dark image; see
    perturbation.py). A module runs in eval mode for the call."""
    method = _check_method(model, method)
    check_fill(fill)  # before the model runs, whatever the method
    module = model if isinstance(model, nn.Module) else None
    if module is not None:
        x = x.to(next(module.parameters()).device)
    if target is not None:
        target = target.to(x.device)
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    chosen = METHOD_TABLE[method]
    options = Options(block, query, stage, layer, window, stride, masks, seed, fill)
    try:
        grid, logits, geometry = chosen.run(model, x, target, options)
    finally:
        if module is not None:
            module.train(was_training)
    maps = spread(grid.float(), geometry, x.shape[-2:], chosen.upsample)
    return _normalise(maps).cpu(), logits.float().cpu()


def explain(model: Model, image: Image.Image | torch.Tensor, *, method: str | None = None,
            target: int | None = None, block: int | None = None,
            query: tuple[float, float] = (0.5, 0.5), stage: int | None = None,
            window: int | None = None, stride: int | None = None, masks: int = RISE_MASKS,
            seed: int = 0, fill: str = "mean") -> Explanation:
    """Explain the model's score for `target` (default: its top class) on one image.

    A PIL image is preprocessed with the model's evaluation transform (resize, centre crop,
    normalise; a Classifier's `transform`) and the map is returned at the image's own size:
    the crop's map is placed on the resized image and scaled back; what the crop cut off
    gets 0. A tensor [C, H, W] or [1, C, H, W] is taken as already preprocessed; the map has
    its H x W. method None: the model's default (see `default_method`); other options as
    in `explain_batch`."""
    if isinstance(image, Image.Image):
        x = preprocess(model, image)
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
        classes = class_count(model, x)
        if not 0 <= target < classes:
            raise ValueError(f"target must be a class index in 0..{classes - 1}, got {target}")
        targets = torch.tensor([target], device=x.device)
    maps, logits = explain_batch(model, x, method, targets, block=block, query=query,
                                 stage=stage, window=window, stride=stride, masks=masks,
                                 seed=seed, fill=fill)
    index = int(logits[0].argmax()) if target is None else target
    heat = maps[0]
    if isinstance(image, Image.Image):
        heat = _to_image_size(model, heat, image.size)
    names = getattr(model, "classes", None)
    return Explanation(map=heat, method=method, target=index,
                       label=names[index] if names else None,
                       probability=float(logits[0].softmax(-1)[index]))


def _name(model: Model) -> str:
    return getattr(model, "name", None) or type(model).__name__


def _transform(model: Model):
    """The model's evaluation transform (a module's data config, a Classifier's own)."""
    if isinstance(model, nn.Module):
        if not hasattr(model, "data_config"):
            raise ValueError("the model carries no preprocessing (.data_config); build it "
                             "with vistra.create_model or load a vistra checkpoint, or pass "
                             "a tensor")
        return eval_transform(model)
    if not hasattr(model, "transform"):
        raise ValueError(f"{_name(model)} carries no preprocessing (.transform); load it with "
                         f"vistra.runtime.load_classifier, or pass a tensor")
    return model.transform


def preprocess(model: Model, image: Image.Image) -> torch.Tensor:
    """One image as the model's input batch [1, C, H, W]."""
    return _transform(model)(image)[None]


def class_count(model: Model, x: torch.Tensor) -> int:
    """How many classes the model scores: a module's or a Classifier's own count, else the
    width of its logits for x."""
    if isinstance(model, nn.Module):
        return model.arch.num_classes
    if getattr(model, "classes", None):
        return len(model.classes)
    return logits_of(model, x).shape[1]


def _to_image_size(model: Model, heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map over the centre crop [h, w] -> the map over the original image of `size`
    (width, height), 0 where the crop cut the image off."""
    (rw, rh), (left, top, right, bottom) = _transform(model).geometry(*size)
    canvas = heat.new_zeros(rh, rw)  # the resize covers the crop, so the box lies inside
    canvas[top:bottom, left:right] = heat
    if (rw, rh) == size:
        return canvas
    out = F.interpolate(canvas[None, None], size=(size[1], size[0]), mode="bilinear",
                        antialias=rw > size[0])
    return out[0, 0].clamp(0, 1)
