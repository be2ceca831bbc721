"""`create_model`: the registry's architecture plus, when asked, weights from a file or from
the local HuggingFace cache, and optionally as a feature backbone."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

from torch import nn

from .models import FeatureExtractor, build_model


def create_model(name: str, *, pretrained: bool | str | PathLike | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 features_only: bool = False, out_indices: int | Sequence[int] | None = None,
                 output_fmt: str = "NCHW", **overrides) -> nn.Module:
    """Build a registered model; with `pretrained`, load weights into it.

    name: a registered name (`vistra models`), optionally with a timm tag
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k": those weights when pretrained), or a
    HuggingFace repository ("hf-hub:timm/...", "google/vit-base-patch16-224"), whose weights
    are then loaded and whose architecture is read from them. pretrained: a weights file or
    directory, True (timm's default weights of the name), a timm tag, "hf-hub:org/name" or
    "org/name"; names are looked up in the local HuggingFace cache, never downloaded.
    num_classes: None keeps the classes of the weights (or the variant's 1000, 21843, ...
    without any); 0 removes the head so the model returns pooled features; another number
    gets a freshly initialised head. img_size: build for another input size (position
    embeddings are resampled on load). What loading did is in `model.load_report`, the
    weights' class names in `model.classes`.

    features_only: return a FeatureExtractor giving the feature maps at `out_indices` (Swin:
    the four stages, default all; ViT: the blocks, default the last 3, as timm), NCHW or NHWC.
    """
    from .weights.hub import is_hub_name, split_tag

    if pretrained is False:
        pretrained = None
    if is_hub_name(name):  # the repository names both the weights and the architecture
        if pretrained not in (None, True):
            raise ValueError(f"{name} names its own weights; drop pretrained={pretrained!r}")
        pretrained, name = name, None
    elif split_tag(name)[1] is not None and pretrained is None:
        raise ValueError(f"{name} names pretrained weights by its tag; pass pretrained=True "
                         f"to load them, or use {split_tag(name)[0]} for a fresh model")
    if pretrained is None:
        model = build_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    else:
        from .weights.load import apply_pretrained, model_name_for, read_pretrained

        weights = read_pretrained(pretrained, name)
        name = split_tag(name)[0] if name is not None else model_name_for(weights)
        if num_classes is None and weights.num_classes:
            num_classes = weights.num_classes
        model = build_model(name, num_classes=num_classes, img_size=img_size, **overrides)
        apply_pretrained(model, weights)
    if features_only:
        return FeatureExtractor(model, out_indices, output_fmt)
    return model

