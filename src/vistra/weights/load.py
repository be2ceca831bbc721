"""`load_pretrained(model, path)`: any supported weights file, HuggingFace directory or cached
HuggingFace repository (weights/hub.py) into a built model, adapted where it differs, with
one readable report of what was done."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from vistra.models import list_models

from .adapt import fit_to_model
from .detect import detect_layout
from .hub import HF_PREFIX, hub_repo, snapshot
from .identify import architecture_facts, describe_facts, likely_models
from .keymap import Tensors
from .labels import classes_from_config, default_classes
from .read import read_weights

logger = logging.getLogger("vistra.weights")


@dataclass
class Pretrained:
    """A weights file read and converted to vistra's key layout, not yet fitted to a model."""

    origin: str
    state: Tensors
    layout: str  # e.g. "timm ViT", "HuggingFace Swin", "Google ViT .npz"
    container: str  # "safetensors", "PyTorch pickle", "NumPy .npz"
    notes: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # the head's class names, when the source has them
    model_name: str | None = None  # the architecture a timm config.json names
    model_type: str | None = None  # transformers' model_type: "vit", "deit", "swin"
    data: dict = field(default_factory=dict)  # DataConfig fields the source prescribes

    @property
    def num_classes(self) -> int:
        """Classes of the file's head, 0 when it has none."""
        head = self.state.get("head.weight")
        return 0 if head is None else head.shape[0]


@dataclass
class LoadReport:
    """What loading did. `changes` alter what the model computes compared with the file
    (fresh heads, resampled embeddings); `notes` do not."""

    origin: str
    model: str
    layout: str
    container: str
    loaded: int
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors into {self.model} from {self.origin} "
                 f"({self.layout}, {self.container})"]
        lines += [f"  {line}" for line in self.notes + self.changes]
        return "\n".join(lines)


def read_pretrained(source: str | os.PathLike | bool,
                    model_name: str | None = None) -> Pretrained:
    """Read weights into vistra's layout: a file, a HuggingFace directory, or a name resolved
    through the local HuggingFace cache (True, a timm tag for `model_name`, "hf-hub:org/name",
    "org/name"; weights/hub.py). Class names come from the source's config.json (id2label,
    label_names), else ImageNet-1k's for a 1000-class head."""
    repo = hub_repo(source, model_name)
    if repo is not None:
        path = _cached(repo, plain_id=isinstance(source, str) and "/" in source
                       and not source.startswith(HF_PREFIX))
        origin = f"{HF_PREFIX}{repo}"
    else:
        path, origin = Path(source), str(source)
    raw = read_weights(path)
    layout, to_vistra = detect_layout(raw, origin)
    pretrained = Pretrained(origin, to_vistra(raw.tensors), layout, raw.container, raw.notes)
    config = _read_json(path / "config.json") if path.is_dir() else {}
    pretrained.classes = classes_from_config(config)
    if pretrained.classes is not None and len(pretrained.classes) != pretrained.num_classes:
        pretrained.notes.append(f"config.json names {len(pretrained.classes)} classes, the head "
                                f"has {pretrained.num_classes}: names left out")
        pretrained.classes = None
    if pretrained.classes is None:
        pretrained.classes = default_classes(pretrained.num_classes)
        if pretrained.classes is not None:
            pretrained.notes.append("no class names in the source: ImageNet-1k's assumed for "
                                    "its 1000-class head")
    pretrained.model_name = config.get("architecture")
    pretrained.model_type = config.get("model_type")
    pretrained.data = _data_config(config, _read_json(path / "preprocessor_config.json")
                                   if path.is_dir() else {})
    return pretrained


def model_name_for(pretrained: Pretrained) -> str:
    """The registered model weights are for, when no name was given: the architecture of a
    timm config.json, else the registered model their shapes match exactly."""
    if pretrained.model_name in list_models():
        return pretrained.model_name
    facts = architecture_facts(pretrained.state)
    names, differ = likely_models(facts) if facts else ([], [])
    if names and not differ:  # ties (ViT-B and DeiT-B): the one transformers' config names
        typed = [n for n in names if n.startswith(f"{pretrained.model_type}_")]
        return (typed or names)[0]
    found = f"they hold {describe_facts(facts)}" if facts else "their layout is unknown"
    raise ValueError(f"no registered model fits the weights of {pretrained.origin} ({found}); "
                     f"name the model (vistra.create_model(NAME, pretrained=...), "
                     f"`vistra convert --model NAME`)")


def _cached(repo: str, plain_id: bool) -> Path:
    try:
        return snapshot(repo)
    except FileNotFoundError as err:
        if plain_id:  # "org/name" may also have been meant as a relative path
            raise FileNotFoundError(f"{err}; no file or folder {repo} exists either") from None
        raise


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download it again") from err
    return data if isinstance(data, dict) else {}


def _data_config(config: dict, preprocessor: dict) -> dict:
    """Mean, std, crop and interpolation the weights were trained with: timm's
    pretrained_cfg in config.json, or transformers' preprocessor_config.json."""
    data: dict = {}
    timm_cfg = config.get("pretrained_cfg") or {}
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if key in timm_cfg:
            data[key] = tuple(timm_cfg[key]) if isinstance(timm_cfg[key], list) else timm_cfg[key]
    if not data and "image_mean" in preprocessor and "image_std" in preprocessor:
        data = {"mean": tuple(preprocessor["image_mean"]),
                "std": tuple(preprocessor["image_std"])}
    return data


def apply_pretrained(model: nn.Module, pretrained: Pretrained) -> LoadReport:
    """Fit the converted weights to `model` and load them; the model's card takes the
    report, the source's preprocessing and, where the head was kept, its class names.

    The report is also logged to "vistra.weights": as a warning when the model now differs
    from the file (a fresh head, resampled embeddings), so users see it by default."""
    fitted = fit_to_model(model, pretrained.state, pretrained.origin)
    with torch.no_grad():
        model.load_state_dict(fitted.state)
    report = LoadReport(
        pretrained.origin, getattr(model, "name", type(model).__name__), pretrained.layout,
        pretrained.container, fitted.loaded, fitted.reinitialised, fitted.dropped,
        fitted.changes, pretrained.notes + fitted.notes,
    )
    logger.log(logging.WARNING if report.changes else logging.INFO, "%s", report)
    card = getattr(model, "card", None)
    if card is not None:
        card.load_report = report
        if pretrained.data:
            card.data_config = replace(card.data_config, **pretrained.data)
        head_kept = not any(k.startswith("head.") for k in fitted.reinitialised)
        if head_kept and pretrained.classes and len(pretrained.classes) == card.arch.num_classes:
            card.classes = list(pretrained.classes)
    return report


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load timm, Swin-authors, Google .npz, torchvision, HuggingFace or vistra weights (a
    file, a directory or a cached HuggingFace name) into `model`. Never runs code from the
    file; raises ValueError when the file is unreadable, unsafe, or does not fit the model
    (naming the model it most likely belongs to)."""
    return apply_pretrained(model, read_pretrained(path, getattr(model, "name", None)))
