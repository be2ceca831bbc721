"""last.ckpt: everything needed to continue a run exactly where it stopped, and the run
directory's lock.

It is a torch.save of plain dicts, lists, numbers, strings and tensors only, so it loads
with torch.load(weights_only=True), which cannot execute code from the file. It is written
to a temporary file, synced and renamed (vistra.fileio), so an interruption during the write
leaves the previous checkpoint intact. It holds the metrics record of every epoch it covers,
so the checkpoint and metrics.jsonl can never disagree after a resume.
"""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vistra.fileio import atomic_write

FORMAT = "vistra-train/1"
KEYS = ("epoch", "best_top1", "best_epoch", "best_weights", "classes", "config", "model",
        "optimizer", "scheduler", "ema", "history", "run")
LAST = "last.ckpt"  # this file
BEST = "best.safetensors"  # the weights that validated best, for eval, predict and export
# Files that show a directory holds a run: a new run there would overwrite them.
RUN_FILES = (BEST, LAST, "metrics.jsonl", "config.yaml")
LOCK_FILE = ".lock"


def save_training_state(state: dict, path: str | os.PathLike) -> None:
    """Atomically write `state` (which must hold KEYS) to `path`."""
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"training state lacks {', '.join(missing)}")
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


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
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} was written by an earlier vistra that did not record "
                         f"{', '.join(missing)}; resume it with that version, or start a new run")
    return state


@contextmanager
def locked_run_dir(run_dir: Path, new: bool) -> Iterator[Path]:
    """Hold RUN_DIR/.lock (an exclusive flock, released when the process ends, even by a
    kill) while training in `run_dir`, so that two processes never write one run.

    `new`: the directory is created if needed and must not hold a run yet.
    """
    if new:
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--output {run_dir} is a file; choose a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
    elif not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; --resume needs a run directory "
                                "from an earlier `vistra train`")
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another vistra training process (it "
                             f"holds {run_dir / LOCK_FILE}); wait for it to end or choose "
                             "another --output") from None
        for stale in run_dir.glob(".*.tmp"):  # a killed writer's (vistra.fileio); none runs now
            stale.unlink()
        found = [name for name in RUN_FILES if (run_dir / name).exists()]
        if new and found:
            what = (f"continue it with `vistra train --resume {run_dir}`" if LAST in found
                    else "it stopped before its first checkpoint: delete these files")
            raise ValueError(f"{run_dir} already holds a run ({', '.join(found)}); {what} or "
                             "choose another --output")
        yield run_dir
    finally:
        os.close(fd)  # releases the lock
