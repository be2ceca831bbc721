"""Third-party weights -> a vistra checkpoint that loads later with no other file."""

from __future__ import annotations

import os
from pathlib import Path

from vistra.models import build_model

from .hub import HF_PREFIX, is_tagged_model_name, split_tag
from .load import LoadReport, apply_pretrained, model_name_for, read_pretrained
from .vistra_file import save_checkpoint


def convert_checkpoint(src: str | os.PathLike | bool, dst: str | os.PathLike,
                       model_name: str | None = None, *, num_classes: int | None = None,
                       img_size: int | tuple[int, int] | None = None,
                       classes: list[str] | None = None, overwrite: bool = False) -> LoadReport:
    """Load `src` (a file, a directory or a HuggingFace name, see `read_pretrained`) into
    `model_name` and save it as a vistra .safetensors at `dst`, the model's config in its
    metadata. model_name None: the model a timm config names or the weights' shapes match;
    a timm-tagged model name as `src` (vit_base_patch16_224.augreg2_in21k_ft_in1k) is the
    model, its weights those the tag names in the local HuggingFace cache.
    num_classes None keeps the file's class count (0 if it has no head); another count gives
    a fresh head. img_size None keeps the model's default. classes: names for the head's
    outputs (default: those of the source, or ImageNet-1k's for a 1000-class head).

    An existing `dst` is replaced only with `overwrite`, and never when it is the source or
    a file of a source directory (a HuggingFace model folder's own weights)."""
    if model_name is None and isinstance(src, str) and is_tagged_model_name(src):
        model_name, src = src, True
    check_output(None if isinstance(src, bool) else src, dst, overwrite)
    pretrained = read_pretrained(src, model_name)
    if num_classes is None:
        num_classes = pretrained.num_classes
    name = split_tag(model_name)[0] if model_name else model_name_for(pretrained)
    model = build_model(name, num_classes=num_classes, img_size=img_size)
    report = apply_pretrained(model, pretrained)
    if classes is not None:
        if len(classes) != model.arch.num_classes:
            raise ValueError(f"{len(classes)} class names given for a head of "
                             f"{model.arch.num_classes} classes; give one name per class")
        model.classes = list(classes)
    origin = pretrained.origin
    save_checkpoint(model, dst, extra={"converted_from": origin if origin.startswith(HF_PREFIX)
                                       else Path(origin).name,
                                       "source_layout": report.layout},
                    overwrite=overwrite)
    return report


def check_output(src: str | os.PathLike | None, dst: str | os.PathLike,
                 overwrite: bool) -> None:
    """Refuse an output that would destroy an input or, without `overwrite`, any file.
    `src` None: the source is a name in the HuggingFace cache, not a path of the user's."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must end in .safetensors: vistra checkpoints are "
                         f"safetensors files; e.g. {dst.with_suffix('.safetensors')}")
    src = Path(src) if src is not None else None
    source, target = (src.resolve() if src else None), dst.resolve()
    if target == source:
        raise ValueError(f"output {dst} is the input file; choose another output path")
    if src is not None and src.is_dir() and source in target.parents and dst.exists():
        raise ValueError(f"output {dst} is a file of the source folder {src} (its weights or "
                         "their index); write the converted checkpoint elsewhere")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"output {dst} already exists; pass --force to replace it, or "
                              "choose another output path")
