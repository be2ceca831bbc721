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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from vistra.data import ImageLoadError, load_rgb
from vistra.fileio import atomic_write

from .evaluate import predict_log_probs
from .output import printable, to_json
from .runtime import Classifier, module_classifier

FORMATS = ("text", "json", "csv")
_MIN_ANNOTATED_WIDTH = 320  # small images are enlarged so the label stays legible
_MAX_ANNOTATED_PIXELS = 4_000_000  # ... up to this size (12 MB as RGB)
ANNOTATED_SUFFIX = ".vistra.png"  # annotated copies: photo.jpg -> photo.vistra.png


@dataclass(frozen=True)
class Prediction:
    path: Path
    topk: list[tuple[str, float]]  # (class name, probability), most likely first


def _image_loader(classifier: Classifier) -> Callable[[Path], torch.Tensor]:
    """Path -> the model's input tensor. JPEGs far larger than the input are decoded in
    draft mode at a size that still leaves the resize at least a 2x reduction, so the result
    differs from a full decode by no more than the resize's own filtering does."""
    dc = classifier.data_config
    min_side = 2 * max(int(side / dc.crop_pct) for side in dc.img_size)
    return lambda path: classifier.transform(load_rgb(path, min_side=min_side))


def decode_ahead(paths: Iterable[Path], load: Callable[[Path], torch.Tensor], workers: int,
                 ahead: int) -> Iterator[tuple[Path, torch.Tensor | ImageLoadError]]:
    """(path, loaded tensor or the error) in input order, decoded by `workers` threads up to
    `ahead` images in front of the consumer, so decoding overlaps the model's compute (Pillow
    and the tensor conversion release the GIL) while memory stays bounded."""
    def attempt(path: Path) -> torch.Tensor | ImageLoadError:
        try:
            return load(path)
        except ImageLoadError as err:
            return err

    paths = iter(paths)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="vistra-decode") as pool:
        pending = deque((p, pool.submit(attempt, p)) for p in islice(paths, max(1, ahead)))
        while pending:
            path, future = pending.popleft()
            for p in islice(paths, 1):
                pending.append((p, pool.submit(attempt, p)))
            yield path, future.result()


def iter_predictions(model: nn.Module | Classifier, paths: Iterable[str | os.PathLike], *,
                     topk: int = 5, batch_size: int = 32, flip: bool = False,
                     workers: int = 2, head: str = "mean"
                     ) -> Iterator[Prediction | tuple[Path, str]]:
    """Predictions streamed in input order: a Prediction per readable image, (path, reason)
    for each unreadable one. Images are decoded by `workers` threads while the model runs.
    head: a distilled module's mean, cls or dist head (a Classifier answers with the head
    it was loaded with)."""
    classifier = model if isinstance(model, Classifier) else module_classifier(model, head)
    classes = classifier.classes
    if not classes:
        raise ValueError("the model has no class names (.classes); load it with "
                         "vistra.weights.load_checkpoint from a checkpoint that records them")
    k = min(topk, len(classes))
    batch: list[tuple[Path, torch.Tensor]] = []
    waiting: list[tuple[Path, str]] = []  # failures held back to keep the input order

    def flush() -> Iterator[Prediction | tuple[Path, str]]:
        if batch:
            probs = predict_log_probs(classifier, torch.stack([x for _, x in batch]), flip).exp()
            values, indices = probs.topk(k, dim=1)
            for (path, _), vs, ix in zip(batch, values.tolist(), indices.tolist(), strict=True):
                yield Prediction(path, [(classes[i], v) for i, v in zip(ix, vs, strict=True)])
        yield from waiting
        batch.clear()
        waiting.clear()

    loaded = decode_ahead(map(Path, paths), _image_loader(classifier), workers, 2 * batch_size)
    for path, item in loaded:
        if isinstance(item, ImageLoadError):
            if not batch:
                yield path, item.reason
            else:
                waiting.append((path, item.reason))  # after the batch's earlier images
            continue
        if waiting:  # an image after a failure: finish the batch so the order holds
            yield from flush()
        batch.append((path, item))
        if len(batch) == batch_size:
            yield from flush()
    yield from flush()


@torch.no_grad()
def predict_images(model: nn.Module | Classifier, paths: Iterable[str | os.PathLike], *,
                   topk: int = 5, batch_size: int = 32, flip: bool = False,
                   workers: int = 2, head: str = "mean"
                   ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k predictions for each readable image, in input order; unreadable ones come back
    with a reason. With `flip`, each image's probabilities are the mean of its own and its
    mirror image's. Decoding runs in `workers` threads beside the model.

    `model` is a Classifier (vistra.runtime.load_classifier: PyTorch or onnxruntime) or a
    module with `.classes` and `.data_config` (as from vistra.weights.load_checkpoint), of
    which a distilled one answers with `head` (mean, cls or dist).
    """
    predictions, failed = [], []
    for item in iter_predictions(model, paths, topk=topk, batch_size=batch_size, flip=flip,
                                 workers=workers, head=head):
        (predictions if isinstance(item, Prediction) else failed).append(item)
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
