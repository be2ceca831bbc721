"""The model families: everything the rest of vistra needs to know about an architecture,
declared in one place, so code outside `models/` asks the family (or the model) instead of
telling ViT from Swin by class.

Adding a family is one model file and one `register_family` call (tests/test_model_family.py
does it with a toy family): the registry then builds its variants, `vistra models` and
`vistra flops` count them, training groups their parameters and checkpoints save and load
them, explain maps them and the weights loader names them, with no other module changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .base import DataConfig, VistraModel
from .cost import Cost, Stage, swin_cost, swin_stages, vit_cost, vit_stages
from .peers import SWIN_TIMM_NAMES, VIT_TIMM_NAMES, swin_hf_peer, vit_hf_peer
from .swin import SwinConfig, SwinTransformer
from .vit import VisionTransformer, ViTConfig
from .weight_facts import SWIN_STRUCTURE, VIT_STRUCTURE, swin_weight_facts, vit_weight_facts


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
    `flops` table is a what-if).

    explain_methods: the names of vistra.explain's methods that apply, the default first;
    `gradient` and `occlusion` work on any model. token_stride: model -> input pixels per side
    of a token of its patch grid, each token's centre in the middle of its square: explain
    spreads token maps over the image by it, and occlusion hides one token's square at a
    time; None: no token grid. weight_facts: a state dict in vistra's layout -> the config
    fields its shapes show, or None when the keys are not this family's; structure_facts:
    those of them that make a different network (the others only rank the registered names),
    so that a file that does not fit names the model it belongs to. hf_peer: (the
    transformers module, config, image side) -> transformers' model with the config's
    numbers, randomly initialised, or None where transformers has none. timm_names: variant
    name -> timm's "name.tag" of its default weights on the HuggingFace hub (a variant not
    listed has none).

    export_size_rule: model -> (multiple, minimum) of the image heights and widths a traced
    ONNX graph of it computes right; None: the export size only (the graph's sides are
    fixed). resizable: model -> a context in which the eager model takes those sizes too, so
    that the graph can be checked against it."""

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
    explain_methods: tuple[str, ...] = ("gradient", "occlusion")
    token_stride: Callable[[nn.Module], int] | None = None
    weight_facts: Callable[[Mapping[str, Any]], dict | None] | None = None
    structure_facts: frozenset[str] = frozenset()
    hf_peer: Callable[[Any, Any, int], nn.Module | None] | None = None
    timm_names: Mapping[str, str] = field(default_factory=dict)
    export_size_rule: Callable[[nn.Module], tuple[int, int]] | None = None
    resizable: Callable[[nn.Module], AbstractContextManager] = nullcontext


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


def vit_token_stride(model: nn.Module) -> int:
    """The patch, or the R50 hybrid's total stride."""
    return model.patch_embed.reduction


def swin_token_stride(model: nn.Module) -> int:
    """The first stage's patch (each patch merging then doubles it)."""
    return model.cfg.patch_size


def vit_export_size_rule(model: nn.Module) -> tuple[int, int]:
    """Multiples of the patch (the R50 hybrid's total stride): the graph resamples the
    position embeddings (and computes the hybrid's SAME padding) for the input."""
    return model.patch_embed.reduction, model.patch_embed.reduction


@contextmanager
def vit_resizable(model: nn.Module) -> Iterator[None]:
    """A ViT built for one size resamples its position embeddings per forward, as the graph."""
    cfg = model.cfg
    model.cfg = replace(cfg, dynamic_img_size=True)
    try:
        yield
    finally:
        model.cfg = cfg


def swin_export_size_rule(model: nn.Module) -> tuple[int, int]:
    """Any size (padding, roll and shift mask are computed in the graph), as long as
    every stage that shifts its windows keeps a map larger than the window: below that,
    eager Swin stops shifting, a decision the graph holds fixed."""
    patch, smallest = model.cfg.patch_size, 1
    for s, stage in enumerate(model.layers):
        for block in stage.blocks:
            if block.shift_size:
                smallest = max(smallest, patch * 2**s * block.window_size + 1)
    return 1, smallest


register_family(ModelFamily(
    "vit", "ViT", ViTConfig, VisionTransformer, stages=vit_stages, cost=vit_cost,
    modelled_fields=_VIT_FIELDS, explain_methods=("grad-rollout", "rollout"),
    token_stride=vit_token_stride, weight_facts=vit_weight_facts,
    structure_facts=VIT_STRUCTURE, hf_peer=vit_hf_peer, timm_names=VIT_TIMM_NAMES,
    export_size_rule=vit_export_size_rule, resizable=vit_resizable))
register_family(ModelFamily(
    "swin", "Swin", SwinConfig, SwinTransformer, stages=swin_stages, cost=swin_cost,
    modelled_fields=_SWIN_FIELDS, flops_stage=stage_by_layer, windowed=True,
    explain_methods=("gradcam", "scorecam", "window"), token_stride=swin_token_stride,
    weight_facts=swin_weight_facts, structure_facts=SWIN_STRUCTURE, hf_peer=swin_hf_peer,
    timm_names=SWIN_TIMM_NAMES, export_size_rule=swin_export_size_rule))
