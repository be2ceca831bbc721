"""`vistra convert SRC DST --model NAME`: third-party weights -> a vistra checkpoint."""

from __future__ import annotations

import argparse

from vistra.weights import convert_checkpoint
from vistra.weights.labels import read_class_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert timm / torchvision / HuggingFace / Google / Swin weights",
        description="Load weights from timm (.pth, .bin, .safetensors), the Swin authors, "
                    "Google's ViT .npz, torchvision or HuggingFace into a vistra model and save "
                    "them as a vistra .safetensors checkpoint that carries the model's config "
                    "and class names, so it loads later with no other file. Nothing in SRC is "
                    "ever executed, and nothing is downloaded.")
    p.add_argument("src", help="weights file, a HuggingFace model directory, or a name in the "
                               "local HuggingFace cache: hf-hub:ORG/NAME, ORG/NAME (e.g. "
                               "google/vit-base-patch16-224), or a timm-tagged model name such "
                               "as vit_base_patch16_224.augreg2_in21k_ft_in1k")
    p.add_argument("dst", help="output checkpoint, ending in .safetensors; an existing file is "
                               "replaced only with --force, and never one of SRC's own files")
    p.add_argument("--model", default=None,
                   help="registered model name the weights are for (see `vistra models`); "
                        "default: the one a timm config.json names, or that the weights' "
                        "shapes match")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the output head (default: as many as the file's head; "
                        "another number gives a freshly initialised head)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size in pixels (default: the model's; another size resamples "
                        "the position embeddings)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="class names of the head's outputs: one per line, or a JSON list "
                        "(default: the source's id2label / label_names, ImageNet-1k's for a "
                        "1000-class head)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it exists (atomically: an interruption leaves the old "
                        "file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    classes = read_class_names(args.classes) if args.classes else None
    report = convert_checkpoint(args.src, args.dst, args.model, num_classes=args.num_classes,
                                img_size=args.img_size, classes=classes, overwrite=args.force)
    print(report)
    print(f"wrote {args.dst}")
    return 0
