"""`vistra flops NAME`: parameters and multiply-adds by stage and kind, and the attention cost
of each stage under global and windowed attention (Liu et al. 2021, "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows", Eq. 1 and 2)."""

from __future__ import annotations

import argparse

from vistra.analysis.flops import flops_report, format_flops_report
from vistra.output import to_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops", help="count parameters and MACs by stage and kind; attention cost formulas",
        description="Count a model's parameters and multiply-adds by running it under torch's "
                    "FLOP counter (on the meta device: no memory, no arithmetic), by stage and "
                    "by kind, and compare one attention layer per stage with the Swin paper's "
                    "formulas (Liu et al. 2021, Eq. 1 and 2) "
                    "for global attention (4hwC^2 + 2(hw)^2 C) and windows (4hwC^2 + 2M^2 hwC).")
    p.add_argument("name", help="a registered model name (see `vistra models`)")
    p.add_argument("--img-size", type=int, default=None,
                   help="count at this square input size instead of the model's default")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw attention cost against image size (analytic MACs and "
                        "measured time, global against windowed) into this PNG; timing takes "
                        "about a minute")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = flops_report(args.name, args.img_size)
    if args.plot:
        from vistra.analysis.complexity_plot import plot_attention_scaling

        report["plot"] = str(plot_attention_scaling(args.name, args.plot))
    if args.json:
        print(to_json(report, indent=2))
        return 0
    print(format_flops_report(report))
    return 0
