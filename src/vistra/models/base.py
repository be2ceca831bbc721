"""What every vistra model is: a typed model card, and timm's model API on top of the
family-specific forward passes.

The card (`model.card`) holds what a model is besides its tensors: its registered name, its
family, its architecture config, the preprocessing its weights expect, its class names and
what loading weights into it did. It exists from construction on, so a model built directly
from its class saves and loads like one from `vistra.create_model`. `model.name`,
`model.arch`, `model.data_config`, `model.classes` and `model.load_report` read and write it;
`model.card.explain` is the explain method measured for it, saved with its weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import to_2tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_FORMATS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a model's weights expect: evaluation resizes to img_size / crop_pct,
    centre-crops img_size, and normalises with mean/std."""

    img_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MEASURES = ("deletion", "road", "insertion")  # an ExplainChoice's scores per method


@dataclass(frozen=True)
class ExplainChoice:
    """The explain method measured most faithful for this model (vistra.explain.choose): its
    name, every scored method's mean AUCs (`MEASURES`, and those of the random pixel order
    under "random"), how many images of which data, and what recorded it. Saved in the
    checkpoint, so that `vistra explain` and `vistra serve` default to it."""

    method: str
    scores: dict[str, dict[str, float]]
    images: int
    data: str
    steps: int
    by: str  # the command that measured it

    def versus_random(self, method: str, measure: str) -> float:
        """The method's AUC as a multiple of the random order's (below 1: better, for the
        deletion measures)."""
        return self.scores[method][measure] / max(self.scores["random"][measure], 1e-12)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ExplainChoice:
        """Read back from a checkpoint's metadata, which is not trusted: every field is
        checked, a TypeError or ValueError says what is wrong."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != fields:
            raise ValueError(f"an explain record needs the fields {', '.join(sorted(fields))}")
        scores = values["scores"]
        if not (isinstance(scores, dict) and "random" in scores and values["method"] in scores
                and all(isinstance(s, dict) and set(s) == set(MEASURES)
                        and all(isinstance(v, int | float) for v in s.values())
                        for s in scores.values())):
            raise ValueError(f"an explain record's scores must give {', '.join(MEASURES)} "
                             "for its method and for random")
        for name, kind in (("method", str), ("images", int), ("data", str), ("steps", int),
                           ("by", str)):
            if not isinstance(values[name], kind) or isinstance(values[name], bool):
                raise TypeError(f"an explain record's {name} must be a {kind.__name__}")
        return cls(**{**values, "scores": {m: {k: float(v) for k, v in s.items()}
                                           for m, s in scores.items()}})


@dataclass
class ModelCard:
    """A model's description, the counterpart of timm's `pretrained_cfg`.

    name: the registered name (the family's name for a model built from its class); family:
    the registered family (models/family.py); arch: the config the model was built from;
    classes: one name per output, or None; load_report: a `vistra.weights.LoadReport` once
    weights were loaded; explain: the explain method measured most faithful for it, if one
    was (an `ExplainChoice`)."""

    name: str
    family: str
    arch: Any
    data_config: DataConfig
    classes: list[str] | None = None
    load_report: Any = None
    explain: ExplainChoice | None = None


def _card_field(field: str) -> property:
    def get(self: VistraModel) -> Any:
        return getattr(self.card, field)

    def set(self: VistraModel, value: Any) -> None:
        setattr(self.card, field, value)
    return property(get, set, doc=f"`model.card.{field}`")


class VistraModel(nn.Module):
    """Base of vistra's model classes: the card, and the parts of timm's API that do not
    depend on the architecture. A subclass sets `family` (its registered family's name),
    `head_modules` (the classifier's module names, trained alone by `freeze_layers`) and
    `no_weight_decay_names` (parameter names outside norms and biases that take no weight
    decay), and implements `forward_features`, `forward_head`, `reset_classifier`,
    `forward_intermediates` and `feature_info`."""

    family: ClassVar[str]
    head_modules: ClassVar[tuple[str, ...]] = ("head",)
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ()
    default_out_indices: ClassVar[int | tuple[int, ...] | None] = None  # features_only: all

    name = _card_field("name")
    arch = _card_field("arch")
    data_config = _card_field("data_config")
    classes = _card_field("classes")
    load_report = _card_field("load_report")

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.card = ModelCard(self.family, self.family, cfg,
                              DataConfig(img_size=to_2tuple(cfg.img_size)))

    def _set_num_classes(self, num_classes: int) -> None:
        """Keep the card (and so a saved checkpoint) in step with a replaced head."""
        if self.cfg.num_classes != num_classes:
            self.cfg = replace(self.cfg, num_classes=num_classes)
            self.card.arch = self.cfg
            self.card.classes = None
            self.card.explain = None  # measured on the old head's classes

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters, besides norms and biases, that take no weight decay."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in self.no_weight_decay_names}

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth, for layer-wise learning-rate decay (BEiT): 0 for the
        embeddings, one more per block from the input on, the highest for what follows the
        last block (final norm, head). A family whose models do not define it has none."""
        raise ValueError(f"{self.card.family} models do not define layer_ids(), the depth of "
                         "each parameter that layer-wise learning-rate decay needs")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        from the forward: less memory for about one more forward of compute."""
        self.grad_checkpointing = enable


def checkpoint_seq(blocks: nn.Sequential, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run `blocks`; with `enabled` and autograd on, each block through activation
    checkpointing (the non-reentrant form, which works with frozen inputs and DDP)."""
    if not (enabled and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def feature_take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's convention: None takes all `count` outputs, an int n the last n, a sequence
    those positions (negative ones count from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices={indices} asks for the last {indices} of {count} outputs")
        return list(range(count - indices, count))
    taken = []
    for i in indices:
        if not -count <= i < count:
            raise ValueError(f"index {i} is out of range for {count} outputs "
                             f"(0..{count - 1}, or negative from the end)")
        taken.append(i % count)
    return sorted(set(taken))


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}, "
                         f"got {output_fmt!r}")


class FeatureExtractor(nn.Module):
    """A backbone for detection or segmentation (`create_model(..., features_only=True)`):
    returns the feature maps at `out_indices` (None: the model's default, as timm's) as a
    list, [B, C, H, W] (or [B, H, W, C] with output_fmt "NHWC"). `feature_info` gives each
    map's channels and reduction."""

    def __init__(self, model: VistraModel, out_indices: int | Sequence[int] | None = None,
                 output_fmt: str = "NCHW") -> None:
        super().__init__()
        check_output_fmt(output_fmt)
        model.reset_classifier(0)
        self.model = model
        if out_indices is None:
            out_indices = model.default_out_indices
        self.out_indices = feature_take_indices(len(model.feature_info), out_indices)
        self.output_fmt = output_fmt
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    @property
    def card(self) -> ModelCard:
        return self.model.card

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices,
                                                output_fmt=self.output_fmt,
                                                intermediates_only=True)
