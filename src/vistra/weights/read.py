"""Reading a weights file into a flat dict of tensors, safely, whatever its container.

The container is recognised by its bytes, not its name: safetensors, a PyTorch zip or legacy
pickle (.pth / .bin / .pt), a NumPy .npz, or a HuggingFace directory. Nothing read here can
run code: pickles go through `torch.load(weights_only=True)`, .npz through
`numpy.load(allow_pickle=False)`.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

Tensors = dict[str, torch.Tensor]

# Where training scripts put the model's state dict inside a checkpoint, best first; the EMA
# copies come last so the trained weights win when both are there.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module", "model_ema",
                   "state_dict_ema")
# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class RawWeights:
    """The tensors of a file, in the layout of the library that wrote it."""

    tensors: Tensors
    container: str  # "safetensors", "PyTorch pickle", "NumPy .npz"
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    notes: list[str] = field(default_factory=list)  # what was taken from a larger checkpoint


class _ConfigRecord:
    """Stands in for the configuration objects training scripts pickle beside the weights (the
    Swin authors' yacs CfgNode, the argparse Namespace of timm and DeiT), so those checkpoints
    load without those classes: unpickling one gives an empty OrderedDict that only stores
    the fields, so no class or function the file names is imported or called."""

    def __new__(cls, *args, **kwargs) -> OrderedDict:
        return OrderedDict()


_CONFIG_CLASSES = [(_ConfigRecord, name) for name in ("yacs.config.CfgNode", "argparse.Namespace")]


def read_weights(path: str | os.PathLike) -> RawWeights:
    """Tensors of a weights file or HuggingFace directory; clear errors for anything else,
    including weights holding NaN or infinity."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {path} do not exist")
    if path.is_dir():
        return _read_hf_directory(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); download it again")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        weights = _read_zip(path)
    elif _looks_like_safetensors(head):
        weights = _read_safetensors(path)
    elif head[:1] == b"\x80":  # pickle protocol 2+: PyTorch's legacy format
        weights = _read_torch(path)
    else:
        raise ValueError(
            f"{path} is not a weights file vistra can read: expected safetensors, a PyTorch "
            f".pth/.bin (zip or pickle) or a NumPy .npz, but it starts with bytes {head!r}"
        )
    check_finite(weights.tensors, path)
    return weights


def check_finite(tensors: Tensors, origin: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: they would
    make every prediction NaN (or silently wrong) instead of failing here, at the cause."""
    for name, tensor in tensors.items():
        # A sum is one cheap pass and is non-finite whenever an element is; only then (or on
        # an overflow of a half-precision sum) is each element looked at.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"{origin}: tensor {name} holds {bad} NaN or infinite values of "
                    f"{tensor.numel()}; the weights are damaged (a diverged run or a corrupt "
                    f"copy): use an earlier checkpoint or download the file again")


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header. A length
    beyond the file's end means a truncated file, which the reader then reports."""
    return head[8:9] == b"{"


def _corrupt(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); "
                      f"download or copy it again")


def _read_zip(path: Path) -> RawWeights:
    """A PyTorch zip checkpoint (holds data.pkl) or a NumPy .npz (holds .npy members)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _corrupt(path, err) from err
    if any(n.endswith("constants.pkl") for n in names):
        raise ValueError(f"{path} is a TorchScript archive, a compiled program rather than "
                         f"weights; vistra never runs code from a file. Save the model's "
                         f"state_dict() with torch.save or safetensors and load that")
    if any(n.endswith("data.pkl") for n in names):
        return _read_torch(path)
    if names and all(n.endswith(".npy") for n in names):
        return _read_npz(path)
    raise ValueError(f"{path} is a zip archive but neither a PyTorch checkpoint (no data.pkl) "
                     f"nor a NumPy .npz; its first members: {', '.join(names[:5])}")


def _read_torch(path: Path) -> RawWeights:
    # An open file rather than the path: given a path ending in .safetensors, torch.load
    # would go by the name instead of the content.
    try:
        with open(path, "rb") as f, torch.serialization.safe_globals(_CONFIG_CLASSES):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} was refused: loading it needs more than tensors ({_unsafe_detail(err)}), "
            f"and vistra never runs code from a weights file. If you trust the file, re-save "
            f"its state dict (tensors only) where running its code is safe, and load that"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise _corrupt(path, err) from err
    notes: list[str] = []
    tensors = _find_state_dict(obj, path, notes)
    return RawWeights(_strip_wrapper_prefix(tensors, notes), "PyTorch pickle", notes=notes)


def _unsafe_detail(err: pickle.UnpicklingError) -> str:
    message = str(err)
    match = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if match:
        return f"it refers to {match[1]}"
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.DOTALL)
    return match[1].strip() if match else message.splitlines()[0]


def _is_tensor_dict(obj: object) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _find_state_dict(obj: object, path: Path, notes: list[str]) -> Tensors:
    """The state dict itself, or the one a training checkpoint keeps under 'model' & co."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(obj.get(key)):
                others = sorted(str(k) for k in obj if k != key)
                notes.append(f"took checkpoint[{key!r}]"
                             + (f"; ignored {', '.join(others)}" if others else ""))
                return dict(obj[key])
        found = ", ".join(repr(k) for k in list(obj)[:10])
        raise ValueError(f"{path} holds no state dict: expected a dict of tensors, or one under "
                         f"{' / '.join(repr(k) for k in STATE_DICT_KEYS)}; found keys {found}")
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")


def _strip_wrapper_prefix(tensors: Tensors, notes: list[str]) -> Tensors:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            notes.append(f"removed the {prefix!r} prefix of every key")
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _read_safetensors(path: Path) -> RawWeights:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _corrupt(path, err) from err
    notes: list[str] = []
    return RawWeights(_strip_wrapper_prefix(tensors, notes), "safetensors", metadata, notes)


def _read_npz(path: Path) -> RawWeights:
    """Flax parameters flattened to '/'-joined names (Google's ViT releases)."""
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in arrays.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{path} was refused: it holds Python objects (object arrays), "
                             f"which only a pickle can load; vistra never runs code from a "
                             f"weights file") from None
        raise _corrupt(path, err) from err
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _corrupt(path, err) from err
    return RawWeights(tensors, "NumPy .npz")


# A deflated member may expand this many times (a real .npz of weights barely compresses; a
# zip bomb of zeros expands ~1000 times), or to this many bytes whatever the file's size.
_NPZ_MAX_EXPANSION = 100
_NPZ_EXPANSION_ALLOWANCE = 256 << 20
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


def _check_npz_sizes(path: Path) -> None:
    """Hold each array's declared size to what the archive really holds, before numpy
    allocates it: a .npy header of a few bytes can declare terabytes, and numpy allocates
    the whole array before reading a member of a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            expanded = sum(member.file_size for member in members)
            limit = max(_NPZ_MAX_EXPANSION * path.stat().st_size, _NPZ_EXPANSION_ALLOWANCE)
            if expanded > limit:
                raise ValueError(f"{path} was refused: its {path.stat().st_size:,} bytes would "
                                 f"expand to {expanded:,}, as a zip bomb does, not weights")
            for member in members:
                with archive.open(member) as f:
                    shape, dtype = _npy_header(f, path, member.filename)
                    declared, held = math.prod(shape) * dtype.itemsize, member.file_size - f.tell()
                    if not dtype.hasobject and declared > held:
                        raise ValueError(
                            f"{path} was refused: {member.filename} declares a {shape} "
                            f"{dtype} array ({declared:,} bytes) but holds {held:,} bytes; "
                            f"the file is corrupt")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _corrupt(path, err) from err


def _npy_header(f: IO[bytes], path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy member declares, read from its header alone."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is not None:
            shape, _, dtype = read_header(f)
    except ValueError as err:
        raise _corrupt(path, err) from err
    if read_header is None:
        raise ValueError(f"{path}: {name} is in .npy format {version}, which vistra does not "
                         f"read; re-save the arrays with numpy.savez")
    return shape, dtype


def _read_hf_directory(path: Path) -> RawWeights:
    """A directory written by `save_pretrained`: config.json beside the weights file."""
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            weights = read_weights(path / name)
            weights.notes.insert(0, f"HuggingFace directory, weights from {name}")
            return weights
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise ValueError(f"directory {path} holds no weights: expected a HuggingFace model directory "
                     f"with {' or '.join(HF_WEIGHT_FILES)}; found {found}")
