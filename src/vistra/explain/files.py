"""Explanations written to files: for each image, its overlays (PNG) and maps (NPY), and
the faithfulness of each method over a labelled folder as a table and JSON. What `vistra
explain` runs; nothing is ever written into an input folder or, without `force`, over an
existing file."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from vistra.data import ImageLoadError, find_images, load_rgb
from vistra.fileio import atomic_write_bytes, atomic_write_text
from vistra.output import to_json
from vistra.runtime import load_classifier
from vistra.weights import load_checkpoint

from . import explain, overlay, preprocess
from .faithfulness import evaluate, load_labelled
from .perturbation import Model, logits_of
from .render import grid


def load_explainable(path: str | os.PathLike, device: str = "cpu") -> Model:
    """What `vistra explain` explains: a .safetensors checkpoint as its plain PyTorch model
    (every method of its family), an .onnx file as a Classifier in onnxruntime (the methods
    that only run it: occlusion, rise)."""
    if Path(path).suffix.lower() == ".onnx":
        return load_classifier(path, device, backend="onnx")
    return load_checkpoint(path, device=device).eval()


def explain_files(model: Model, inputs: list[str], methods: list[str], out: Path, *,
                  target: str | None = None, topk: int = 1, with_grid: bool = False,
                  force: bool = False, **options) -> list[tuple[Path, str]]:
    """Write the overlays and maps of every image under `inputs` to `out`; returns the
    (path, reason) of inputs that could not be read."""
    images, failed = find_images(inputs)
    stems = _stems(images)
    ranks = [""] + [f".top{k}" for k in range(2, topk + 1)]
    planned = [f"{stem}{rank}.{m}.{ext}" for stem in stems for rank in ranks
               for m in methods for ext in ("png", "npy")]
    if with_grid:
        planned += [f"{stem}{rank}.grid.png" for stem in stems for rank in ranks]
    _check_outputs(out, planned, [Path(p) for p in inputs] + images, force)
    out.mkdir(parents=True, exist_ok=True)
    fixed = None if target is None else _class_index(model, target)
    for path, stem in zip(images, stems, strict=True):
        try:
            image = load_rgb(path)
        except ImageLoadError as err:
            failed.append((path, err.reason))
            continue
        classes = [fixed] if fixed is not None else _top_classes(model, image, topk)
        for rank, cls in zip(ranks, classes, strict=False):
            explanations = [explain(model, image, method=m, target=cls, **options)
                            for m in methods]
            for e in explanations:
                name = f"{stem}{rank}.{e.method}"
                atomic_write_bytes(out / f"{name}.png", _png(overlay(image, e)))
                atomic_write_bytes(out / f"{name}.npy", _npy(e.map.numpy()))
            if with_grid:
                atomic_write_bytes(out / f"{stem}{rank}.grid.png", _png(grid(image, explanations)))
            e = explanations[0]
            print(f"{path}: {e.label or e.target} {100 * e.probability:.1f}% -> "
                  f"{out / stem}{rank}.{{{','.join(methods)}}}.png")
    return failed


def evaluate_folder(model: torch.nn.Module, data: Path, methods: list[str], out: Path | None,
                    *, limit: int = 500, steps: int = 32, road: bool = False,
                    force: bool = False, **options) -> dict:
    """Faithfulness of each method over up to `limit` labelled images of `data`: prints the
    table, writes out/faithfulness.json when `out` is given, returns the report as a dict."""
    if out is not None:
        _check_outputs(out, ["faithfulness.json"], [data], force)
    x, labels = load_labelled(model, data, limit)
    print(f"faithfulness of {', '.join(methods)} on {len(labels)} images of {data}",
          file=sys.stderr)
    report = evaluate(model, x, labels, methods, steps=steps, road=road, **options)
    print(report.format())
    result = report.to_dict()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "faithfulness.json", to_json(result, indent=2))
        print(f"written {out / 'faithfulness.json'}", file=sys.stderr)
    return result


def _top_classes(model: Model, image, k: int) -> list[int]:
    x = preprocess(model, image)
    if isinstance(model, torch.nn.Module):
        x = x.to(next(model.parameters()).device)
    logits = logits_of(model, x)[0]
    return logits.topk(min(k, len(logits))).indices.tolist()


def _class_index(model: Model, target: str) -> int:
    classes = getattr(model, "classes", None) or []
    if target in classes:
        return classes.index(target)
    # A Classifier without class names: its count is known once it runs (explain checks)
    count = len(classes) or getattr(model, "num_classes", None)
    if target.lstrip("-").isdigit() and 0 <= int(target) < (count or int(target) + 1):
        return int(target)
    known = f"; classes: {', '.join(classes)}" if classes else ""
    raise ValueError(f"--target {target!r} is neither a class name nor an index in "
                     f"0..{'' if count is None else count - 1}{known}")


def _stems(images: list[Path]) -> list[str]:
    """Output name stems: the file's stem, numbered when two inputs share one."""
    used, stems = set(), []
    for path in images:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def _check_outputs(out: Path, names: list[str], inputs: list[Path], force: bool) -> None:
    """Refuse, before anything is written, to write into an input folder or over an input
    or (without force) over any existing file."""
    resolved = out.resolve()
    for item in inputs:
        item = item.resolve()
        if item.is_dir() and (resolved == item or item in resolved.parents):
            raise ValueError(f"--out {out} lies inside the input folder {item}; choose a "
                             "folder outside it (a later run would take the maps for inputs)")
    sources = {p.resolve() for p in inputs}
    for name in names:
        target = out / name
        if target.resolve() in sources:
            raise ValueError(f"{target} is an input image; choose another --out")
        if target.exists() and not force:
            raise ValueError(f"{target} already exists; use --force to replace it or choose "
                             "another --out")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
