"""The model families: everything the rest of vistra needs to know about an architecture,
declared in one place, so code outside `models/` asks the family (or the model) instead of
telling ViT from Swin by class.

Adding a family is one model file and one `register_family` call (tests/test_model_family.py
does it with a toy family): the registry then builds its variants, `vistra models` and
`vistra flops` count them, training groups their parameters and checkpoints save and load
them, explain maps them and the weights loader names them, with no other module changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from torch import nn

from .base import DataConfig, VistraModel
from .cost import Cost, Stage, swin_cost, swin_stages, vit_cost, vit_stages
from .layers import ConvStem
from .peers import SWIN_TIMM_NAMES, VIT_TIMM_NAMES, swin_hf_peer, vit_hf_peer
from .resnetv2 import ResNetV2
from .swin import SwinConfig, SwinTransformer
from .vit import VisionTransformer, ViTConfig
from .weight_facts import SWIN_STRUCTURE, VIT_STRUCTURE, swin_weight_facts, vit_weight_facts


def one_stage(path: str) -> str:
    """FLOPs attribution of a single-resolution model: every block is in "blocks"."""
    return "blocks"


def stage_by_layer(path: str) -> str:
    """FLOPs attribution of a hierarchical model: `layers.i...` is stage i + 1."""
    return f"stage{int(path.split('.')[1]) + 1}"


class TokenGeometry(NamedTuple):
    """Where a grid of tokens sees: token (i, j)'s receptive field is centred on the input
    coordinate (offset + i * stride, offset + j * stride), pixel k's centre being at k."""

    stride: int  # input pixels per token side
    offset: float  # the first token's centre


def patch_geometry(stride: int) -> TokenGeometry:
    """A patch conv (kernel = stride, no padding): each token sees its own square."""
    return TokenGeometry(stride, (stride - 1) / 2)


def conv_chain_geometry(convs: Iterable[tuple[int, int, int]]) -> TokenGeometry:
    """(kernel, stride, padding before) of convolutions or pools applied one after another,
    the image's first -> where the last one's outputs see. Output j of one is centred on its
    input's j * stride + (kernel - 1) / 2 - padding; composed, each layer's shift counts in
    the pixels of the layers before it."""
    stride, offset = 1, 0.0
    for kernel, step, padding in convs:
        offset += stride * ((kernel - 1) / 2 - padding)
        stride *= step
    return TokenGeometry(stride, offset)


def stem_convs(backbone: nn.Module) -> list[tuple[int, int, int]]:
    """The (kernel, stride, padding before) a token's centre follows through a backbone, the
    image's side first. A conv stem is a chain of 3x3 convs. The R50 hybrid: its stem's 7x7
    conv and 3x3 max-pool (Stem.forward), then each block's 3x3 conv, the widest path (its 1x1
    convs and the shortcut see inside that conv's footprint), with TF SAME padding, which on
    a side the stride divides (the model takes multiples of its total stride only) puts
    max(kernel - stride, 0) // 2 before."""
    if isinstance(backbone, ResNetV2):
        def same(kernel: int, stride: int) -> tuple[int, int, int]:
            return kernel, stride, max(kernel - stride, 0) // 2
        conv = backbone.stem.conv
        return [same(conv.kernel_size[0], conv.stride[0]), same(3, 2)] + [
            same(block.conv2.kernel_size[0], block.conv2.stride[0])
            for stage in backbone.stages for block in stage.blocks]
    if isinstance(backbone, ConvStem):
        return [(m.kernel_size[0], m.stride[0], m.padding[0]) for m in backbone.modules()
                if isinstance(m, nn.Conv2d)]
    raise ValueError(f"no receptive-field rule for a {type(backbone).__name__} backbone; "
                     f"expected a ConvStem or a ResNetV2")


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
    `gradient`, `occlusion` and `rise` work on any model whatever it declares. token_stride:
    model -> input pixels per side of a token of its patch grid; None: no token grid.
    token_geometry: model -> `TokenGeometry`, where its tokens see (the stride and the first
    token's receptive-field centre): explain places each token's value there; None: in the
    middle of each token_stride square, as a patch conv sees. weight_facts: a state dict in
    vistra's layout -> the config fields its shapes show, or None when the keys are not this
    family's; structure_facts:
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
    token_geometry: Callable[[nn.Module], TokenGeometry] | None = None
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


def token_geometry_from_stem(model: nn.Module) -> TokenGeometry:
    """A patch conv's tokens see their squares; behind a conv stem or the R50 hybrid's
    backbone, where those convs centre them (the 1x1 projection after them moves nothing).
    For ViT and for Swin's first stage, whose stem pads at the bottom and right only."""
    embed = model.patch_embed
    if embed.backbone is None:
        return patch_geometry(embed.proj.stride[0])
    return conv_chain_geometry(stem_convs(embed.backbone))


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
    modelled_fields=_VIT_FIELDS, explain_methods=("rise", "grad-rollout", "rollout", "lrp"),
    token_stride=vit_token_stride, token_geometry=token_geometry_from_stem,
    weight_facts=vit_weight_facts,
    structure_facts=VIT_STRUCTURE, hf_peer=vit_hf_peer, timm_names=VIT_TIMM_NAMES,
    export_size_rule=vit_export_size_rule, resizable=vit_resizable))
register_family(ModelFamily(
    "swin", "Swin", SwinConfig, SwinTransformer, stages=swin_stages, cost=swin_cost,
    modelled_fields=_SWIN_FIELDS, flops_stage=stage_by_layer, windowed=True,
    explain_methods=("rise", "gradcam", "scorecam", "window", "lrp"),
    token_stride=swin_token_stride,
    token_geometry=token_geometry_from_stem,
    weight_facts=swin_weight_facts, structure_facts=SWIN_STRUCTURE, hf_peer=swin_hf_peer,
    timm_names=SWIN_TIMM_NAMES, export_size_rule=swin_export_size_rule))
