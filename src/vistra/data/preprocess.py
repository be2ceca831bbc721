"""The image -> model input step of evaluation, prediction and serving: the resize, centre
crop and normalisation a model's data config prescribes, in the model's input channels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from PIL import Image
from torch import nn

from .transforms import EvalTransform, TrainTransform, build_eval_transform, grey_level

if TYPE_CHECKING:
    from vistra.models import DataConfig

Transform = Callable[[Image.Image], torch.Tensor]
AnyTransform = TypeVar("AnyTransform", TrainTransform, EvalTransform)


def fit_channels(transform: AnyTransform, in_chans: int) -> AnyTransform:
    """Adapt an RGB transform to the model's input channels (3, or 1 for grey-level models)."""
    if in_chans == 3:
        return transform
    if in_chans == 1:
        return grey_level(transform)
    raise ValueError(f"the model takes {in_chans} input channels; vistra's image pipeline "
                     "feeds 3 (RGB) or 1 (grey level)")


def eval_transform_for(data_config: DataConfig, in_chans: int) -> EvalTransform:
    """The preprocessing `data_config` prescribes (resize, centre crop, normalise), for a model
    of `in_chans` input channels: what a checkpoint or an exported file records suffices."""
    dc = data_config
    transform = build_eval_transform(dc.img_size, dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    return fit_channels(transform, in_chans)


def eval_transform(model: nn.Module) -> EvalTransform:
    """The preprocessing the model's data_config prescribes: resize, centre crop, normalise."""
    return eval_transform_for(model.data_config, model.arch.in_chans)
