"""vistra's own checkpoint: a .safetensors file whose metadata holds everything needed to
rebuild the model (name, architecture, preprocessing, class names), so `predict` and `eval`
need nothing but the file. safetensors cannot execute code, unlike a pickle."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vistra.models import DataConfig, build_model

from .read import check_finite

FORMAT = "vistra/1"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write beside the target, then rename: an interrupted save never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                    classes: list[str] | None = None, extra: dict | None = None) -> None:
    """Weights and the metadata to rebuild `model` (built by `vistra.create_model`)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_name": model.name,
        "arch": json.dumps(dataclasses.asdict(model.arch)),
        "data_config": json.dumps(model.data_config.to_dict()),
        "classes": json.dumps(classes),
        "extra": json.dumps(extra or {}),
    }
    _atomic_save(state, Path(path), metadata)


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The decoded vistra metadata of a .safetensors file, or None if it is not a vistra file."""
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
    The file is not trusted: the model its metadata declares must match the tensors it
    holds before anything is allocated, and no weight may be NaN or infinite.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        meta = read_metadata(path)
        shapes = _stored_shapes(path)
        if meta is not None:
            arch = {k: _tuples(v) for k, v in meta["arch"].items()}
            data = DataConfig(**{k: _tuples(v) for k, v in meta["data_config"].items()})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file ({err})") from err
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # JSON of the wrong shape
        raise ValueError(f"{path} has damaged vistra metadata ({type(err).__name__}: {err}); "
                         f"use another copy of the checkpoint") from err
    if meta is None:
        raise ValueError(
            f"{path} has no vistra metadata; load third-party weights with "
            f"vistra.create_model(NAME, pretrained='{path}') or convert them with `vistra convert`"
        )
    _check_declared_model(path, meta["model_name"], arch, data, shapes)
    model = build_model(meta["model_name"], **arch)
    model.data_config = data
    state = load_file(str(path), device=str(device))
    check_finite(state, path)
    model.load_state_dict(state)
    model.classes = meta["classes"]
    return model.to(device)


# Larger inputs than this per side are no image classifier's: a crop of that size alone
# would take gigabytes per image.
MAX_IMAGE_SIDE = 8192
# Buffers computed at construction (Swin's relative position indices) grow with the window
# as M^4: they may take as much memory as the file's weights, or this much.
_BUFFER_ALLOWANCE = 64 << 20


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors header alone."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _check_declared_model(path: Path, name: str, arch: dict, data: DataConfig,
                          shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse metadata that declares a model other than the one the file's tensors make.

    A few bytes of metadata can declare an embedding of a million channels or a million
    layers; built, it would take terabytes. The declared model is built on the meta device
    (shapes only, no memory) and held to the tensor shapes in the file's header, so what is
    then allocated is what the file holds.
    """
    def refuse(what: str) -> ValueError:
        return ValueError(f"{path} was refused: its metadata declares {what}; the file is "
                          f"corrupt or was edited, use another copy of the checkpoint")

    layers = sum(sum(_ints(arch.get(key))) for key in ("depth", "depths", "hybrid_depths"))
    layers += len(arch.get("conv_stem") or ())
    if layers > len(shapes):  # each layer has weights: building it first would be slow
        raise refuse(f"{layers} layers, but the file holds {len(shapes)} tensors")
    sides = [*_ints(arch.get("img_size")), *_ints(data.img_size)]
    if max(sides, default=0) > MAX_IMAGE_SIDE:
        raise refuse(f"an input size of {max(sides)} pixels, over the {MAX_IMAGE_SIDE} limit")
    try:
        with torch.device("meta"):
            skeleton = build_model(name, **arch)
    except (TypeError, ValueError, RuntimeError) as err:
        raise refuse(f"a model vistra cannot build ({err})") from err
    state = skeleton.state_dict()
    declared = {key: tuple(tensor.shape) for key, tensor in state.items()}
    if declared != shapes:
        key = next(k for k in sorted(declared.keys() | shapes.keys())
                   if declared.get(k) != shapes.get(k))
        raise refuse(f"{name} with tensor {key} of shape {declared.get(key, 'none')}, but "
                     f"the file holds {shapes.get(key, 'none')}")
    buffers = sum(b.numel() * b.element_size() for k, b in skeleton.named_buffers()
                  if k not in state)
    if buffers > max(path.stat().st_size, _BUFFER_ALLOWANCE):
        raise refuse(f"{name} whose computed buffers would take {buffers:,} bytes")


def _ints(value: object) -> list[int]:
    """The integers of a config value: an int, a tuple of them, or None."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, tuple | list):
        return [v for v in value if isinstance(v, int)]
    return []
