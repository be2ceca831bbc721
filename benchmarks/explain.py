"""Faithfulness and cost of vistra's explanation methods on the Fashion-MNIST recipe
checkpoints: deletion / insertion AUC (Petsiuk et al. 2018) and ROAD deletion (Rong et al.
2022) of every method and of two random orders, the rank correlation with a re-initialised
model's maps (Adebayo et al. 2018), seconds per image, the CAM methods' layer compared stage
by stage, and a figure of a few test images with their maps. Writes explain.md,
explain.json and explain.png beside itself.

    python benchmarks/explain.py --vit runs/fm_vit/best.safetensors \\
        --swin runs/fm_swin/best.safetensors --data data/fashion_mnist/test
    python benchmarks/explain.py --vit V --swin S --data src/vistra/assets/fashion_mnist_mini \\
        --limit 20 --out /tmp/explain-check      # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vistra.data import load_rgb, scan_image_folder
from vistra.explain import explain, methods_for
from vistra.explain.faithfulness import BASELINES, evaluate, load_labelled
from vistra.explain.render import colourise
from vistra.weights import load_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inference import cpu_description  # noqa: E402

# The maps that depend on the class explained (plain rollout and window attention do not).
CLASS_SPECIFIC = ("grad-rollout", "gradcam", "scorecam")


def seconds_per_image(model, images, method: str, **options) -> float:
    """Median seconds of `explain` on one image (batch 1, a PIL image in, the map out)."""
    explain(model, images[0], method=method, **options)  # warm-up
    times = []
    for image in images:
        start = time.perf_counter()
        explain(model, image, method=method, **options)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def study(path: Path, data: Path, limit: int, steps: int, timing_images: list) -> dict:
    model = load_checkpoint(path).eval()
    x, labels = load_labelled(model, data, limit)
    methods = list(methods_for(model))
    report = evaluate(model, x, labels, methods, steps=steps, road=True)
    result = {"checkpoint": str(path), "model": model.name, **report.to_dict()}
    for m in methods:
        result["methods"][m]["seconds_per_image_batch1"] = seconds_per_image(
            model, timing_images, m)
    cams = [m for m in ("gradcam", "scorecam") if m in methods]
    if cams:  # which layer the CAM methods should read
        result["cam_layers"] = {}
        for stage, layer in enumerate(model.layers):
            for where, options in ((f"`layers[{stage}]` output", {"layer": layer}),
                                   (f"`layers[{stage}].blocks[-1].norm1`",
                                    {"layer": layer.blocks[-1].norm1})):
                r = evaluate(model, x, labels, cams, steps=steps, sanity=False, road=True,
                             **options)
                result["cam_layers"][where] = {m: r.scores[m].to_dict() for m in cams}
    return result


def figure(models: dict[str, torch.nn.Module], paths: list[Path], out: Path) -> None:
    """Rows: test images; columns: the image, then each model's maps as overlays."""
    from matplotlib.figure import Figure

    columns = [(name, m) for name, model in models.items() for m in methods_for(model)]
    fig = Figure(figsize=(1.6 * (len(columns) + 1), 1.75 * len(paths)))
    axes = fig.subplots(len(paths), len(columns) + 1, squeeze=False)
    for row, path in enumerate(paths):
        image = load_rgb(path)
        axes[row][0].imshow(image)
        axes[row][0].set_title(path.parent.name, fontsize=8)
        for col, (name, method) in enumerate(columns, 1):
            e = explain(models[name], image, method=method)
            base = np.asarray(image.convert("RGB"), dtype=np.float32)
            blend = (0.5 * base + 0.5 * colourise(e.map.numpy())).astype(np.uint8)
            axes[row][col].imshow(blend, interpolation="nearest")
            axes[row][col].set_title(f"{name} {method}\n{e.label} {100 * e.probability:.0f}%",
                                     fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(results: dict[str, dict], command: str, machine: str) -> str:
    steps = next(iter(results.values()))["steps"]
    lines = ["# Explanations: how faithful, how fast", "",
             "Written by `benchmarks/explain.py`:", "", "```", command, "```", "",
             machine, "",
             "Deletion: the target class's probability as the pixels the map ranks highest are "
             f"replaced by the image's mean colour in {steps} steps (lower area is better). "
             "Insertion: "
             "from a blurred copy, the pixels put back in the same order (higher is better). "
             "Target: the image's label. Random: the same curves for a random pixel order. "
             "Random-grid: for a random value per patch, upsampled bilinearly as the maps "
             "are, the control of the maps' grain (deleting scattered pixels changes an "
             "image more than deleting as many in a few blobs). "
             "ROAD deletion (Rong et al. 2022): deletion with the removed pixels imputed "
             "from their neighbours (the weighted mean of the eight around each, solved "
             "jointly, plus noise of std 0.01) instead of the mean colour, so neither the "
             "mask's shape nor the texture of scattered pixels tells the model anything. "
             "Rank correlation: Spearman's rho between the maps of the trained model and of "
             "the same architecture re-initialised (near 0: the map depends on what the model "
             "learned, as it should; near 1: it would be an edge detector).", ""]
    for name, r in results.items():
        lines += [f"## {name}: `{r['model']}` ({r['images']} test images, model accuracy "
                  f"{100 * r['accuracy']:.1f}%)", "",
                  "| method | deletion AUC | insertion AUC | ROAD deletion AUC | empty maps | "
                  "rho vs re-initialised | s / image (batch 1) | s / image (batched) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, s in r["methods"].items():
            rho = "" if s["randomised_spearman"] is None else f"{s['randomised_spearman']:+.3f}"
            one = s.get("seconds_per_image_batch1")
            lines.append(f"| {m} | {s['deletion']:.3f} | {s['insertion']:.3f} | "
                         f"{s['road']:.3f} | {100 * s['empty']:.0f}% | {rho} | "
                         f"{'' if one is None else f'{one:.4f}'} | "
                         f"{s['seconds_per_image']:.4f} |")
        if "cam_layers" in r:
            cams = list(next(iter(r["cam_layers"].values())))
            lines += ["", "The CAM methods by the layer they read (a stage's output, or the "
                      "LayerNorm entering its last block); deletion / insertion / ROAD "
                      "deletion AUC, and the share of empty maps (constant: every token "
                      "negative before the ReLU, so the map ranks the pixels at random):", "",
                      "| layer | " + " | ".join(cams) + " |", "|---|" + "---|" * len(cams)]
            for where, by_method in r["cam_layers"].items():
                cells = [f"{s['deletion']:.3f} / {s['insertion']:.3f} / {s['road']:.3f}, "
                         f"{100 * s['empty']:.0f}% empty" for s in by_method.values()]
                lines.append(f"| {where} | " + " | ".join(cells) + " |")
            lines += ["", "Where the ReLU would leave Grad-CAM's map empty, it keeps the "
                      "signed map (its least negative tokens first), so its maps are never "
                      "empty here. By default `gradcam` reads the last stage's "
                      "`blocks[-1].norm1`, `scorecam` the first stage's, chosen on this table "
                      "and on the location task of tests/test_explain.py, where each found "
                      "the object for 92-100% of images over five seeds (docs/explain.md)."]
        lines.append("")
    lines += ["## The goal: class-specific maps against the baselines and plain rollout", "",
              *goal_lines(results), ""]
    lines += ["![test images and their maps](explain.png)", "",
              "The figure's captions name the predicted class, which each map explains."]
    return "\n".join(lines)


def goal_lines(results: dict[str, dict]) -> list[str]:
    """Deletion AUC (mean colour, and ROAD) of each class-specific method against each
    baseline (and ViT's plain rollout): how much lower, in percent of the other's area."""
    lines = []
    for name, r in results.items():
        scores = r["methods"]
        others = [*BASELINES, *(["rollout"] if "rollout" in scores else [])]
        for method in [m for m in scores if m in CLASS_SPECIFIC]:
            for key, label in (("deletion", "deletion"), ("road", "ROAD deletion")):
                ours = scores[method][key]
                parts = []
                for other in others:
                    theirs = scores[other][key]
                    change = 100 * (1 - ours / theirs)
                    parts.append(f"{other} {theirs:.3f} (ours {abs(change):.0f}% "
                                 f"{'lower' if change >= 0 else 'higher'})")
                lines.append(f"- {name} {method}, {label} AUC {ours:.3f}; " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", type=Path, required=True, help="a ViT / DeiT checkpoint")
    parser.add_argument("--swin", type=Path, required=True, help="a Swin checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="labelled test images")
    parser.add_argument("--limit", type=int, default=500, help="test images (default: 500)")
    parser.add_argument("--steps", type=int, default=32, help="steps per curve (default: 32)")
    parser.add_argument("--figure-images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the results")
    args = parser.parse_args()
    models = {"ViT": args.vit, "Swin": args.swin}
    loaded = {name: load_checkpoint(p).eval() for name, p in models.items()}
    split = scan_image_folder(args.data, val_fraction=0.0)
    samples = split.val if split.split_source == "folders" else split.train
    by_class: dict[int, Path] = {}
    for path, label in samples:
        by_class.setdefault(label, path)
    figure_paths = list(by_class.values())[:args.figure_images]
    timing_images = [load_rgb(p) for p, _ in samples[:20]]
    results = {name: study(p, args.data, args.limit, args.steps, timing_images)
               for name, p in models.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    figure(loaded, figure_paths, args.out / "explain.png")
    command = (f"python benchmarks/explain.py --vit {args.vit} --swin {args.swin} "
               f"--data {args.data} --limit {args.limit}")
    (args.out / "explain.json").write_text(json.dumps(results, indent=2))
    cpu, flags = cpu_description()
    machine = (f"Seconds measured on: {cpu}; flags: {flags}; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads.")
    (args.out / "explain.md").write_text(markdown(results, command, machine))
    for name, r in results.items():
        print(name, "deletion AUC", {m: round(s["deletion"], 3) for m, s in r["methods"].items()},
              "ROAD", {m: round(s["road"], 3) for m, s in r["methods"].items()})


if __name__ == "__main__":
    main()
