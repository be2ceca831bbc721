"""Turn a folder of class sub-folders into a checked, reproducible train/validation split.

Two layouts are understood:
  root/<class>/*.jpg                      split here, per class, `val_fraction` to validation
  root/train/<class>/*, root/val/<class>/* (or validation/ or test/) used as given
Every file is vetted up front, so a broken image is reported by name at the start instead of
failing an epoch later.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vistra.data.images import ImageLoadError, check_image, is_image_file, load_rgb
from vistra.data.transforms import pixel_mode
from vistra.fileio import atomic_write_text

Sample = tuple[Path, int]

VAL_FOLDER_NAMES = ("val", "validation", "test")


@dataclass
class DatasetSplit:
    """The classes (index = position) and the labelled files of each part of a dataset."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[Path, str]]
    split_source: str  # "random" (split by vistra) or "folders" (train/ and val/ given)
    # What the scan decoded, when asked to keep it: a cached dataset then starts full.
    images: dict[Path, Image.Image] = field(default_factory=dict, repr=False)


def scan_image_folder(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
    workers: int | None = None,
    keep_images: bool = False,
) -> DatasetSplit:
    """Find the classes and images under `root` and split them into train and validation.

    The random split is made per class, so every class keeps its share in both parts, and
    depends only on `seed`, the class name and the sorted file names: not on the order the
    file system lists them, nor on which other classes exist. With `check`, every file is
    decoded (in `workers` threads; Pillow releases the GIL while decoding) and failures go to
    `skipped` with a reason; `keep_images` keeps the decoded RGB images in `images`, for a
    dataset that caches them anyway (it saves decoding each file a second time in the first
    epoch). Raises ValueError for a folder that cannot make a classifier.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    subdirs = {path.name: path for path in _visible_subdirs(root)}
    val_name = next((name for name in VAL_FOLDER_NAMES if name in subdirs), None)
    if "train" in subdirs and val_name is not None:
        parts = {"train": subdirs["train"], "val": subdirs[val_name]}
        class_dirs = {part: _visible_subdirs(folder) for part, folder in parts.items()}
        split_source = "folders"
    else:
        class_dirs = {"all": list(subdirs.values())}
        split_source = "random"
    classes = sorted({folder.name for folders in class_dirs.values() for folder in folders})
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    if len(classes) == 1:
        raise ValueError(
            f"{root} has a single class folder ({classes[0]}); a classifier needs at least two"
        )

    listed = {folder: _list_files(folder) for folders in class_dirs.values() for folder in folders}
    reasons, decoded = _vet([path for files in listed.values() for path in files], check,
                            workers, keep_images)
    skipped = sorted((path, reasons[path]) for path in reasons if reasons[path])
    found: dict[str, dict[str, list[Path]]] = {part: {} for part in class_dirs}
    for part, folders in class_dirs.items():
        for folder in folders:
            images = [path for path in listed[folder] if reasons[path] is None]
            if not images:
                rejected = [(path, reasons[path]) for path in listed[folder]]
                raise ValueError(f"class folder {folder} has no valid images{_why(rejected)}")
            found[part][folder.name] = images

    index = {name: i for i, name in enumerate(classes)}
    if split_source == "folders":
        train = _label(found["train"], index)
        val = _label(found["val"], index)
    else:
        train, val = [], []
        for name, paths in sorted(found["all"].items()):
            train_paths, val_paths = _split_class(paths, name, val_fraction, seed)
            train += [(path, index[name]) for path in train_paths]
            val += [(path, index[name]) for path in val_paths]
    return DatasetSplit(classes, train, val, skipped, split_source, decoded)


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_files(folder: Path) -> list[Path]:
    """All visible files under `folder` (recursively, following links), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        files += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    return sorted(files)


def _vet(files: list[Path], check: bool, workers: int | None, keep: bool
         ) -> tuple[dict[Path, str | None], dict[Path, Image.Image]]:
    """Map each file to None (usable) or the reason it is skipped; with `keep`, also the
    usable files to their decoded images."""
    reasons: dict[Path, str | None] = {
        path: None if is_image_file(path) else "not an image file type" for path in files
    }
    images: dict[Path, Image.Image] = {}
    if check:
        candidates = [path for path, reason in reasons.items() if reason is None]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for path, (reason, image) in zip(candidates, pool.map(
                    _load_or_reason if keep else _check_only, candidates), strict=True):
                reasons[path] = reason
                if image is not None:
                    images[path] = image
    return reasons, images


def _check_only(path: Path) -> tuple[str | None, None]:
    return check_image(path), None


def _load_or_reason(path: Path) -> tuple[str | None, Image.Image | None]:
    try:
        return None, load_rgb(path)
    except ImageLoadError as error:
        return error.reason, None


def _why(rejected: list[tuple[Path, str]]) -> str:
    if not rejected:
        return " (it is empty)"
    path, reason = rejected[0]
    return f" ({len(rejected)} files skipped, e.g. {path.name}: {reason})"


def _label(found: dict[str, list[Path]], index: dict[str, int]) -> list[Sample]:
    return [(path, index[name]) for name, paths in sorted(found.items()) for path in paths]


def _split_class(
    paths: list[Path], name: str, val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Seeded per-class split; keeps >= 1 image on each side when the class has two or more."""
    n_val = round(len(paths) * val_fraction)
    if val_fraction > 0 and len(paths) >= 2:
        n_val = min(max(n_val, 1), len(paths) - 1)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    val_positions = set(rng.permutation(len(paths))[:n_val].tolist())
    train = [path for i, path in enumerate(paths) if i not in val_positions]
    val = [path for i, path in enumerate(paths) if i in val_positions]
    return train, val


def write_class_indices(classes: list[str], path: str | os.PathLike) -> None:
    """Write {"0": name, ...}: the file prediction needs to turn an index back into a name."""
    atomic_write_text(path, json.dumps({str(i): name for i, name in enumerate(classes)},
                                       indent=2))


def read_class_indices(path: str | os.PathLike) -> list[str]:
    """Read a class_indices.json back into the list of names ordered by index."""
    mapping = json.loads(Path(path).read_text())
    if not isinstance(mapping, dict) or sorted(mapping) != sorted(map(str, range(len(mapping)))):
        raise ValueError(f'{path}: expected a JSON object with keys "0".."K-1"')
    return [mapping[str(i)] for i in range(len(mapping))]


def class_counts(split: DatasetSplit) -> dict[str, dict[str, int]]:
    """Images per class in each part: {class: {"train": n, "val": m}}."""
    counts = {name: {"train": 0, "val": 0} for name in split.classes}
    for part in ("train", "val"):
        for _, label in getattr(split, part):
            counts[split.classes[label]][part] += 1
    return counts


def format_class_counts(split: DatasetSplit) -> str:
    """A plain-text table of class_counts with a total row, for printing before training."""
    counts = class_counts(split)
    rows = [(name, c["train"], c["val"]) for name, c in counts.items()]
    rows.append(("total", len(split.train), len(split.val)))
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    lines = [f"{'class':<{width}}  {'train':>7}  {'val':>7}"]
    lines += [f"{name:<{width}}  {train:>7}  {val:>7}" for name, train, val in rows]
    if split.skipped:
        lines.append(f"({len(split.skipped)} files skipped)")
    return "\n".join(lines)


def plot_class_counts(split: DatasetSplit, png_path: str | os.PathLike) -> None:
    """Save a bar chart of train and validation images per class, to spot imbalance."""
    # Imported here: matplotlib is slow to import and only this function needs it. Using
    # Figure directly renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    counts = class_counts(split)
    names = list(counts)
    x = np.arange(len(names))
    many = len(names) > 8
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    for offset, part in ((-0.2, "train"), (0.2, "val")):
        bars = ax.bar(x + offset, [counts[n][part] for n in names], width=0.4, label=part)
        if len(names) <= 30:
            ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, names, rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("images")
    ax.set_title(f"Images per class ({len(split.train)} train, {len(split.val)} val)")
    ax.margins(y=0.2)  # headroom so the legend does not cover the tallest bars
    ax.legend(ncols=2, loc="upper right")
    fig.savefig(png_path, dpi=120)


class ImageFolderDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (transform(image), label), images loaded on demand as RGB
    (`channels` 3) or as the grey level (`channels` 1, Pillow's "L", for grey-level models).

    With `cache`, each image is decoded once and kept: for datasets that fit in memory, where
    decoding would otherwise cost as much as the model (a 28x28 PNG takes ~0.3 ms to open and
    decode). Each DataLoader worker process fills a cache of its own. It holds the images in
    the mode the transform works in, so that conversion too is done once. `decoded` (the
    scan's `DatasetSplit.images`) fills the cache from the start.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[Image.Image], torch.Tensor] | None,
        cache: bool = False,
        channels: int = 3,
        decoded: dict[Path, Image.Image] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.mode = pixel_mode(channels)
        self._cache: dict[int, Image.Image] | None = None
        if cache:
            decoded = decoded or {}
            self._cache = {i: self._in_mode(decoded[path])
                           for i, (path, _) in enumerate(self.samples) if path in decoded}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        path, label = self.samples[index]
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            try:
                image = load_rgb(path)
            except ImageLoadError as error:  # changed on disk since the scan, or never checked
                raise RuntimeError(f"failed to load {path}: {error.reason}") from error
            image = self._in_mode(image)
            if self._cache is not None:
                self._cache[index] = image
        return (self.transform(image) if self.transform else image), label

    def _in_mode(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)
