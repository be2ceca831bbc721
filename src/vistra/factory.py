"""`create_model`: the registry's architecture plus, when asked, weights from a file."""

from __future__ import annotations

from os import PathLike

from torch import nn

from .models import build_model


def create_model(name: str, *, pretrained: str | PathLike | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 **overrides) -> nn.Module:
    """Build a registered model; with `pretrained`, load a checkpoint file into it.

    num_classes: None keeps the variant's (1000, 21843, ...); 0 removes the head so the
    model returns pooled features. img_size: build for another input size.
    """
    model = build_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    if pretrained is not None:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    return model
