"""Fashion-MNIST as an image folder: a real dataset that trains in minutes on a CPU.

The data comes from the four IDX files Zalando Research publishes (Debian/Ubuntu ship them in
the `dataset-fashion-mnist` package). Exporting them as PNG folders lets every other part of
vistra treat them exactly like a user's own photos.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# Label order of the official files; "/" and " " replaced so the names work as folder names.
FASHION_MNIST_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_PARALLEL_MIN = 2000  # below this, starting worker processes costs more than it saves


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a native array."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: damaged gzip data ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected magic bytes 00 00 <type> <ndim>, "
            f"found {data[:4].hex(' ')}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: header for {ndim} dimensions is cut short")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header promises shape {shape} ({expected} bytes), "
            f"file holds {len(data) - header} bytes"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    split: str = "train", source: str | os.PathLike = DEFAULT_SOURCE
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels uint8 [N]) of the official train or test split."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = Path(source)
    prefix = _FILE_PREFIX[split]
    images = read_idx(_find(source, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(source, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{source}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{source}: {split} labels go up to {labels.max()}, expected 0-9")
    return images.astype(np.uint8), labels.astype(np.uint8)


def _find(source: Path, name: str) -> Path:
    for candidate in (source / f"{name}.gz", source / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {source}. On Debian/Ubuntu install it "
        "with `sudo apt-get install dataset-fashion-mnist`, or pass --source DIR naming a "
        "folder that holds the four idx files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
        "optionally gzipped)."
    )


def export_fashion_mnist(
    outdir: str | os.PathLike,
    source: str | os.PathLike = DEFAULT_SOURCE,
    per_class_train: int | None = None,
    per_class_test: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, dict[str, int]]:
    """Write OUTDIR/{train,test}/<class>/<index>.png and return the counts per class.

    <index> is the image's position in the official file, so every PNG can be traced back.
    `per_class_*` keep a seeded random subset of that many images per class (balanced, drawn
    independently per class); None keeps all. The PNGs are encoded in `workers` processes.
    """
    outdir = Path(outdir)
    for part in ("train", "test"):
        folder = outdir / part
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} already holds files; export into an empty folder or delete it first"
            )
    counts: dict[str, dict[str, int]] = {}
    jobs: list[tuple[str, np.ndarray]] = []
    for part, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = load_fashion_mnist(part, source)
        counts[part] = {}
        for label, name in enumerate(FASHION_MNIST_CLASSES):
            chosen = _choose(np.flatnonzero(labels == label), per_class, seed, label, part)
            (outdir / part / name).mkdir(parents=True, exist_ok=True)
            jobs += [(str(outdir / part / name / f"{i:05d}.png"), images[i]) for i in chosen]
            counts[part][name] = len(chosen)
    if len(jobs) < _PARALLEL_MIN:
        _write_pngs(jobs)
    else:
        workers = workers or os.cpu_count() or 1
        chunk = math.ceil(len(jobs) / (4 * workers))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_pngs, [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]))
    return counts


def _choose(
    indices: np.ndarray, per_class: int | None, seed: int, label: int, part: str
) -> np.ndarray:
    if per_class is None:
        return indices
    if not 0 < per_class <= len(indices):
        raise ValueError(
            f"per-class {part} count must be between 1 and {len(indices)}, got {per_class}"
        )
    rng = np.random.default_rng([seed, label])
    return np.sort(rng.choice(indices, size=per_class, replace=False))


def _write_pngs(jobs: list[tuple[str, np.ndarray]]) -> None:
    for path, pixels in jobs:
        Image.fromarray(pixels).save(path)


def bundled_demo_dir() -> Path:
    """The small Fashion-MNIST folder shipped with vistra (250 train / 50 test per class)."""
    return Path(__file__).resolve().parent.parent / "assets" / "fashion_mnist_mini"
