"""Class names that travel with weights: a HuggingFace config's `id2label`, timm's
`label_names`, a user's file, or the ImageNet-1k names for a 1000-class head with none.

The ImageNet-1k names (vistra/assets/imagenet_1k_classes.txt, index 0 "tench") are the list
pytorch/hub publishes as imagenet_classes.txt, in the class order of every ImageNet-1k
checkpoint (timm, torchvision, HuggingFace, Google, the Swin authors). The 21k names are not
shipped (740 kB; docs/models.md says how to make the file for `vistra convert --classes`).
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from importlib.resources import files
from pathlib import Path

IMAGENET_1K = 1000
_PLACEHOLDER = re.compile(r"LABEL_\d+")  # transformers' names when a config has none


@cache
def _imagenet_1k() -> tuple[str, ...]:
    text = files("vistra").joinpath("assets/imagenet_1k_classes.txt").read_text("utf-8")
    return tuple(text.splitlines())


def imagenet_1k_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order ("tench", "goldfish", ...)."""
    return list(_imagenet_1k())


def default_classes(num_classes: int) -> list[str] | None:
    """ImageNet-1k's names for a head of 1000 classes, else None."""
    return imagenet_1k_classes() if num_classes == IMAGENET_1K else None


def classes_from_config(config: dict) -> list[str] | None:
    """Names from a HuggingFace config.json: transformers' id2label (ignoring its LABEL_i
    placeholders) or timm's label_names; None without them."""
    names = config.get("label_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        return None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    names = [by_index[i] for i in range(len(by_index))]
    return None if all(_PLACEHOLDER.fullmatch(n) for n in names) else names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a file: a JSON list, a JSON {index: name} mapping (as
    class_indices.json or id2label), or plain text with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file {path} does not exist")
    text = path.read_text("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        names = data
    elif isinstance(data, dict):
        names = classes_from_config({"id2label": data})
        if names is None:
            raise ValueError(f"{path}: a JSON mapping of class names needs the indices 0..N-1 "
                             f"as keys, e.g. {{\"0\": \"cat\", \"1\": \"dog\"}}")
    elif data is not None:
        raise ValueError(f"{path}: expected a JSON list of names or one name per line")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names; write one name per line")
    return names
