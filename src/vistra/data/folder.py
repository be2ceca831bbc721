"""Turn a folder of class sub-folders into a checked, reproducible train/validation split.

Two layouts are understood:
  root/<class>/*.jpg                      split here, per class, `val_fraction` to validation
  root/train/<class>/*, root/val/<class>/* used as given (any of TRAIN_FOLDER_NAMES beside
                                          any of VAL_FOLDER_NAMES, in any letter case)
A top level with only some of those names is refused: taken as classes, `train/` and
`valid/` would make a two-class model of the split itself.
Every file is vetted up front, so a broken image is reported by name at the start instead of
failing an epoch later.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
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

TRAIN_FOLDER_NAMES = ("train", "training")
VAL_FOLDER_NAMES = ("val", "valid", "validation", "eval", "test", "testing")  # first found wins


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
    min_classes: int = 2,
) -> DatasetSplit:
    """Find the classes and images under `root` and split them into train and validation.

    The random split is made per class, so every class keeps its share in both parts, and
    depends only on `seed`, the class name and the sorted file names: not on the order the
    file system lists them, nor on which other classes exist. With `check`, every file is
    decoded (in `workers` threads; Pillow releases the GIL while decoding) and failures go to
    `skipped` with a reason; `keep_images` keeps the decoded RGB images in `images`, for a
    dataset that caches them anyway (it saves decoding each file a second time in the first
    epoch). Raises ValueError for a folder that cannot make a classifier (fewer than
    `min_classes` classes: evaluation accepts one).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    subdirs = _visible_subdirs(root)
    parts = _split_folders(root, subdirs)
    if parts:
        class_dirs = {part: _visible_subdirs(folder) for part, folder in parts.items()}
        for part, folder in parts.items():
            if not class_dirs[part]:
                raise ValueError(f"{folder} has no class sub-folders (expected "
                                 f"{folder}/<class>/<image>); the {part} part cannot be empty")
        split_source = "folders"
    else:
        class_dirs = {"all": subdirs}
        split_source = "random"
    classes = sorted({folder.name for folders in class_dirs.values() for folder in folders})
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    if len(classes) < min_classes:
        raise ValueError(
            f"{root} has a single class folder ({classes[0]}); a classifier needs at least two"
        )

    listed, duplicates = list_files([folder for folders in class_dirs.values()
                                     for folder in folders])
    reasons, decoded = _vet([path for files in listed.values() for path in files
                             if path not in duplicates], check, workers, keep_images)
    reasons.update({path: f"same file as {kept}" for path, kept in duplicates.items()})
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


def _split_folders(root: Path, subdirs: list[Path]) -> dict[str, Path]:
    """{"train": folder, "val": folder} when `root` is split into folders, {} when its
    sub-folders are the classes; refuses a mix, whose split names would become classes."""
    by_name = {folder.name.lower(): folder for folder in subdirs}
    train = next((by_name[n] for n in TRAIN_FOLDER_NAMES if n in by_name), None)
    val = next((by_name[n] for n in VAL_FOLDER_NAMES if n in by_name), None)
    if train is not None and val is not None:
        return {"train": train, "val": val}
    named = [folder.name for folder in subdirs
             if folder.name.lower() in TRAIN_FOLDER_NAMES + VAL_FOLDER_NAMES]
    if named:
        found = ", ".join(f"{name}/" for name in named)
        raise ValueError(
            f"{root} holds {found}, named like a split, not a class: give a training folder "
            f"({' or '.join(TRAIN_FOLDER_NAMES)}) beside a validation one "
            f"({', '.join(VAL_FOLDER_NAMES)}), or point at the folder that holds the classes "
            f"(e.g. {root / named[0]})")
    return {}


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


FileId = tuple[int, int] | str  # (st_dev, st_ino), or the path of a broken link


def list_files(folders: Sequence[Path]) -> tuple[dict[Path, list[Path]], dict[Path, Path]]:
    """The visible files under each folder (recursively, sorted), and the paths that reach a
    file already listed, each mapped to the path kept for it.

    Links are followed, but each real directory is entered once per folder, so a link back
    up the tree (`cls/loop -> .`) ends there instead of listing every file again at each
    level. A file reached by several paths (a link, a hard link, a folder linked into
    another) is kept once over all `folders`: under the path through the fewest links, then
    the first in sorted order. Used alike by training, evaluation and prediction.
    """
    walks = {folder: _walk(folder) for folder in folders}
    kept: dict[FileId, tuple[int, Path]] = {}
    for links, path, file_id in itertools.chain(*walks.values()):
        best = kept.get(file_id)
        if best is None or (links, path) < best:  # compared only for a file seen twice
            kept[file_id] = links, path
    files = {folder: sorted(path for _, path, _ in walk) for folder, walk in walks.items()}
    duplicates = {path: kept[file_id][1] for walk in walks.values()
                  for _, path, file_id in walk if path != kept[file_id][1]}
    return files, duplicates


def find_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders (recursively, image file types only, sorted); keep files as given.

    Folders are listed as training lists them (`list_files`): links followed, each real
    file once. Returns the images and (path, reason) for inputs that do not exist or hold no
    images. Used by prediction, explain and the command line alike.
    """
    images, missing = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            listed, duplicates = list_files([item])
            found = [p for p in listed[item] if p not in duplicates and is_image_file(p)]
            if not found:
                missing.append((item, "folder holds no image files"))
            images += found
        elif item.is_file():
            images.append(item)
        else:
            missing.append((item, "no such file or folder"))
    return images, missing


def _walk(folder: Path) -> list[tuple[int, Path, FileId]]:
    """(links followed, path, identity) of each visible file under `folder`, entering every
    real directory once: first all those reached without a link, then through one link, ...

    One stat per directory, not per file: a file that is not a link shares its directory's
    device and has its inode number in the directory listing.
    """
    found: list[tuple[int, Path, FileId]] = []
    entered: set[FileId] = set()
    layer, links = [os.fspath(folder)], 0
    while layer:
        linked: list[str] = []
        pending = list(layer)
        while pending:
            directory = pending.pop()
            directory_id = _identity(directory)
            if directory_id in entered or isinstance(directory_id, str):
                continue
            entered.add(directory_id)
            try:
                entries = list(os.scandir(directory))
            except OSError:  # unreadable: as os.walk does, leave it out
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    if entry.is_dir():  # followed once the real directories are all listed
                        linked.append(entry.path)
                    else:
                        found.append((links + 1, Path(entry.path), _identity(entry.path)))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    found.append((links, Path(entry.path), (directory_id[0], entry.inode())))
        layer, links = sorted(linked), links + 1
    return found


def _identity(path: str | os.PathLike) -> FileId:
    try:
        info = os.stat(path)
    except OSError:  # a broken link: listed, and then reported as unreadable
        return os.fspath(path)
    return info.st_dev, info.st_ino


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
    """Seeded per-class split; keeps >= 1 image on each side when the class has two or more,
    and a class's only image for training (a class never seen in training cannot be learnt)."""
    n_val = round(len(paths) * val_fraction)
    if len(paths) < 2:
        n_val = 0
    elif val_fraction > 0:
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
    decoding a small PNG would otherwise cost as much as the model. Each DataLoader worker
    process fills a cache of its own. It holds the images in the mode the transform works
    in, so that conversion too is done once. `decoded` (the scan's `DatasetSplit.images`)
    fills the cache from the start.
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
