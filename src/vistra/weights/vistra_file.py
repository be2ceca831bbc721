"""vistra's own checkpoint: a .safetensors file whose metadata holds everything needed to
rebuild the model (name, architecture, preprocessing, class names), so `predict` and `eval`
need nothing but the file. safetensors cannot execute code, unlike a pickle."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vistra.fileio import atomic_write
from vistra.models import DataConfig, build_model

FORMAT = "vistra/1"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 overwrite: bool) -> None:
    """Write beside the target, then rename: an interrupted save never leaves a torn file."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 replace=overwrite)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                    classes: list[str] | None = None, extra: dict | None = None,
                    overwrite: bool = True) -> None:
    """Weights and the metadata to rebuild `model` (built by `vistra.create_model`); an
    existing `path` is replaced (atomically) unless `overwrite` is False."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_name": model.name,
        "arch": json.dumps(dataclasses.asdict(model.arch)),
        "data_config": json.dumps(model.data_config.to_dict()),
        "classes": json.dumps(classes),
        "extra": json.dumps(extra or {}),
    }
    _atomic_save(state, Path(path), metadata, overwrite)


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The decoded vistra metadata of a .safetensors file, or None if it is not a vistra file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        return None
    return {
        "model_name": meta["model_name"],
        "arch": json.loads(meta["arch"]),
        "data_config": json.loads(meta["data_config"]),
        "classes": json.loads(meta["classes"]),
        "extra": json.loads(meta.get("extra", "{}")),
    }


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a vistra checkpoint describes and load its weights.

    The model gets `.classes` (list of names or None) besides `.name`, `.arch`, `.data_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        meta = read_metadata(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file ({err})") from err
    if meta is None:
        raise ValueError(
            f"{path} has no vistra metadata; load third-party weights with "
            f"vistra.create_model(NAME, pretrained='{path}') or convert them with `vistra convert`"
        )
    arch = {k: _tuples(v) for k, v in meta["arch"].items()}
    model = build_model(meta["model_name"], **arch)
    data = {k: _tuples(v) for k, v in meta["data_config"].items()}
    model.data_config = DataConfig(**data)
    model.load_state_dict(load_file(str(path), device=str(device)))
    model.classes = meta["classes"]
    return model.to(device)
