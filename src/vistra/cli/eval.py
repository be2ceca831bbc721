"""`vistra eval CHECKPOINT --data DIR`: accuracy, per-class precision/recall, confusion."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vistra.analysis.plots import plot_confusion_matrix
from vistra.cli.inference import add_runtime_options, report_precision, runtime_device
from vistra.evaluate import EvalReport, EvalTotals, evaluate_checkpoint
from vistra.output import to_json
from vistra.runtime import resolve_backend, resolve_precision
from vistra.train.distributed import all_reduce_sum, init_distributed, process_group


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on an image folder",
        description="Evaluate a vistra checkpoint on labelled images: top-1, top-5, per-class "
                    "precision and recall, and the confusion matrix (printed and as a PNG).")
    p.add_argument("checkpoint",
                   help="a .safetensors written by `vistra train`, or an .onnx file written "
                        "by `vistra export`")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="class-per-folder images (all are evaluated), or a folder with train/ "
                        "and val/ or test/ (the val/test part is evaluated)")
    p.add_argument("--holdout", action="store_true",
                   help="evaluate only the validation images training held out of a "
                        "class-per-folder DIR (same seed and fraction as the run)")
    p.add_argument("--tta-flip", action="store_true",
                   help="average each image's prediction with its mirror image's (for models "
                        "trained with horizontal flips; twice the compute)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (top1, top5, per_class, confusion, ...)")
    p.add_argument("--plot", metavar="PATH",
                   help="confusion matrix PNG (default: confusion_<DIR name>.png beside the "
                        "checkpoint)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2,
                   help="data-loading worker processes (default: 2)")
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctx = init_distributed(runtime_device(args, args.checkpoint))
    with process_group(ctx):
        backend = resolve_backend(args.checkpoint, args.backend)
        dtype, amp = resolve_precision(args.dtype, args.amp, backend, str(ctx.device))
        if ctx.is_main:
            report_precision(dtype, amp, backend, args.dtype, ctx.device)
        report, skipped = evaluate_checkpoint(
            args.checkpoint, args.data, holdout=args.holdout, flip=args.tta_flip,
            batch_size=args.batch_size, workers=args.workers, device=str(ctx.device),
            backend=backend, dtype=dtype, head=args.head, amp=amp, compile=args.compile,
            shard=(ctx.rank, ctx.world_size))
        if ctx.distributed:  # each process evaluated a shard: add up the totals
            summed = all_reduce_sum(report.totals.as_tensor(), ctx)
            report = EvalReport(report.classes,
                                EvalTotals.from_tensor(summed, len(report.classes)))
    if not ctx.is_main:
        return 0
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    data_name = Path(args.data).resolve().name
    plot = Path(args.plot or Path(args.checkpoint).parent / f"confusion_{data_name}.png")
    plot_confusion_matrix(report.totals.confusion.numpy(), report.classes, plot,
                          title=f"{Path(args.checkpoint).name} on {data_name}: "
                                f"top-1 {100 * report.totals.top1:.1f}%")
    if args.json:
        print(to_json(report.to_dict(), indent=2))
        print(f"confusion matrix plot: {plot}", file=sys.stderr)
    else:
        print(report.format())
        print(f"\nconfusion matrix plot: {plot}")
    return 0
