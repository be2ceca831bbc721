"""Model names (timm's, so users bring what they know) -> architecture numbers + data config.

Every variant is data: a config dataclass of a registered family (models/family.py) holding
its numbers, and the preprocessing its weights expect. Nothing here builds anything until
`build_model` is called.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from .base import DataConfig, VistraModel
from .family import get_family
from .layers import to_2tuple
from .swin import SwinConfig
from .vit import ViTConfig

INCEPTION_MEAN = (0.5, 0.5, 0.5)  # Google's ViT weights map pixels to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)
FASHION_MNIST_MEAN = (0.2860,) * 3  # of the 60,000 training images, grey level / 255
FASHION_MNIST_STD = (0.3530,) * 3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: Any  # the config dataclass of a registered family
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def family(self) -> str:
        return get_family(self.arch).name


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, arch: Any, **data) -> None:
    """Register variant `name`: `arch`, a config of a registered family; `data`, fields of
    DataConfig where they differ from the family's (mean, std, crop_pct, ...)."""
    defaults = replace(get_family(arch).data, img_size=to_2tuple(arch.img_size))
    _REGISTRY[name] = ModelSpec(name, arch, replace(defaults, **data))


def _register_defaults() -> None:
    google = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9)
    sizes = {  # (embed dim, depth, heads)
        "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
        "large": (1024, 24, 16), "huge": (1280, 32, 16),
    }

    def vit(size: str, patch: int, img: int, **kw) -> ViTConfig:
        dim, depth, heads = sizes[size]
        return ViTConfig(img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                         num_heads=heads, **kw)

    for size, patch in [("tiny", 16), ("small", 16), ("base", 16), ("base", 32), ("large", 16),
                        ("large", 32), ("huge", 14)]:
        register(f"vit_{size}_patch{patch}_224", vit(size, patch, 224), **google)
    for size, patch in [("base", 16), ("base", 32), ("large", 16), ("large", 32)]:
        register(f"vit_{size}_patch{patch}_384", vit(size, patch, 384),
                 **{**google, "crop_pct": 1.0})
    # ImageNet-21k pre-training: 21843 classes and a pre-logits layer of the embed width.
    for size, patch in [("base", 16), ("base", 32), ("large", 16), ("large", 32), ("huge", 14)]:
        dim = sizes[size][0]
        register(f"vit_{size}_patch{patch}_224_in21k",
                 vit(size, patch, 224, num_classes=21843, representation_size=dim), **google)
    for size in ("tiny", "small", "base"):
        register(f"deit_{size}_patch16_224", vit(size, 16, 224))
        register(f"deit_{size}_distilled_patch16_224", vit(size, 16, 224, distilled=True))
    register("vit_base_r50_s16_224", vit("base", 16, 224, hybrid_depths=(3, 4, 9)), **google)
    register("vit_base_r50_s16_384", vit("base", 16, 384, hybrid_depths=(3, 4, 9)),
             **{**google, "crop_pct": 1.0})
    register("vit_base_r50_s16_224_in21k",
             vit("base", 16, 224, hybrid_depths=(3, 4, 9), num_classes=21843,
                 representation_size=768), **google)

    swins = {  # C, depths, heads
        "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
        "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
        "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
        "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    }
    variants = [(s, 7, 224) for s in swins] + [("base", 12, 384), ("large", 12, 384)]
    for size, window, img in variants:
        dim, depths, heads = swins[size]
        name = f"swin_{size}_patch4_window{window}_{img}"
        crop = 0.9 if img == 224 else 1.0
        for suffix, classes in [("", 1000), ("_in22k", 21841)]:
            if suffix and size in ("tiny", "small"):
                continue
            arch = SwinConfig(img_size=img, embed_dim=dim, depths=depths, num_heads=heads,
                              window_size=window, num_classes=classes)
            register(name + suffix, arch, crop_pct=crop)


def _register_small_image_presets() -> None:
    """Models for 28-32 px grey-level images such as Fashion-MNIST, trained from scratch on a
    CPU (recipes/fashion_mnist_*.yaml; the ablations behind the sizes are in
    benchmarks/fashion_mnist_ablations.md). A 3x3 conv stem replaces the patch conv: on so
    few pixels and epochs it is worth more accuracy than anything else tried."""
    fmnist = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, crop_pct=1.0)
    # Stem: a 3x3 conv at full resolution, then two of stride 2 -> 7x7 tokens of 64. A wider
    # stem in place of transformer blocks learned faster per second of CPU (the ablations).
    register("vit_fmnist", ViTConfig(img_size=28, in_chans=1, num_classes=10, patch_size=4,
                                     conv_stem=(32, 64, 128), embed_dim=64, depth=4,
                                     num_heads=4), **fmnist)
    # A stem like it; 7x7 tokens padded to 2x2 windows of 4 (shifted every other block), then
    # merged to 4x4: one window. Beat 14x14 tokens in windows of 7 at half the cost per step.
    register("swin_fmnist", SwinConfig(img_size=28, in_chans=1, num_classes=10, patch_size=4,
                                       conv_stem=(32, 64, 64), embed_dim=64, depths=(3, 2),
                                       num_heads=(4, 8), window_size=4), **fmnist)


_register_defaults()
_register_small_image_presets()


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `vistra models`"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def build_model(name: str, *, num_classes: int | None = None,
                img_size: int | tuple[int, int] | None = None, **overrides) -> VistraModel:
    """A randomly initialised model. `overrides` replace fields of the architecture config
    (drop_path_rate, in_chans, window_size, dynamic_img_size, ...).

    The returned model's card (`.card`; `.name`, `.arch`, `.data_config`) describes it."""
    spec = get_spec(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = to_2tuple(img_size)
    fields = {f.name for f in dataclasses.fields(spec.arch)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; options: "
                         f"{', '.join(sorted(fields))}")
    arch = replace(spec.arch, **overrides)
    model = get_family(arch).build(arch)
    model.name = name
    model.data_config = replace(spec.data, img_size=to_2tuple(arch.img_size))
    return model


def build_from_arch(name: str, arch: dict, family: str | None = None) -> VistraModel:
    """The model a saved card describes: `arch` as a dict of config fields, of `family`
    (None: the registered `name`'s). A name that is not registered (a model built from its
    class) is rebuilt from its family and config alone."""
    if family is None or name in _REGISTRY:
        return build_model(name, **arch)
    fam = get_family(family)
    try:
        config = fam.config(**arch)
    except TypeError as err:
        raise ValueError(f"the saved architecture of {name} does not fit {fam.config.__name__} "
                         f"({err})") from err
    model = fam.build(config)
    model.name = name
    return model
