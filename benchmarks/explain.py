"""Where the maps point and how faithful they are, judged by an independent toolkit: every
vistra method, Captum's attributions and two random orders, on the Fashion-MNIST recipe
checkpoints. Per method: the location score on the synthetic task of tests/location_task.py
(a model of the checkpoint's architecture trained on it here, through `vistra train`),
Quantus ROAD and pixel-flipping AUC, insertion and mean-colour deletion AUC (vistra's
curves), and seconds per image. Writes explain.md, explain.json and explain.png beside
itself (or in --out).

    python benchmarks/explain.py --vit runs/fashion_mnist_vit/best.safetensors \\
        --swin runs/fashion_mnist_swin/best.safetensors --data data/fashion_mnist/test
    python benchmarks/explain.py --vit V --swin S --data src/vistra/assets/fashion_mnist_mini \\
        --limit 8 --location-epochs 1 --out /tmp/explain-check   # a check of the script itself

pytorch-grad-cam is left out: its package imports ttach and torchvision at import time
(`pytorch_grad_cam/base_cam.py`, `sess.py`, `utils/model_targets.py`), which vistra does not
depend on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vistra.data import load_rgb, scan_image_folder
from vistra.explain import default_method, default_reason, explain, explain_batch, methods_for
from vistra.explain.faithfulness import (
    RANDOM,
    RANDOM_GRID,
    auc,
    curves,
    load_labelled,
    random_grid_maps,
)
from vistra.explain.render import colourise
from vistra.weights import load_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from inference import cpu_description  # noqa: E402
from location_task import (  # noqa: E402
    EPOCHS,
    held_out,
    location_share,
    train_location_model,
    write_location_folder,
)

# Each a function (model, x [B, C, H, W], target [B]) -> maps [B, H, W] on the CPU.
Maps = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
CAPTUM = ("captum-occlusion", "captum-feature-ablation", "captum-integrated-gradients",
          "captum-saliency")
ROAD_PERCENTAGES = list(range(5, 100, 10))  # of the pixels imputed, MoRF order
FLIPPING_STEPS = 28  # pixel flipping: the image's pixels flipped in this many equal steps
PATCH = 4  # Captum's occlusion window and feature-ablation patches, the recipes' token side
MINIMUM = "(fill minimum)"  # the name's suffix of a perturbation method hiding with the minimum


def captum_maps(name: str) -> Maps:
    """Captum's attribution `name` as a map: occlusion by 4x4 windows at stride 2 and
    ablation of 4x4 patches, both to 0 (the data set's mean after normalisation); integrated
    gradients from 0 in 32 steps; the absolute gradient. Summed over channels."""
    def run(model, x, target):
        from captum.attr import FeatureAblation, IntegratedGradients, Occlusion, Saliency

        C, H, W = x.shape[1:]
        if name == "captum-occlusion":
            a = Occlusion(model).attribute(x, target=target, baselines=0.0,
                                           sliding_window_shapes=(C, PATCH, PATCH),
                                           strides=(C, PATCH // 2, PATCH // 2),
                                           perturbations_per_eval=64)
        elif name == "captum-feature-ablation":
            rows = torch.arange(H)[:, None] // PATCH
            cols = torch.arange(W)[None] // PATCH
            mask = (rows * -(-W // PATCH) + cols).expand(1, C, H, W)
            a = FeatureAblation(model).attribute(x, target=target, baselines=0.0,
                                                 feature_mask=mask, perturbations_per_eval=64)
        elif name == "captum-integrated-gradients":
            a = IntegratedGradients(model).attribute(x, target=target, baselines=0.0,
                                                     n_steps=32, internal_batch_size=256)
        else:
            a = Saliency(model).attribute(x, target=target, abs=True)
        return a.detach().sum(1).float().cpu()
    return run


def candidates(model: torch.nn.Module, generator: torch.Generator) -> dict[str, Maps]:
    """vistra's methods for this model, occlusion and RISE also hiding with the image's
    minimum (`--fill minimum`), Captum's, and the random orders (per pixel, and per token
    upsampled as the maps are: the control of a map's grain)."""
    def vistra_method(method: str, fill: str = "mean") -> Maps:
        return lambda m, x, t: explain_batch(m, x, method, t, fill=fill)[0]
    return {**{m: vistra_method(m) for m in methods_for(model)},
            **{f"{m} {MINIMUM}": vistra_method(m, "minimum") for m in ("occlusion", "rise")},
            **{name: captum_maps(name) for name in CAPTUM},
            RANDOM: lambda m, x, t: torch.rand(x.shape[0], *x.shape[-2:], generator=generator),
            RANDOM_GRID: lambda m, x, t: random_grid_maps(m, x, generator)}


def quantus_aucs(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                 maps: torch.Tensor) -> tuple[float, float, float]:
    """Quantus's ROAD (top-1 accuracy as the pixels the map ranks highest are imputed from
    their neighbours, noise 0.01) and pixel flipping (the target's probability as they are
    set to the image's minimum, the background of these images; and, beside it, not
    instead, to the image's mean colour, the fill vistra's perturbation methods use): the
    mean of each curve over its equally spaced steps, the area with the fraction removed on
    [0, 1]. Lower is more faithful."""
    import quantus

    common = dict(x_batch=x.numpy(), y_batch=target.numpy(), a_batch=maps[:, None].numpy(),
                  device="cpu", batch_size=len(x))  # Quantus's ROAD keeps one batch's curve
    road = quantus.ROAD(percentages=ROAD_PERCENTAGES, noise=0.01, disable_warnings=True)
    road_curve = road(model=model, **common)
    to_minimum, to_mean = (
        float(np.asarray(quantus.PixelFlipping(
            features_in_step=x[0, 0].numel() // FLIPPING_STEPS, perturb_baseline=baseline,
            disable_warnings=True)(model=model, **common)).mean())
        for baseline in ("black", "mean"))  # Quantus's "black" is the image's minimum
    return float(np.mean(list(road_curve.values()))), to_minimum, to_mean


def batch1_seconds(run: Maps, model, x: torch.Tensor, target: torch.Tensor,
                   images: int) -> float:
    """Median seconds of one image's map (after a warm-up call)."""
    run(model, x[:1], target[:1])
    times = []
    for i in range(min(images, len(x))):
        began = time.perf_counter()
        run(model, x[i:i + 1], target[i:i + 1])
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def study(path: Path, data: Path, location_model: torch.nn.Module, args) -> dict:
    model = load_checkpoint(path).eval()
    x, labels = load_labelled(model, data, args.limit)
    loc_x, loc_y = held_out(location_model, args.location_images)
    with torch.inference_mode():
        model_accuracy = float((model(x).argmax(1) == labels).float().mean())
        location_accuracy = float((location_model(loc_x).argmax(1) == loc_y).float().mean())
    generator = torch.Generator().manual_seed(0)
    scores = {}
    for name, run in candidates(model, generator).items():
        began = time.perf_counter()
        maps = run(model, x, labels)
        batched = (time.perf_counter() - began) / len(x)
        found = curves(model, x, maps, labels, steps=args.steps, generator=generator)
        road, flipping, flipping_mean = quantus_aucs(model, x, labels, maps)
        scores[name] = {
            "location": location_share(run(location_model, loc_x, loc_y), loc_y),
            "quantus_road": road, "quantus_pixel_flipping": flipping,
            "quantus_pixel_flipping_mean": flipping_mean,
            "insertion": float(auc(found.insertion).mean()),
            "deletion": float(auc(found.deletion).mean()),
            "seconds_per_image_batch1": batch1_seconds(run, model, x, labels,
                                                       args.timing_images),
            "seconds_per_image_batched": batched}
        print(f"{path.name} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                  scores[name].items()), flush=True)
    return {"checkpoint": str(path), "model": model.name, "images": len(x),
            "accuracy": model_accuracy, "default": default_method(model),
            "default_reason": default_reason(model), "location_images": len(loc_x),
            "location_accuracy": location_accuracy, "methods": scores}


def location_models(names: dict[str, str], folder: Path, epochs: int) -> dict[str, torch.nn.Module]:
    """A model of each architecture trained on the location task in folder/<name>; a run
    already there is reused."""
    data = folder / "data"
    if not data.exists():
        write_location_folder(data)
    models = {}
    for name in set(names.values()):
        run = folder / name
        if (run / "best.safetensors").exists():
            models[name] = load_checkpoint(run / "best.safetensors").eval()
        else:
            models[name] = train_location_model(name, data, run, epochs=epochs)
    return models


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


COLUMNS = (("location", "location", "{:.0%}"), ("quantus_road", "Quantus ROAD AUC", "{:.3f}"),
           ("quantus_pixel_flipping", "Quantus pixel-flipping AUC", "{:.3f}"),
           ("quantus_pixel_flipping_mean", "the same, to the mean colour", "{:.3f}"),
           ("insertion", "insertion AUC", "{:.3f}"), ("deletion", "deletion AUC", "{:.3f}"),
           ("seconds_per_image_batch1", "s / image (batch 1)", "{:.4f}"),
           ("seconds_per_image_batched", "s / image (batched)", "{:.4f}"))


def markdown(results: dict[str, dict], command: str, machine: str, steps: int) -> str:
    lines = ["# Explanations: where they point, how faithful, how fast", "",
             "Written by `benchmarks/explain.py`:", "", "```", command, "```", "", machine, "",
             "Location: the share of held-out images of the synthetic task "
             "(tests/location_task.py: 28x28 grey images whose class is the quadrant of a "
             "bright square, with a dimmer square in another quadrant, and a fifth class of "
             "images with the dim square alone) whose map has its "
             "maximum in the bright square's quadrant, on a model of the checkpoint's "
             "architecture trained on that task by this script through `vistra train` "
             "(chance: 25%). Quantus ROAD (Rong et al. 2022): top-1 accuracy as "
             f"{ROAD_PERCENTAGES[0]}-{ROAD_PERCENTAGES[-1]}% of the pixels, those the map "
             "ranks highest, are imputed from their neighbours (noise 0.01); pixel flipping "
             "(Bach et al. 2015): the target's probability as the pixels are set, in that "
             f"order and {FLIPPING_STEPS} steps, to the image's minimum (the background); "
             "beside it, the same to the image's mean colour (Quantus's perturb_baseline "
             "'mean'), the fill of vistra's perturbation methods and deletion curve by "
             f"default; '{MINIMUM}': occlusion and RISE hiding with the image's minimum "
             "instead (`--fill minimum`). "
             "Both are the mean of Quantus's curve over its steps (lower is more faithful). "
             f"Insertion and deletion: vistra's curves in {steps} steps (pixels put back into "
             "a blurred copy, higher is better; replaced by the image's mean colour, lower "
             "is better). Target: the image's label. Random: a random pixel order; "
             "random-grid: a random value per token upsampled as the maps are. Captum: "
             "occlusion by 4x4 windows at stride 2 and ablation of 4x4 patches (both to 0, "
             "the data set's mean), integrated gradients from 0 in 32 steps, the absolute "
             "gradient. pytorch-grad-cam is not measured: its package imports ttach and "
             "torchvision, which vistra does not depend on.", ""]
    for name, r in results.items():
        lines += [f"## {name}: `{r['model']}` ({r['images']} test images, model accuracy "
                  f"{100 * r['accuracy']:.1f}%; location: {r['location_images']} images, "
                  f"model accuracy {100 * r['location_accuracy']:.1f}%)", "",
                  f"Default: **{r['default']}** ({r['default_reason']}).", "",
                  "| method | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for m, s in r["methods"].items():
            shown = f"**{m}** (default)" if m == r["default"] else m
            lines.append(f"| {shown} | " + " | ".join(fmt.format(s[key])
                                                      for key, _, fmt in COLUMNS) + " |")
        lines.append("")
    lines += ["## The goal: the default against the best other map and random order", "",
              *goal_lines(results), ""]
    lines += ["![test images and their maps](explain.png)", "",
              "The figure's captions name the predicted class, which each map explains."]
    return "\n".join(lines)


def goal_lines(results: dict[str, dict]) -> list[str]:
    """Per model and deletion measure: the default's AUC, the best other method's (vistra's
    and Captum's) and random order's, and how much lower the default is than random."""
    lines = []
    for name, r in results.items():
        scores, default = r["methods"], r["default"]
        for key, label in (("quantus_road", "Quantus ROAD"),
                           ("quantus_pixel_flipping", "Quantus pixel flipping"),
                           ("quantus_pixel_flipping_mean",
                            "Quantus pixel flipping to the mean colour (beside)")):
            ours, chance = scores[default][key], scores[RANDOM][key]
            others = {m: s[key] for m, s in scores.items()
                      if m not in (default, RANDOM, RANDOM_GRID)}
            best = min(others, key=others.get)
            captum = min(CAPTUM, key=lambda m: scores[m][key])
            lines.append(
                f"- {name} {default}, {label} AUC {ours:.3f}: "
                f"{100 * (1 - ours / chance):.0f}% below random ({chance:.3f}); "
                f"best other {best} {others[best]:.3f}, best of Captum {captum} "
                f"{scores[captum][key]:.3f}; "
                + ("the most faithful" if ours <= others[best] else "not the most faithful"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", type=Path, required=True, help="a ViT / DeiT checkpoint")
    parser.add_argument("--swin", type=Path, required=True, help="a Swin checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="labelled test images")
    parser.add_argument("--limit", type=int, default=64, help="test images (default: 64)")
    parser.add_argument("--location-images", type=int, default=64,
                        help="held-out images of the location task (default: 64)")
    parser.add_argument("--location-epochs", type=int, default=EPOCHS,
                        help=f"epochs of the location models (default: {EPOCHS}, as the test)")
    parser.add_argument("--location-dir", type=Path, default=None,
                        help="where the location models are trained, and reused from if "
                             "already there (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=16,
                        help="steps of the insertion and deletion curves (default: 16)")
    parser.add_argument("--timing-images", type=int, default=8,
                        help="images timed one at a time (default: 8)")
    parser.add_argument("--figure-images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the results")
    args = parser.parse_args()
    checkpoints = {"ViT": args.vit, "Swin": args.swin}
    loaded = {name: load_checkpoint(p).eval() for name, p in checkpoints.items()}
    names = {name: model.name for name, model in loaded.items()}
    with tempfile.TemporaryDirectory() as scratch:
        trained = location_models(names, args.location_dir or Path(scratch),
                                  args.location_epochs)
    results = {name: study(p, args.data, trained[names[name]], args)
               for name, p in checkpoints.items()}
    split = scan_image_folder(args.data, val_fraction=0.0)
    samples = split.val if split.split_source == "folders" else split.train
    by_class: dict[int, Path] = {}
    for path, label in samples:
        by_class.setdefault(label, path)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(loaded, list(by_class.values())[:args.figure_images], args.out / "explain.png")
    command = " ".join(["python benchmarks/explain.py", *sys.argv[1:]])
    cpu, flags = cpu_description()
    machine = (f"Measured on: {cpu}; flags: {flags}; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads.")
    (args.out / "explain.json").write_text(json.dumps(
        {"command": command, "cpu": cpu, "flags": flags, "torch": torch.__version__,
         "threads": torch.get_num_threads(), "location_epochs": args.location_epochs,
         "results": results}, indent=2))
    (args.out / "explain.md").write_text(markdown(results, command, machine, args.steps))
    print("\n".join(goal_lines(results)))


if __name__ == "__main__":
    main()
