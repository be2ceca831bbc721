"""Writing files so that an interruption (Ctrl-C, a kill, a power cut) never leaves a torn
or half-replaced file, and an existing file is replaced only when the caller says so.

Every writer in vistra goes through here: a whole file is written to a temporary file in
the target's folder, flushed to disk (fsync), then renamed over the target (os.replace is
atomic on POSIX and Windows), and the folder is synced so the rename itself survives a
power cut. Records appended to a log are written as whole lines in one call and synced.
`file_sha256` is the file digest that names a checkpoint (exports and served models record it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# mkstemp makes files readable by their owner only; finished files get the usual mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 replace: bool = True) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it to `path`.

    With `replace` False an existing `path` is never touched: FileExistsError names it (the
    check and the move are one step, os.link, so a file appearing meanwhile is safe too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                _claim(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; vistra does not replace "
                                      "existing files: move it away or choose another "
                                      "output") from None
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)
    return path


def _claim(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` unless `path` exists, in one step: a hard link. Where the
    file system has no hard links (vfat, exFAT, some network mounts), the name is claimed
    with O_EXCL and then replaced: a crash in between leaves an empty file, never a torn one
    and never a replaced one."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), replace=replace)


def atomic_write_text(path: str | os.PathLike, text: str, *, replace: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), replace=replace)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline in one write, synced: a kill leaves at most a torn last
    line, which readers drop (vistra.train.logger.read_metrics)."""
    if "\n" in line:
        raise ValueError("append_line writes one line; the text holds a line break")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (line + "\n").encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened: Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
