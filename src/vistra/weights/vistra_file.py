"""vistra's own checkpoint: a .safetensors file whose metadata holds everything needed to
rebuild the model (name, architecture, preprocessing, class names) and the explain method
measured for it, so `predict`, `eval` and `explain` need nothing but the file. safetensors
cannot execute code, unlike a pickle."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from vistra.fileio import atomic_write
from vistra.models import DataConfig, ExplainChoice, build_from_arch

from .labels import default_classes
from .read import check_finite

FORMAT = "vistra/1"
EXPLAIN_KEY = "explain"  # the metadata key of the card's ExplainChoice


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 overwrite: bool) -> None:
    """Write beside the target, then rename: an interrupted save never leaves a torn file."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 replace=overwrite)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                    classes: list[str] | None = None, extra: dict | None = None,
                    overwrite: bool = True) -> None:
    """Weights and the metadata to rebuild `model`, any vistra model (its card says what it
    is, the explain method measured for it included). `classes` None keeps the card's class
    names. An existing `path` is replaced (atomically) unless `overwrite` is False."""
    card = model.card
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_name": card.name,
        "family": card.family,
        "arch": json.dumps(dataclasses.asdict(card.arch)),
        "data_config": json.dumps(card.data_config.to_dict()),
        "classes": json.dumps(classes if classes is not None else card.classes),
        "extra": json.dumps(extra or {}),
    }
    if card.explain is not None:
        metadata[EXPLAIN_KEY] = json.dumps(card.explain.to_dict())
    _atomic_save(state, Path(path), metadata, overwrite)


def save_explain_choice(path: str | os.PathLike, choice: ExplainChoice,
                        output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The vistra checkpoint `path` with `choice` recorded in its metadata, written to
    `output` (which may be `path` itself) atomically: a new header, then the tensor bytes
    copied as they are, so the weights are byte for byte the file's. An existing `output`
    is replaced only with `overwrite`."""
    path = Path(path)
    if read_metadata(path) is None:  # also checks that the header is a readable safetensors'
        raise ValueError(f"{path} is not a vistra checkpoint; an explain choice is recorded "
                         "in the metadata of one")
    with open(path, "rb") as source:
        (size,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(size))
        header["__metadata__"][EXPLAIN_KEY] = json.dumps(choice.to_dict())
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the tensors stay 8-byte aligned

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as target:
                target.write(struct.pack("<Q", len(encoded)) + encoded)
                source.seek(8 + size)
                shutil.copyfileobj(source, target, 1 << 20)
        return atomic_write(output, write, replace=overwrite)


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
        "family": meta.get("family"),  # absent in files of vistra before families
        "explain": json.loads(meta[EXPLAIN_KEY]) if EXPLAIN_KEY in meta else None,
    }


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a vistra checkpoint describes and load its weights.

    The model gets `.classes` (list of names or None) besides `.name`, `.arch`, `.data_config`,
    and `.card.explain`, the explain method measured for it, if one was.
    The file is not trusted: building the model its metadata declares may not allocate
    more than the file's weights (each allocation is checked before it is made), and no
    weight may be NaN or infinite.
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
            explain = None if meta["explain"] is None else \
                ExplainChoice.from_dict(meta["explain"])
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
    _check_declared_numbers(path, arch, data, shapes)
    weights = sum(math.prod(shape) for shape in shapes.values()) * 4  # built as float32
    try:
        with _AllocationBudget(weights + _BUILD_ALLOWANCE, lambda what: _refusal(path, what)):
            model = build_from_arch(meta["model_name"], arch, meta["family"])
    except _Refused:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:  # unknown name, option
        raise _refusal(path, f"a model vistra cannot build ({err})") from err
    declared = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if declared != shapes:
        key = next(k for k in sorted(declared.keys() | shapes.keys())
                   if declared.get(k) != shapes.get(k))
        raise _refusal(path, f"{meta['model_name']} with tensor {key} of shape "
                             f"{declared.get(key, 'none')}, but the file holds "
                             f"{shapes.get(key, 'none')}")
    model.data_config = data
    model.card.explain = explain
    state = load_file(str(path), device=str(device))
    check_finite(state, path)
    model.load_state_dict(state)
    # Files converted before class names travelled with weights: a 1000-class head is
    # ImageNet-1k's.
    model.classes = meta["classes"] or default_classes(model.arch.num_classes)
    return model.to(device)


# Larger inputs than this per side are no image classifier's: a crop of that size alone
# would take gigabytes per image.
MAX_IMAGE_SIDE = 8192
# Swin's relative position index takes M^4 entries per block, computed, not stored: a window
# of 200 would take 12.8 GB in each. Published models use 7 to 24.
MAX_WINDOW = 32
# Building may allocate this much beyond the file's weights (as float32): buffers computed
# at construction.
_BUILD_ALLOWANCE = 64 << 20


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors header alone."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


class _Refused(ValueError):
    """A checkpoint refused for what its metadata declares (the message names the file)."""


def _refusal(path: Path, what: str) -> ValueError:
    return _Refused(f"{path} was refused: its metadata declares {what}; the file is corrupt "
                    f"or was edited, use another copy of the checkpoint")


def _check_declared_numbers(path: Path, arch: dict, data: DataConfig,
                            shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse declared numbers that would cost time or memory no file of this size can
    justify, before the model is built: layers (each has weights in the file), input size
    and window (their cost is computed, not stored)."""
    layers = sum(sum(_ints(arch.get(key))) for key in ("depth", "depths", "hybrid_depths"))
    layers += len(arch.get("conv_stem") or ())
    if layers > len(shapes):
        raise _refusal(path, f"{layers} layers, but the file holds {len(shapes)} tensors")
    side = max([*_ints(arch.get("img_size")), *_ints(data.img_size)], default=0)
    if side > MAX_IMAGE_SIDE:
        raise _refusal(path, f"an input size of {side} pixels, over the {MAX_IMAGE_SIDE} limit")
    window = max(_ints(arch.get("window_size")), default=0)
    if window > MAX_WINDOW:
        raise _refusal(path, f"a window of {window}, over the {MAX_WINDOW} limit")


class _AllocationBudget(TorchFunctionMode):
    """While active, a tensor constructor that would take what was built past `budget`
    bytes is refused before it allocates: a few bytes of metadata can declare an embedding
    of a million channels, which built would take terabytes."""

    _SIZED = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand,
                        torch.randn})

    def __init__(self, budget: int, refuse: Callable[[str], ValueError]) -> None:
        super().__init__()
        self.budget, self.used, self.refuse = budget, 0, refuse

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SIZED:
            size = kwargs.get("size", args[0] if args and not isinstance(args[0], int) else args)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.used += math.prod(size) * dtype.itemsize
            if self.used > self.budget:
                raise self.refuse(f"a model of more than {self.budget:,} bytes, more than "
                                  f"the file's weights")
        return func(*args, **kwargs)


def _ints(value: object) -> list[int]:
    """The integers of a config value: an int, a tuple of them, or None."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, tuple | list):
        return [v for v in value if isinstance(v, int)]
    return []
