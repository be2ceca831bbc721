"""`vistra models [PATTERN]`: what can be built, with its size and cost."""

from __future__ import annotations

import argparse

from vistra.analysis.flops import model_summary
from vistra.models import list_models
from vistra.output import to_json
from vistra.weights.hub import default_repo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with params and GMACs",
                       description="List registered models: name, parameters, GMACs at the "
                                   "default input size, default input size, classes, and the "
                                   "HuggingFace repository of its default weights "
                                   "(pretrained=True; looked up in the local cache).")
    p.add_argument("pattern", nargs="?", default="*",
                   help="shell-style filter on the name, e.g. 'swin*' (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; try `vistra models` for all")
    rows = [{**model_summary(n), "pretrained": default_repo(n)} for n in names]
    if args.json:
        print(to_json(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}}  {'params (M)':>10}  {'GMACs':>8}  {'input':>9}  {'classes':>7}"
          f"  default weights")
    for r in rows:
        size = "x".join(str(s) for s in r["img_size"])
        print(f"{r['name']:<{width}}  {r['params'] / 1e6:>10.3f}  {r['macs'] / 1e9:>8.2f}  "
              f"{size:>9}  {r['num_classes']:>7}  {r['pretrained'] or '-'}")
    return 0
