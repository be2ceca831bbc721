"""`vistra export CHECKPOINT --out model.onnx`: an ONNX file that carries its preprocessing
and class names, verified against PyTorch; with --int8 a quantised copy too, dynamic, or
static with activations calibrated on --calibrate's images."""

from __future__ import annotations

import argparse
from pathlib import Path

from vistra.evaluate import evaluate_checkpoint
from vistra.onnx import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_OPSET,
    calibration_images,
    export_checkpoint,
    quantize_int8,
    quantize_int8_static,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX (optionally int8)",
        description="Write an ONNX graph of a vistra checkpoint for onnxruntime and other "
                    "runtimes: standard operators only, dynamic batch, the image sizes the "
                    "graph computes right recorded in its metadata with the class names, "
                    "mean/std, crop and interpolation. The graph's logits are checked against "
                    "PyTorch at the export size and a second size before the file is written.")
    p.add_argument("checkpoint", help="a .safetensors written by `vistra train` or `convert`")
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument("--int8", action="store_true",
                   help="also write PATH with .int8.onnx: int8 weights by onnxruntime, "
                        "activations quantised per batch at run time (dynamic) or, with "
                        "--calibrate, from ranges measured once (static); prints both files' "
                        "sizes")
    p.add_argument("--per-tensor", action="store_true",
                   help="with --int8: one weight scale per tensor instead of per output channel")
    p.add_argument("--calibrate", metavar="DIR",
                   help="with --int8: static quantisation (QDQ), every layer with weights "
                        "integer, activation ranges measured on DIR's images (listed as "
                        "`vistra predict` lists a folder, preprocessed as for evaluation): "
                        "images like those the model will classify")
    p.add_argument("--calibration-images", type=int, metavar="N",
                   help="with --calibrate: calibrate on N images, spread over DIR "
                        f"(default: {DEFAULT_CALIBRATION_IMAGES}, or all when DIR holds fewer)")
    p.add_argument("--data", metavar="DIR",
                   help="an image folder (as for `vistra eval`): print the top-1 of the "
                        "exported file(s) on it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version (default: {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out} should end in .onnx")
    int8_out = out.with_name(f"{out.stem}.int8{out.suffix}")
    if args.calibrate is None and args.calibration_images is not None:
        raise ValueError("--calibration-images needs --calibrate DIR (and --int8)")
    if args.calibrate is not None and not args.int8:
        raise ValueError("--calibrate is for static int8: add --int8, or leave --calibrate out")
    for path in [out] + ([int8_out] if args.int8 else []):
        if path.exists() and not args.force:
            raise ValueError(f"{path} exists; choose another --out or pass --force")
    count = (DEFAULT_CALIBRATION_IMAGES if args.calibration_images is None
             else args.calibration_images)
    # A calibration folder without images fails here, before the export runs.
    calibrating = 0 if args.calibrate is None else len(calibration_images(args.calibrate, count))
    result = export_checkpoint(args.checkpoint, out, opset=args.opset, force=args.force)
    meta = result.metadata
    h, w = meta.data_config.img_size
    if meta.size_multiple == 0:
        why = ("it failed the test at a second size" if result.probe_size
               else "the model family declares no rule for other sizes")
        sizes = f"{h}x{w} only (fixed in the graph: {why})"
    else:
        sizes = (f"heights and widths >= {meta.min_size}, multiples of {meta.size_multiple} "
                 f"(tested at {h}x{w} and {result.probe_size[0]}x{result.probe_size[1]})")
    print(f"wrote {out} ({_mb(out)}): {meta.name}, opset {args.opset}, dynamic batch")
    print(f"  image sizes: {sizes}")
    print(f"  max |onnxruntime - PyTorch| / max |logit|: {result.max_error:.1e}")
    files = [out]
    if args.int8:
        per_channel = not args.per_tensor
        if args.calibrate is None:
            quantize_int8(out, int8_out, per_channel=per_channel, force=args.force)
            how = "dynamic"
        else:
            quantize_int8_static(out, int8_out, args.calibrate, images=count,
                                 per_channel=per_channel, force=args.force)
            how = f"static, calibrated on {calibrating} images of {args.calibrate}"
        ratio = int8_out.stat().st_size / out.stat().st_size
        print(f"wrote {int8_out} ({_mb(int8_out)}, {100 * ratio:.0f}% of fp32): int8, {how}")
        files.append(int8_out)
    if args.data:
        for path in files:
            report, _ = evaluate_checkpoint(path, args.data)
            print(f"  top-1 on {args.data}: {100 * report.totals.top1:.2f}% ({path.name}, "
                  f"{report.totals.count} images)")
    return 0
