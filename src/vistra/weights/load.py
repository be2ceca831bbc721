"""`load_pretrained(model, path)`: any supported weights file into a built model, adapted
where it differs, with one readable report of what was done."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapt import fit_to_model
from .detect import detect_layout
from .keymap import Tensors
from .read import read_weights

logger = logging.getLogger("vistra.weights")


@dataclass
class Pretrained:
    """A weights file read and converted to vistra's key layout, not yet fitted to a model."""

    origin: str
    state: Tensors
    layout: str  # e.g. "timm ViT", "HuggingFace Swin", "Google ViT .npz"
    container: str  # "safetensors", "PyTorch pickle", "NumPy .npz"
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Classes of the file's head, 0 when it has none."""
        head = self.state.get("head.weight")
        return 0 if head is None else head.shape[0]


@dataclass
class LoadReport:
    """What loading did. `changes` alter what the model computes compared with the file
    (fresh heads, resampled embeddings); `notes` do not."""

    origin: str
    model: str
    layout: str
    container: str
    loaded: int
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors into {self.model} from {self.origin} "
                 f"({self.layout}, {self.container})"]
        lines += [f"  {line}" for line in self.notes + self.changes]
        return "\n".join(lines)


def read_pretrained(path: str | os.PathLike) -> Pretrained:
    """Read any supported weights file or HuggingFace directory into vistra's layout."""
    raw = read_weights(path)
    layout, to_vistra = detect_layout(raw, str(path))
    return Pretrained(str(path), to_vistra(raw.tensors), layout, raw.container, raw.notes)


def apply_pretrained(model: nn.Module, pretrained: Pretrained) -> LoadReport:
    """Fit the converted weights to `model` and load them.

    The report is also logged to "vistra.weights": as a warning when the model now differs
    from the file (a fresh head, resampled embeddings), so users see it by default."""
    fitted = fit_to_model(model, pretrained.state, pretrained.origin)
    with torch.no_grad():
        model.load_state_dict(fitted.state)
    report = LoadReport(
        pretrained.origin, getattr(model, "name", type(model).__name__), pretrained.layout,
        pretrained.container, fitted.loaded, fitted.reinitialised, fitted.dropped,
        fitted.changes, pretrained.notes + fitted.notes,
    )
    logger.log(logging.WARNING if report.changes else logging.INFO, "%s", report)
    return report


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load timm, Swin-authors, Google .npz, torchvision, HuggingFace or vistra weights into
    `model`. Never runs code from the file; raises ValueError when the file is unreadable,
    unsafe, or does not fit the model (naming the model it most likely belongs to)."""
    return apply_pretrained(model, read_pretrained(path))
