"""`vistra predict CHECKPOINT PATH...`: top-k classes of images, as text, JSON or CSV."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from vistra.cli.inference import add_runtime_options, report_precision, runtime_device
from vistra.data import find_images
from vistra.predict import FORMATS, annotate_all, format_predictions, iter_predictions
from vistra.runtime import load_classifier
from vistra.train.distributed import init_distributed, process_group


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a checkpoint or an exported .onnx file",
        description="Top-k classes with probabilities for images and folders of images. "
                    "Unreadable files are reported and skipped; the exit status is 1 if any "
                    "input failed.")
    p.add_argument("checkpoint",
                   help="a .safetensors written by `vistra train`, or an .onnx file written "
                        "by `vistra export`")
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
    p.add_argument("--workers", type=int, default=2,
                   help="threads decoding images while the model runs (default: 2)")
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk must be 1 or more, got {args.topk}")
    ctx = init_distributed(runtime_device(args, args.checkpoint))
    with process_group(ctx):
        classifier = load_classifier(args.checkpoint, str(ctx.device), backend=args.backend,
                                     dtype=args.dtype, head=args.head, amp=args.amp,
                                     compile=args.compile)
        if ctx.is_main:
            report_precision(classifier.dtype, classifier.amp, classifier.backend, args.dtype,
                             ctx.device)
        images, failed = find_images(args.paths)
        # Every world_size-th image from this rank's index on; merged back by index below.
        mine = range(ctx.rank, len(images), ctx.world_size)
        results = list(zip(mine, iter_predictions(
            classifier, [images[i] for i in mine], topk=args.topk, batch_size=args.batch_size,
            flip=args.tta_flip, workers=args.workers), strict=True))
        if ctx.distributed:
            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, results)
            results = sorted((r for part in gathered for r in part), key=lambda r: r[0])
    predictions = [r for _, r in results if not isinstance(r, tuple)]
    failed += [r for _, r in results if isinstance(r, tuple)]
    if not ctx.is_main:
        return 1 if failed else 0
    output = format_predictions(predictions, args.format)
    if output:  # with no predictions: `[]` in JSON, the header in CSV, nothing in text
        print(output)
    if args.annotate and predictions:
        annotate_all(predictions, args.annotate)
        print(f"annotated images written to {args.annotate}", file=sys.stderr)
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0
