"""`vistra demo`: the whole job on the bundled Fashion-MNIST sample, offline, in minutes on a
CPU: train with the bundled recipe (vistra/assets/demo.yaml) on the sample's train/ part, the
checkpoint chosen on a validation share held out of it; only then evaluate on the test part,
which played no part in any choice, and predict a few test images. It calls the same
functions as `vistra train`, `vistra eval` and `vistra predict`."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from importlib.resources import as_file, files

from vistra.accel import resolve_device
from vistra.analysis.plots import plot_confusion_matrix
from vistra.cli.inference import add_device_option
from vistra.data import bundled_demo_dir
from vistra.evaluate import evaluate_checkpoint
from vistra.predict import annotate_all, format_predictions, predict_images
from vistra.train import load_config, train
from vistra.weights import load_checkpoint

# Package data, so that the demo runs from any install, not only from a source checkout.
DEMO_RECIPE = files("vistra") / "assets" / "demo.yaml"
EXAMPLES = 5  # test images predicted at the end, one per class


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train, evaluate and predict on the bundled Fashion-MNIST sample",
        description="Train a small ViT on the Fashion-MNIST sample shipped with vistra "
                    "(2,500 training and 500 test images): the best epoch is chosen on a "
                    "validation share of the training images; then evaluate it on the test "
                    "images and predict a few of them. Offline; a few minutes on a CPU.")
    p.add_argument("--output", metavar="DIR",
                   help="run directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="training recipe (default: the bundled vistra/assets/demo.yaml)")
    p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = str(resolve_device(args.device))
    data = bundled_demo_dir()
    output = args.output or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}"
    # train/ alone: its images are split into training and validation (the recipe's
    # val_fraction), so that test/ stays unseen until the end.
    overrides = {"data": str(data / "train"), "output": output, "device": device}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    with as_file(DEMO_RECIPE) as bundled:
        cfg = load_config(args.config or bundled, **overrides)
    result = train(cfg)

    best = result.run_dir / "best.safetensors"
    print(f"\ncheckpoint chosen on {len(result.split.val)} validation images held out of "
          f"{data / 'train'}: epoch {result.best_epoch}, top-1 {100 * result.best_top1:.1f}%")
    print(f"\n== evaluation of {best} on {data / 'test'} ==")
    report, _ = evaluate_checkpoint(best, data / "test", device=device)
    print(report.format())
    plot = result.run_dir / "confusion_test.png"
    plot_confusion_matrix(report.totals.confusion.numpy(), report.classes, plot,
                          title=f"Fashion-MNIST sample, test top-1 {100 * report.totals.top1:.1f}%")

    examples = [sorted((data / "test" / name).iterdir())[0]
                for name in report.classes[:EXAMPLES]]
    predictions, _ = predict_images(load_checkpoint(best, device=device), examples, topk=3)
    print("\n== predictions (true class = folder name) ==")
    print(format_predictions(predictions))
    annotated = result.run_dir / "predictions"
    annotate_all(predictions, annotated)

    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s: test top-1 "
          f"{100 * report.totals.top1:.1f}%, top-5 {100 * report.totals.top5:.1f}% on "
          f"{report.totals.count} images.\nRun directory {result.run_dir}: best.safetensors, "
          f"metrics.jsonl, training_curves.png, {plot.name}, {annotated.name}/.\n"
          f"Next: vistra predict {best} YOUR_IMAGES  |  vistra eval {best} --data DIR")
    return 0
