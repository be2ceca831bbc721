"""Classify images with a checkpoint: top-k classes with probabilities, as text, JSON or CSV,
and optionally copies of the images with the top label drawn on them.

A vistra checkpoint carries the architecture, the class names and the preprocessing, so
nothing but the checkpoint and the images is needed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from vistra.data import ImageLoadError, is_image_file, list_files, load_rgb
from vistra.fileio import atomic_write

from .evaluate import eval_transform, predict_log_probs
from .output import printable, to_json

FORMATS = ("text", "json", "csv")
_MIN_ANNOTATED_WIDTH = 320  # small images are enlarged so the label stays legible
_MAX_ANNOTATED_PIXELS = 4_000_000  # ... up to this size (12 MB as RGB)
ANNOTATED_SUFFIX = ".vistra.png"  # annotated copies: photo.jpg -> photo.vistra.png


@dataclass(frozen=True)
class Prediction:
    path: Path
    topk: list[tuple[str, float]]  # (class name, probability), most likely first


def find_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders (recursively, image file types only, sorted); keep files as given.

    Folders are listed as training lists them (vistra.data.list_files): links followed, each
    real file once. Returns the images and (path, reason) for inputs that do not exist or
    hold no images.
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


@torch.no_grad()
def predict_images(model: nn.Module, paths: Iterable[str | os.PathLike], *, topk: int = 5,
                   batch_size: int = 32,
                   flip: bool = False) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k predictions for each readable image; unreadable ones come back with a reason.
    With `flip`, each image's probabilities are the mean of its own and its mirror image's.

    `model` needs `.classes` (as from vistra.weights.load_checkpoint) and `.data_config`.
    """
    if not getattr(model, "classes", None):
        raise ValueError("the model has no class names (.classes); load it with "
                         "vistra.weights.load_checkpoint from a checkpoint that records them")
    transform = eval_transform(model)
    device = next(model.parameters()).device
    model.eval()
    k = min(topk, len(model.classes))
    predictions, failed = [], []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        probs = predict_log_probs(model, torch.stack([x for _, x in batch]).to(device),
                                  flip).exp()
        values, indices = probs.topk(k, dim=1)
        for (path, _), vs, ix in zip(batch, values.tolist(), indices.tolist(), strict=True):
            topk_named = [(model.classes[i], v) for i, v in zip(ix, vs, strict=True)]
            predictions.append(Prediction(path, topk_named))
        batch.clear()

    for path in map(Path, paths):
        try:
            batch.append((path, transform(load_rgb(path))))
        except ImageLoadError as err:
            failed.append((path, err.reason))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return predictions, failed


def format_predictions(predictions: list[Prediction], fmt: str = "text") -> str:
    """text: one line per image; json: a list of {path, topk: [{class, probability}]} (`[]`
    for none; a NaN probability is null); csv: one row per (image, rank) with a header.

    Names that are not valid UTF-8 are shown with \\xNN escapes (vistra.output.printable).
    """
    if fmt == "json":
        return to_json([{"path": printable(p.path),
                         "topk": [{"class": printable(c), "probability": v} for c, v in p.topk]}
                        for p in predictions], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability"])
        for p in predictions:
            writer.writerows((printable(p.path), rank, printable(c), f"{v:.6f}")
                             for rank, (c, v) in enumerate(p.topk, 1))
        return out.getvalue().rstrip("\n")
    if fmt == "text":
        return "\n".join(f"{printable(p.path)}: "
                         + ", ".join(f"{printable(c)} {100 * v:.1f}%" for c, v in p.topk)
                         for p in predictions)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def annotate(prediction: Prediction, out_path: str | os.PathLike) -> Path:
    """Write a PNG copy of the image with its top class and probability on a banner at the
    top. An existing `out_path` is never replaced (FileExistsError names it)."""
    image = load_rgb(prediction.path)
    # Narrow images are enlarged so the label stays legible, but never beyond
    # _MAX_ANNOTATED_PIXELS: a 1 x 50000 strip would otherwise become 320 x 16 million.
    factor = min(_MIN_ANNOTATED_WIDTH / image.width,
                 math.sqrt(_MAX_ANNOTATED_PIXELS / (image.width * image.height)))
    if factor > 1:
        image = image.resize((max(1, math.floor(image.width * factor)),
                              max(1, math.floor(image.height * factor))),
                             Image.Resampling.NEAREST)
    name, prob = prediction.topk[0]
    font = ImageFont.load_default(size=max(12, image.width // 20))
    text = f"{name} {100 * prob:.1f}%"
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, (bottom - top) // 4)
    draw = ImageDraw.Draw(image, "RGBA")
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0, 170))
    draw.text((pad - left, pad - top), text, font=font, fill=(255, 255, 255))
    return atomic_write(out_path, lambda tmp: image.save(tmp, format="PNG"), replace=False)


def annotated_name(path: Path) -> str:
    """`photo.jpg` -> `photo.vistra.png`: never an input's own name, so an input is never
    overwritten, even with OUTDIR the input folder."""
    return f"{path.stem}{ANNOTATED_SUFFIX}"


def annotate_all(predictions: list[Prediction], outdir: str | os.PathLike) -> list[Path]:
    """Annotated copies in `outdir`, named `<stem>.vistra.png` (`<stem>_2.vistra.png`, ... if
    stems repeat). Nothing is written if any of these names already exists there: the
    FileExistsError names the first, so existing files are never replaced."""
    outdir, targets, used = Path(outdir), [], set()
    for p in predictions:
        name, n = annotated_name(p.path), 1
        while name in used:
            n += 1
            name = f"{p.path.stem}_{n}{ANNOTATED_SUFFIX}"
        used.add(name)
        targets.append(outdir / name)
    for target in targets:
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} already exists; vistra does not replace files: "
                                  "move it away or choose another --annotate folder")
    return [annotate(p, target) for p, target in zip(predictions, targets, strict=True)]
