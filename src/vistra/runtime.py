"""A classifier ready to run: the model (or an exported graph), its class names and the
preprocessing it needs, behind one small interface shared by predict, eval and serve.

`load_classifier(path)` picks the backend from the file: a vistra .safetensors runs in
PyTorch eager mode. (An exported .onnx file runs in onnxruntime: added by the export work.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vistra.models import DataConfig

Transform = Callable[[Image.Image], torch.Tensor]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Classifier:
    """What every backend offers: `transform` turns a PIL image into the model's input
    [C, H, W]; calling the classifier on a batch [B, C, H, W] returns logits [B, K]."""

    name: str
    classes: list[str] | None
    data_config: DataConfig
    in_chans: int
    source: Path
    backend: str
    transform: Transform
    run: Callable[[torch.Tensor], torch.Tensor]
    model: torch.nn.Module | None = None  # the PyTorch module, when the backend has one
    _sha256: str | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    @property
    def checkpoint_hash(self) -> str:
        """SHA-256 of the file it was loaded from (computed once, on first use)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.source)
        return self._sha256


def torch_classifier(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """A vistra checkpoint in PyTorch eager mode (distilled DeiT: the mean of its heads)."""
    from vistra.evaluate import eval_transform, mean_logits
    from vistra.weights import load_checkpoint

    model = load_checkpoint(path, device=device).eval()
    dev = torch.device(device)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return mean_logits(model(batch.to(dev))).float().cpu()

    return Classifier(model.name, model.classes, model.data_config, model.arch.in_chans,
                      Path(path), "torch", eval_transform(model), run, model=model)


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """The classifier a file holds, with the backend its format calls for."""
    return torch_classifier(path, device=device)
