"""The model families: everything the rest of vistra needs to know about an architecture,
declared in one place, so code outside `models/` asks the family (or the model) instead of
telling ViT from Swin by class.

Adding a family is one model file and one `register_family` call (tests/test_model_family.py
does it with a toy family): the registry then builds its variants, `vistra models` and
`vistra flops` count them, training groups their parameters and checkpoints save and load
them, with no other module changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import DataConfig, VistraModel
from .cost import Cost, Stage, swin_cost, swin_stages, vit_cost, vit_stages
from .swin import SwinConfig, SwinTransformer
from .vit import VisionTransformer, ViTConfig


def one_stage(path: str) -> str:
    """FLOPs attribution of a single-resolution model: every block is in "blocks"."""
    return "blocks"


def stage_by_layer(path: str) -> str:
    """FLOPs attribution of a hierarchical model: `layers.i...` is stage i + 1."""
    return f"stage{int(path.split('.')[1]) + 1}"


@dataclass
class ModelFamily:
    """One architecture family.

    config: the dataclass of a variant's numbers; it has at least img_size, in_chans and
    num_classes. build: config -> model, a `VistraModel` (its card, timm's API, head and
    no-weight-decay names). data: the preprocessing of a variant that does not say. stages /
    cost: the analytic shapes and (parameters, MACs by stage and kind) from the config alone,
    None where not worked out (then the cost is counted by running the model on the meta
    device); `modelled_fields`: the config fields `cost` follows (any other field off its
    default makes vistra count instead). flops_stage: module path (below the blocks) -> stage
    name for the measured FLOPs; the kind is read from the path: `attn.qkv`/`attn.proj`,
    `attn`, `mlp`, `downsample`, with `patch_embed` the embedding and `head`, `head_dist`,
    `pre_logits`, `norm` the head. windowed: attention within windows (else a window in the
    `flops` table is a what-if)."""

    name: str
    label: str
    config: type
    build: Callable[[Any], VistraModel]
    data: DataConfig = field(default_factory=DataConfig)
    stages: Callable[[Any], list[Stage]] | None = None
    cost: Callable[[Any], Cost] | None = None
    modelled_fields: frozenset[str] = frozenset()
    flops_stage: Callable[[str], str] = one_stage
    windowed: bool = False


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family known by its name and its config class (a later one replaces it)."""
    _FAMILIES[family.name] = family
    return family


def families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def get_family(of: str | Any) -> ModelFamily:
    """The family of a name ("vit"), a config (ViTConfig(...)) or a model (its card's)."""
    if isinstance(of, str):
        if of in _FAMILIES:
            return _FAMILIES[of]
        raise ValueError(f"unknown model family {of!r}; known: {', '.join(_FAMILIES)}")
    if isinstance(of, nn.Module):
        card = getattr(of, "card", None)
        if card is None:
            raise ValueError(f"a {type(of).__name__} is not a vistra model (it has no .card); "
                             f"build it with vistra.create_model")
        return get_family(card.family)
    for family in _FAMILIES.values():
        if type(of) is family.config:
            return family
    raise ValueError(f"no registered model family has the config class {type(of).__name__}; "
                     f"register one with vistra.models.register_family")


_VIT_FIELDS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_scale", "representation_size", "distilled", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "hybrid_depths", "dynamic_img_size", "conv_stem"})
_SWIN_FIELDS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads",
    "window_size", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate",
    "drop_path_rate", "conv_stem"})

register_family(ModelFamily("vit", "ViT", ViTConfig, VisionTransformer, stages=vit_stages,
                            cost=vit_cost, modelled_fields=_VIT_FIELDS))
register_family(ModelFamily("swin", "Swin", SwinConfig, SwinTransformer, stages=swin_stages,
                            cost=swin_cost, modelled_fields=_SWIN_FIELDS,
                            flops_stage=stage_by_layer, windowed=True))
