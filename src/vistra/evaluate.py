"""Evaluate a model on labelled images: top-1, top-5, per-class precision and recall, and the
confusion matrix from which they all follow.

Used for validation during training (where each process evaluates its shard and the sums are
added up) and by `vistra eval` on a checkpoint alone: the checkpoint carries the model, its
class names and its preprocessing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vistra.data import ImageFolderDataset, scan_image_folder
from vistra.output import printable
from vistra.runtime import load_classifier, mean_logits
from vistra.weights import read_metadata


@dataclass
class EvalTotals:
    """Sums that add up across batches and processes; the metrics derive from them."""

    loss_sum: float
    top5_correct: int
    confusion: torch.Tensor  # [K, K] int64: rows true class, columns predicted class

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return float(self.confusion.diag().sum()) / max(self.count, 1)

    @property
    def top5(self) -> float:
        return self.top5_correct / max(self.count, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    def as_tensor(self) -> torch.Tensor:
        head = torch.tensor([self.loss_sum, self.top5_correct], dtype=torch.float64)
        return torch.cat([head, self.confusion.flatten().double()])

    @classmethod
    def from_tensor(cls, values: torch.Tensor, num_classes: int) -> EvalTotals:
        confusion = values[2:].round().long().reshape(num_classes, num_classes)
        return cls(float(values[0]), int(values[1]), confusion)


def predict_log_probs(model: nn.Module, images: torch.Tensor, flip: bool = False,
                      amp: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities [B, K]; with `flip`, of the mean of the probabilities for the images
    and their mirror images (test-time augmentation for models trained with horizontal
    flips: the two views' errors differ, so their average is wrong less often). `amp`: the
    autocast dtype of the forward (bf16 or fp16), None for none."""
    views = (images, images.flip(-1)) if flip else (images,)
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        logits = [mean_logits(model(view)).float() for view in views]
    log_probs = torch.stack([F.log_softmax(x, dim=1) for x in logits])
    return torch.logsumexp(log_probs, 0) - math.log(len(views))


@torch.no_grad()
def run_evaluation(model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                   loader: DataLoader, num_classes: int, device: torch.device,
                   amp: torch.dtype | None = None, flip: bool = False) -> EvalTotals:
    """Cross-entropy, top-5 hits and the confusion matrix of `model` over `loader` (with
    `flip`, of the mean prediction for each image and its mirror image; `amp`, under that
    autocast dtype). The sums stay where the logits are until the end: one wait for a GPU
    per evaluation, not per batch."""
    if isinstance(model, nn.Module):
        model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(2 + num_classes ** 2, dtype=torch.float64)  # as EvalTotals.as_tensor
    for images, targets in loader:
        log_probs = predict_log_probs(model, images.to(device, non_blocking=True), flip, amp)
        targets = targets.to(log_probs.device, non_blocking=True)  # a Classifier: the CPU
        sums = sums.to(log_probs.device)
        sums[0] += F.nll_loss(log_probs, targets, reduction="sum").double()
        sums[1] += (log_probs.topk(k, dim=1).indices == targets[:, None]).any(1).sum()
        sums[2:] += torch.bincount(targets * num_classes + log_probs.argmax(1),
                                   minlength=num_classes ** 2)
    return EvalTotals.from_tensor(sums.cpu(), num_classes)


@dataclass
class EvalReport:
    """What `vistra eval` shows; `to_dict()` is its --json output."""

    classes: list[str]
    totals: EvalTotals

    def per_class(self) -> list[dict]:
        """Precision and recall per class (None where undefined: nothing predicted/present)."""
        confusion = self.totals.confusion
        hits = confusion.diag().tolist()
        predicted, present = confusion.sum(0).tolist(), confusion.sum(1).tolist()
        return [{"class": printable(name),
                 "precision": hits[i] / predicted[i] if predicted[i] else None,
                 "recall": hits[i] / present[i] if present[i] else None,
                 "support": present[i]}
                for i, name in enumerate(self.classes)]

    def to_dict(self) -> dict:
        return {"top1": self.totals.top1, "top5": self.totals.top5, "loss": self.totals.loss,
                "images": self.totals.count, "classes": [printable(c) for c in self.classes],
                "per_class": self.per_class(), "confusion": self.totals.confusion.tolist()}

    def format(self) -> str:
        """A plain-text report: headline accuracy, per-class table, confusion matrix."""
        t = self.totals
        lines = [f"images: {t.count}   top-1: {100 * t.top1:.2f}%   top-5: {100 * t.top5:.2f}%"
                 f"   loss: {t.loss:.4f}", ""]
        names = [printable(name) for name in self.classes]
        width = max(len("class"), *(len(name) for name in names))
        lines.append(f"{'class':<{width}}  precision  recall  support")
        for row in self.per_class():
            p, r = (("   -" if v is None else f"{100 * v:5.1f}%") for v in
                    (row["precision"], row["recall"]))
            lines.append(f"{row['class']:<{width}}  {p:>9}  {r:>6}  {row['support']:>7}")
        lines += ["", "confusion matrix (rows: true class, columns: predicted, in class order)"]
        cell = max(4, len(str(int(t.confusion.max()))) + 1)
        for name, row in zip(names, t.confusion.tolist(), strict=True):
            lines.append(f"{name:<{width}} " + "".join(f"{v:>{cell}}" for v in row))
        return "\n".join(lines)


def _labelled_samples(data: Path, classes: list[str], holdout: dict | None):
    """The images of `data` to evaluate, labelled with the checkpoint's class indices."""
    if holdout is not None:
        split = scan_image_folder(data, holdout["val_fraction"], holdout["seed"])
        samples = split.val
    else:  # one class is enough to measure how often the model gets it right
        split = scan_image_folder(data, val_fraction=0.0, min_classes=1)
        samples = split.val if split.split_source == "folders" else split.train
    unknown = sorted(set(split.classes) - set(classes))
    if unknown:
        raise ValueError(
            f"{data} has class folders the checkpoint does not know: {', '.join(unknown)}; "
            f"its classes are {', '.join(classes)}. Rename or remove those folders."
        )
    index = {name: i for i, name in enumerate(classes)}
    return [(path, index[split.classes[label]]) for path, label in samples], split.skipped


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, *,
                        holdout: bool = False, flip: bool = False, batch_size: int = 64,
                        workers: int = 0, device: str = "cpu", backend: str = "auto",
                        dtype: str = "fp32", head: str = "mean", amp: str = "off",
                        compile: bool = False, shard: tuple[int, int] = (0, 1)
                        ) -> tuple[EvalReport, list[tuple[Path, str]]]:
    """Evaluate a vistra checkpoint (or an .onnx file from `vistra export`) on an image
    folder; return the report and skipped files.

    `data` is class-per-folder (every image is evaluated) or holds train/ and val/ or test/
    (the val/test part is evaluated). With `holdout`, evaluate exactly the validation images
    that training held out of a class-per-folder `data` (same seed and fraction). Folders are
    matched to the checkpoint's classes by name; a folder may lack some classes. With `flip`,
    each image's prediction is the mean of its own and its mirror image's. `backend`,
    `dtype`, `head` (a distilled model's mean, cls or dist head), `amp` and `compile` as
    for vistra.runtime.load_classifier. `shard` (index, count): evaluate every count-th image
    from index on, for one of count processes whose totals are then summed.
    """
    classifier = load_classifier(checkpoint, device, backend=backend, dtype=dtype, head=head,
                                 amp=amp, compile=compile)
    if not classifier.classes:
        raise ValueError(f"{checkpoint} records no class names; save it with "
                         "save_checkpoint(..., classes=[...]) to evaluate it on a folder")
    split_info = None
    if holdout:
        if classifier.source.suffix.lower() == ".onnx":
            raise ValueError("--holdout needs the .safetensors checkpoint: it records how "
                             "training split the data, the .onnx file does not")
        split_info = (read_metadata(checkpoint) or {}).get("extra", {}).get("split")
        if split_info is None:
            raise ValueError(f"{checkpoint} does not record how training split its data; "
                             "--holdout works with checkpoints written by `vistra train`")
    samples, skipped = _labelled_samples(Path(data), classifier.classes, split_info)
    if not samples:
        raise ValueError(f"{data} holds no images to evaluate")
    index, count = shard
    loader = DataLoader(ImageFolderDataset(samples[index::count], classifier.transform,
                                           channels=classifier.in_chans),
                        batch_size=batch_size, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    totals = run_evaluation(classifier, loader, len(classifier.classes), torch.device(device),
                            flip=flip)
    return EvalReport(list(classifier.classes), totals), skipped
