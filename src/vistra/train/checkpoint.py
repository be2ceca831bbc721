"""last.ckpt: everything needed to continue a run exactly where it stopped.

It is a torch.save of plain dicts, lists, numbers, strings and tensors only, so it loads
with torch.load(weights_only=True), which cannot execute code from the file. It is written
to a temporary file and renamed, so an interruption during the write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

FORMAT = "vistra-train/1"
KEYS = ("epoch", "best_top1", "best_epoch", "best_weights", "classes", "config", "model",
        "optimizer", "scheduler", "ema")


def save_training_state(state: dict, path: str | os.PathLike) -> None:
    """Atomically write `state` (which must hold KEYS) to `path`."""
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"training state lacks {', '.join(missing)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a last.ckpt written by `save_training_state`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; --resume needs a run directory that "
                                "holds last.ckpt from an earlier `vistra train`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable training checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vistra training checkpoint (expected format "
                         f"{FORMAT!r}); resume needs the last.ckpt of a vistra run")
    return state
