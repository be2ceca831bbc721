"""`vistra predict CHECKPOINT PATH...`: top-k classes of images, as text, JSON or CSV."""

from __future__ import annotations

import argparse
import sys

from vistra.predict import FORMATS, annotate_all, find_images, format_predictions, predict_images
from vistra.weights import load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a checkpoint",
        description="Top-k classes with probabilities for images and folders of images. "
                    "Unreadable files are reported and skipped; the exit status is 1 if any "
                    "input failed.")
    p.add_argument("checkpoint", help="a .safetensors written by `vistra train`")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default), json or csv, on standard output")
    p.add_argument("--annotate", metavar="OUTDIR",
                   help="also write PNG copies of the images with the top class drawn on them, "
                        "named NAME.vistra.png (photo.jpg -> OUTDIR/photo.vistra.png), so an "
                        "input is never overwritten; if any of these names already exists in "
                        "OUTDIR, nothing is written and the error names it")
    p.add_argument("--tta-flip", action="store_true",
                   help="average each image's probabilities with its mirror image's (for "
                        "models trained with horizontal flips; twice the compute)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk must be 1 or more, got {args.topk}")
    model = load_checkpoint(args.checkpoint, device=args.device)
    images, failed = find_images(args.paths)
    predictions, unreadable = predict_images(model, images, topk=args.topk,
                                             batch_size=args.batch_size, flip=args.tta_flip)
    failed += unreadable
    output = format_predictions(predictions, args.format)
    if output:  # with no predictions: `[]` in JSON, the header in CSV, nothing in text
        print(output)
    if args.annotate and predictions:
        annotate_all(predictions, args.annotate)
        print(f"annotated images written to {args.annotate}", file=sys.stderr)
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0
