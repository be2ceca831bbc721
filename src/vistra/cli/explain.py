"""`vistra explain MODEL IMAGE...`: heat maps of where the model looked, with `--evaluate`
how faithful each method's maps are (deletion / insertion AUC), and with `--choose` the most
faithful method measured and recorded as the model's default."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vistra.explain import METHODS, default_method, default_reason, methods_for
from vistra.explain.choose import STEPS, choose_for_folder
from vistra.explain.files import evaluate_folder, explain_files, load_explainable
from vistra.explain.perturbation import FILLS, RISE_MASKS, Model

CHOOSE_LIMIT = 256  # images --choose scores by default
EVALUATE_LIMIT = 500  # images --evaluate scores by default


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="heat maps of where a model looked, and their faithfulness",
        description="For each image, DIR/<name>.<method>.png (the image with the map over it, "
                    "class and probability in a caption, at the image's own size) and "
                    "DIR/<name>.<method>.npy (the map, floats in [0, 1]). Methods: rollout "
                    "and grad-rollout for ViT / DeiT; gradcam, scorecam (slower: a forward "
                    "pass per channel of the map, the most faithful) and window for Swin; "
                    "lrp for both; for every model gradient, and occlusion and rise (the "
                    "default of ViT and Swin), which only run the model and so also explain "
                    "an .onnx file (occlusion its default). A checkpoint that records the "
                    "method measured most faithful for it (--choose, or the end of vistra "
                    "train) defaults to that one, and so does an .onnx file exported from "
                    "it while that one is occlusion or rise. Existing files are never "
                    "replaced without --force.")
    p.add_argument("checkpoint", metavar="MODEL",
                   help="a vistra .safetensors (trained or converted), or an .onnx file from "
                        "vistra export (occlusion and rise, in onnxruntime)")
    p.add_argument("paths", nargs="*", metavar="IMAGE_OR_FOLDER",
                   help="image files or folders (searched recursively)")
    p.add_argument("--method", nargs="+", metavar="M",
                   help=f"one or more of {', '.join(METHODS)}, or all (those that apply to "
                        "the model); default: the method the checkpoint records (--choose; an "
                        ".onnx file exported from it: if occlusion or rise), else rise for "
                        "ViT and Swin, occlusion for an .onnx file")
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
    p.add_argument("--window", type=int, metavar="PX",
                   help="occlusion: the side of the hidden square in input pixels (default: "
                        "a seventh of the input's shorter side)")
    p.add_argument("--stride", type=int, metavar="PX",
                   help="occlusion: pixels between windows (default: half the window)")
    p.add_argument("--masks", type=int, default=RISE_MASKS, metavar="N",
                   help=f"rise: the number of random masks (default: {RISE_MASKS})")
    p.add_argument("--seed", type=int, default=0,
                   help="rise: the seed the masks are drawn from (default: 0)")
    p.add_argument("--fill", choices=FILLS, default="mean",
                   help="occlusion and rise: what a hidden pixel becomes, the image's mean "
                        "colour or its minimum, for images whose background is their "
                        "minimum (Fashion-MNIST's flat black): the map then says what the "
                        "score loses as parts turn to background; on a noisy or bright "
                        "background the minimum cuts new dark objects (default: mean)")
    g = p.add_argument_group("faithfulness")
    g.add_argument("--evaluate", action="store_true",
                   help="deletion / insertion AUC of each method and of two random orders "
                        "(by pixel, and by the model's patch grid) over the labelled images "
                        "of --data, and the rank correlation with the maps of a "
                        "re-initialised model; a table, and DIR/faithfulness.json with --out")
    g.add_argument("--data", metavar="DIR",
                   help="class-per-folder images, or a folder with train/ and val/ or test/ "
                        "(the val/test part is used)")
    g.add_argument("--limit", type=int, metavar="N",
                   help="at most N images of --data, drawn at random with a fixed seed "
                        f"(default: 500, with --choose {CHOOSE_LIMIT})")
    g.add_argument("--steps", type=int, default=32, metavar="S",
                   help="pixel-removal steps of each curve (default: 32)")
    g.add_argument("--road", action="store_true",
                   help="also the deletion curve with the removed pixels imputed from their "
                        "neighbours (ROAD, Rong et al. 2022) instead of the mean colour, so "
                        "that scattered deletions leave no texture to read; a sparse solve "
                        "per image and step, slow on large images")
    c = p.add_argument_group("choosing the default method")
    c.add_argument("--choose", action="store_true",
                   help="score every method that applies (not window, which shows attention "
                        "weights, not a class's evidence) on the labelled images of --data: "
                        "deletion with the mean colour and with ROAD's imputation, insertion, "
                        f"random pixel order as the baseline, {STEPS} steps; the most faithful "
                        "is the one whose two deletion AUCs, as multiples of random order's, "
                        "have the lowest mean (insertion breaks ties). Prints the table; with "
                        "--save, records the choice")
    c.add_argument("--save", metavar="FILE",
                   help="--choose: write the checkpoint with the choice recorded to FILE (a "
                        "new file, its weights byte for byte MODEL's; MODEL itself is never "
                        "rewritten); vistra explain and vistra serve then default to it")
    c.add_argument("--seconds", type=float, metavar="S",
                   help="--choose: stop scoring after the images that fit in S seconds "
                        "(default: no limit)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.paths and not args.evaluate and not args.choose:
        raise ValueError("give images or folders to explain, or --evaluate or --choose with "
                         "--data DIR")
    if args.paths and not args.out:
        raise ValueError("--out DIR is required: the folder to write the maps to")
    for flag, given in (("--evaluate", args.evaluate), ("--choose", args.choose)):
        if given and not args.data:
            raise ValueError(f"{flag} needs --data DIR, a folder of labelled images")
    if args.road and not args.evaluate:
        raise ValueError("--road is a faithfulness score: add --evaluate --data DIR")
    for flag, value in (("--save", args.save), ("--seconds", args.seconds)):
        if value is not None and not args.choose:
            raise ValueError(f"{flag} belongs to --choose: add --choose --data DIR")
    if args.seconds is not None and args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    if args.limit is None:
        args.limit = CHOOSE_LIMIT if args.choose and not args.evaluate else EVALUATE_LIMIT
    for option in ("topk", "limit", "steps", "masks"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} must be 1 or more, got {getattr(args, option)}")
    if args.target is not None and args.topk > 1:
        raise ValueError("choose --target or --topk, not both")
    for option in ("window", "stride"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option} must be 1 pixel or more, got {getattr(args, option)}")
    model = load_explainable(args.checkpoint, args.device)
    if args.evaluate and not isinstance(model, torch.nn.Module):
        raise ValueError("--evaluate needs the PyTorch model (its sanity check re-initialises "
                         "it): give the .safetensors checkpoint the .onnx file came from")
    if args.choose:
        if not isinstance(model, torch.nn.Module):
            raise ValueError("--choose records the method in a .safetensors checkpoint: give "
                             "the one the .onnx file came from")
        choose_for_folder(model, Path(args.checkpoint), Path(args.data), limit=args.limit,
                          seconds=args.seconds, save=Path(args.save) if args.save else None,
                          force=args.force)
    if not args.method and (args.paths or args.evaluate):
        print(f"method: {default_method(model)}, {default_reason(model)}", file=sys.stderr)
    methods = _methods(model, args.method)
    options = dict(block=args.block, query=_query(args.query), stage=args.stage,
                   window=args.window, stride=args.stride, masks=args.masks, seed=args.seed,
                   fill=args.fill)
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


def _methods(model: Model, asked: list[str] | None) -> list[str]:
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
