"""`vistra data fashion-mnist OUTDIR`: real datasets written as image folders, so every
other command (train, eval, predict) reads them exactly like a user's own photos."""

from __future__ import annotations

import argparse

from vistra.data import DEFAULT_SOURCE, export_fashion_mnist


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="export a real dataset as an image folder",
                       description="Export a real dataset as OUTDIR/train/<class>/*.png and "
                                   "OUTDIR/test/<class>/*.png for `vistra train` / `eval`.")
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    fm = datasets.add_parser(
        "fashion-mnist", help="Fashion-MNIST: 60,000 train / 10,000 test 28x28 images",
        description="Export Fashion-MNIST (Zalando Research, MIT licence) from its four IDX "
                    "files, e.g. those of Debian's dataset-fashion-mnist package. Each PNG is "
                    "named after its index in the official file.")
    fm.add_argument("outdir", help="folder to create; its train/ and test/ must be empty")
    fm.add_argument("--source", default=str(DEFAULT_SOURCE),
                    help="folder holding the IDX files, gzipped or not (default: %(default)s)")
    fm.add_argument("--per-class-train", type=int, default=None, metavar="N",
                    help="keep a seeded random N training images per class (default: all 6000)")
    fm.add_argument("--per-class-test", type=int, default=None, metavar="N",
                    help="keep a seeded random N test images per class (default: all 1000)")
    fm.add_argument("--seed", type=int, default=0, help="seed of the per-class subsets")
    fm.set_defaults(func=run_fashion_mnist)


def run_fashion_mnist(args: argparse.Namespace) -> int:
    try:
        counts = export_fashion_mnist(args.outdir, args.source, args.per_class_train,
                                      args.per_class_test, args.seed)
    except FileExistsError as err:  # an OSError the CLI would otherwise show as a traceback
        raise ValueError(str(err)) from err
    for part, per_class in counts.items():
        print(f"{args.outdir}/{part}: {sum(per_class.values())} images in "
              f"{len(per_class)} classes")
    return 0
