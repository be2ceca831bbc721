"""`vistra demo`: the whole job on the bundled Fashion-MNIST sample, offline, in minutes on a
CPU: train with recipes/demo.yaml, evaluate on the test part, predict a few test images.
It calls the same functions as `vistra train`, `vistra eval` and `vistra predict`."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from vistra.analysis.plots import plot_confusion_matrix
from vistra.data import bundled_demo_dir
from vistra.evaluate import evaluate_checkpoint
from vistra.predict import annotate_all, format_predictions, predict_images
from vistra.train import load_config, train
from vistra.weights import load_checkpoint

# The recipe lives in the source tree (recipes/), next to the other training recipes.
DEMO_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "demo.yaml"
EXAMPLES = 5  # test images predicted at the end, one per class


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train, evaluate and predict on the bundled Fashion-MNIST sample",
        description="Train a small ViT on the Fashion-MNIST sample shipped with vistra "
                    "(2,500 training and 500 test images), evaluate it on the test images "
                    "and predict a few of them. Offline; a few minutes on a CPU.")
    p.add_argument("--output", metavar="DIR",
                   help="run directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--config", metavar="FILE.yaml",
                   help=f"training recipe (default: {DEMO_RECIPE})")
    p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    recipe = Path(args.config) if args.config else DEMO_RECIPE
    if not recipe.is_file():
        raise FileNotFoundError(
            f"demo recipe {recipe} not found; `vistra demo` reads recipes/demo.yaml from a "
            "source checkout (pip install -e . in a clone), or pass --config FILE.yaml")
    data = bundled_demo_dir()
    output = args.output or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}"
    overrides = {"data": str(data), "output": output}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    result = train(load_config(recipe, **overrides))

    best = result.run_dir / "best.safetensors"
    print(f"\n== evaluation of {best} on {data / 'test'} ==")
    report, _ = evaluate_checkpoint(best, data)
    print(report.format())
    plot = result.run_dir / "confusion_test.png"
    plot_confusion_matrix(report.totals.confusion.numpy(), report.classes, plot,
                          title=f"Fashion-MNIST sample, test top-1 {100 * report.totals.top1:.1f}%")

    examples = [sorted((data / "test" / name).iterdir())[0]
                for name in report.classes[:EXAMPLES]]
    predictions, _ = predict_images(load_checkpoint(best), examples, topk=3)
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
