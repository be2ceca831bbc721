"""Third-party weights -> a vistra checkpoint that loads later with no other file."""

from __future__ import annotations

import os
from pathlib import Path

from vistra.models import build_model

from .load import LoadReport, apply_pretrained, read_pretrained
from .vistra_file import save_checkpoint


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model_name: str, *,
                       num_classes: int | None = None,
                       img_size: int | tuple[int, int] | None = None,
                       overwrite: bool = False) -> LoadReport:
    """Load `src` into `model_name` and save it as a vistra .safetensors at `dst`, the model's
    config in its metadata. num_classes None keeps the file's class count (0 if it has no
    head); another count gives a fresh head. img_size None keeps the model's default.

    An existing `dst` is replaced only with `overwrite`, and never when it is the source or
    a file of a source directory (a HuggingFace model folder's own weights)."""
    check_output(src, dst, overwrite)
    pretrained = read_pretrained(src)
    if num_classes is None:
        num_classes = pretrained.num_classes
    model = build_model(model_name, num_classes=num_classes, img_size=img_size)
    report = apply_pretrained(model, pretrained)
    save_checkpoint(model, dst, extra={"converted_from": Path(src).name,
                                       "source_layout": report.layout},
                    overwrite=overwrite)
    return report


def check_output(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that would destroy an input or, without `overwrite`, any file."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must end in .safetensors: vistra checkpoints are "
                         f"safetensors files; e.g. {dst.with_suffix('.safetensors')}")
    source, target = src.resolve(), dst.resolve()
    if target == source:
        raise ValueError(f"output {dst} is the input file; choose another output path")
    if src.is_dir() and source in target.parents and dst.exists():
        raise ValueError(f"output {dst} is a file of the source folder {src} (its weights or "
                         "their index); write the converted checkpoint elsewhere")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"output {dst} already exists; pass --force to replace it, or "
                              "choose another output path")
