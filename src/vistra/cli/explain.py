"""`vistra explain CHECKPOINT IMAGE...`: heat maps of where the model looked, and with
`--evaluate` how faithful each method's maps are (deletion / insertion AUC)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

from vistra.data import ImageLoadError, eval_transform, load_rgb
from vistra.explain import METHODS, default_method, explain, methods_for, overlay
from vistra.explain.faithfulness import evaluate, load_labelled
from vistra.explain.render import grid
from vistra.fileio import atomic_write_bytes, atomic_write_text
from vistra.output import to_json
from vistra.predict import find_images
from vistra.weights import load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="heat maps of where a model looked, and their faithfulness",
        description="For each image, DIR/<name>.<method>.png (the image with the map over it, "
                    "class and probability in a caption, at the image's own size) and "
                    "DIR/<name>.<method>.npy (the map, floats in [0, 1]). Methods: rollout "
                    "and grad-rollout (default) for ViT / DeiT; gradcam (default), scorecam "
                    "(slower: a forward pass per channel of the map, the most faithful) and "
                    "window for Swin. Existing files are never replaced without --force.")
    p.add_argument("checkpoint", help="a vistra .safetensors (trained or converted)")
    p.add_argument("paths", nargs="*", metavar="IMAGE_OR_FOLDER",
                   help="image files or folders (searched recursively)")
    p.add_argument("--method", nargs="+", metavar="M",
                   help=f"one or more of {', '.join(METHODS)}, or all (those that apply to "
                        "the model); default: grad-rollout for ViT, gradcam for Swin")
    p.add_argument("--out", metavar="DIR", help="folder for the maps (created if missing)")
    p.add_argument("--target", metavar="CLASS",
                   help="explain this class (name or index) instead of the predicted one")
    p.add_argument("--topk", type=int, default=1, metavar="K",
                   help="explain the K most probable classes; ranks 2.. are written as "
                        "<name>.top<k>.<method>.png (default: 1)")
    p.add_argument("--grid", action="store_true",
                   help="also write <name>.grid.png: the image and every method side by side")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--block", type=int, metavar="N",
                   help="window: which Swin block (0 = the first; default: the first with "
                        "shifted windows)")
    p.add_argument("--query", default="0.5,0.5", metavar="ROW,COL",
                   help="window: the query position as fractions of the model's input "
                        "(default: 0.5,0.5, the centre)")
    p.add_argument("--stage", type=int, metavar="S",
                   help="the Swin stage whose LayerNorm entering its last block gradcam and "
                        "scorecam read (0 = the first, -1 = the last; default: the last "
                        "for gradcam, the first for scorecam)")
    g = p.add_argument_group("faithfulness")
    g.add_argument("--evaluate", action="store_true",
                   help="deletion / insertion AUC of each method and of two random orders "
                        "(by pixel, and by the model's patch grid) over the labelled images "
                        "of --data, and the rank correlation with the maps of a "
                        "re-initialised model; a table, and DIR/faithfulness.json with --out")
    g.add_argument("--data", metavar="DIR",
                   help="class-per-folder images, or a folder with train/ and val/ or test/ "
                        "(the val/test part is used)")
    g.add_argument("--limit", type=int, default=500, metavar="N",
                   help="at most N images of --data, drawn at random with a fixed seed "
                        "(default: 500)")
    g.add_argument("--steps", type=int, default=32, metavar="S",
                   help="pixel-removal steps of each curve (default: 32)")
    g.add_argument("--road", action="store_true",
                   help="also the deletion curve with the removed pixels imputed from their "
                        "neighbours (ROAD, Rong et al. 2022) instead of the mean colour, so "
                        "that scattered deletions leave no texture to read; a sparse solve "
                        "per image and step, slow on large images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.paths and not args.evaluate:
        raise ValueError("give images or folders to explain, or --evaluate --data DIR")
    if args.paths and not args.out:
        raise ValueError("--out DIR is required: the folder to write the maps to")
    if args.evaluate and not args.data:
        raise ValueError("--evaluate needs --data DIR, a folder of labelled images")
    if args.road and not args.evaluate:
        raise ValueError("--road is a faithfulness score: add --evaluate --data DIR")
    for option in ("topk", "limit", "steps"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} must be 1 or more, got {getattr(args, option)}")
    if args.target is not None and args.topk > 1:
        raise ValueError("choose --target or --topk, not both")
    model = load_checkpoint(args.checkpoint, device=args.device).eval()
    methods = _methods(model, args.method)
    options = dict(block=args.block, query=_query(args.query), stage=args.stage)
    failed: list[tuple[Path, str]] = []
    if args.paths:
        failed = explain_files(model, args.paths, methods, Path(args.out), target=args.target,
                               topk=args.topk, with_grid=args.grid, force=args.force, **options)
    if args.evaluate:
        evaluate_folder(model, Path(args.data), methods, args.out and Path(args.out),
                        limit=args.limit, steps=args.steps, road=args.road, force=args.force,
                        **options)
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _methods(model: torch.nn.Module, asked: list[str] | None) -> list[str]:
    available = methods_for(model)
    if not asked:
        return [default_method(model)]
    if "all" in asked:
        return list(available)
    for m in asked:
        if m not in available:
            raise ValueError(f"--method {m} does not apply to {model.name}; use one of "
                             f"{', '.join(available)} or all")
    return list(dict.fromkeys(asked))


def _query(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--query must be ROW,COL fractions such as 0.5,0.5, got {text!r}") from None
    if not (0 <= row <= 1 and 0 <= col <= 1):
        raise ValueError(f"--query fractions must lie in [0, 1], got {text!r}")
    return row, col


def _class_index(model: torch.nn.Module, target: str) -> int:
    classes = getattr(model, "classes", None) or []
    if target in classes:
        return classes.index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < model.num_classes:
        return int(target)
    known = f"; classes: {', '.join(classes)}" if classes else ""
    raise ValueError(f"--target {target!r} is neither a class name nor an index in "
                     f"0..{model.num_classes - 1}{known}")


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


def explain_files(model: torch.nn.Module, inputs: list[str], methods: list[str], out: Path, *,
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


def _top_classes(model: torch.nn.Module, image, k: int) -> list[int]:
    with torch.inference_mode():
        x = eval_transform(model)(image)[None].to(next(model.parameters()).device)
        return model(x)[0].topk(min(k, model.num_classes)).indices.tolist()


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
