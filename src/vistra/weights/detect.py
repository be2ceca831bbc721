"""Which library wrote a state dict, told by its keys (never by the file name), and the pure
function that converts that library's layout to vistra's."""

from __future__ import annotations

from collections.abc import Callable

from . import google_npz, hf, official_swin, timm, torchvision
from .keymap import Tensors
from .read import RawWeights
from .vistra_file import FORMAT

# Most specific first: the authors' Swin keys are also timm-like, so they are tried earlier.
CONVERTERS = (hf, google_npz, torchvision, official_swin, timm)


def detect_layout(raw: RawWeights, origin: str) -> tuple[str, Callable[[Tensors], Tensors]]:
    """(layout name, converter to vistra's keys) for the tensors of one file."""
    if raw.metadata.get("format") == FORMAT:
        return f"vistra checkpoint of {raw.metadata.get('model_name')}", dict
    keys = set(raw.tensors)
    for converter in CONVERTERS:
        name = converter.describe(keys)
        if name:
            return name, converter.to_vistra
    sample = ", ".join(sorted(keys)[:6])
    raise ValueError(
        f"{origin}: unrecognised weights layout; expected a ViT, DeiT or Swin state dict from "
        f"timm, torchvision, HuggingFace, Google's .npz releases or the Swin authors, or a "
        f"vistra checkpoint; its keys begin {sample}"
    )
