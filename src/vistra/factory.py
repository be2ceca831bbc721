"""`create_model`: the registry's architecture plus, when asked, weights from a file."""

from __future__ import annotations

from os import PathLike

from torch import nn

from .models import build_model


def create_model(name: str, *, pretrained: str | PathLike | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 **overrides) -> nn.Module:
    """Build a registered model; with `pretrained`, load a weights file into it.

    num_classes: None keeps the classes of the weights file (or the variant's 1000, 21843,
    ... without one); 0 removes the head so the model returns pooled features; another
    number gets a freshly initialised head. img_size: build for another input size (position
    embeddings are resampled on load). What loading adapted is in `model.load_report`.
    """
    if pretrained is None:
        return build_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    from .weights.load import apply_pretrained, read_pretrained

    weights = read_pretrained(pretrained)
    if num_classes is None and weights.num_classes:
        num_classes = weights.num_classes
    model = build_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    model.load_report = apply_pretrained(model, weights)
    return model
