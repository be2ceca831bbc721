"""`vistra flops NAME`: parameters and multiply-adds by stage and kind, and the attention cost
of each stage under global and windowed attention (Liu et al. 2021, "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows", Eq. 1 and 2)."""

from __future__ import annotations

import argparse

from vistra.analysis.complexity import KINDS
from vistra.analysis.flops import flops_report
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
    print(render(report))
    return 0


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}" if n else "."


def render(report: dict) -> str:
    h, w = report["img_size"]
    lines = [f"{report['name']} at {h}x{w}: {report['params'] / 1e6:.2f} M parameters, "
             f"{report['macs'] / 1e9:.3f} GMACs per image", "",
             "MACs by stage and kind (millions)"]
    head = f"{'':<8}" + "".join(f"{k:>13}" for k in KINDS) + f"{'total':>13}"
    lines.append(head)
    stages = report["by_stage"]
    for stage, kinds in [*stages.items(), ("total", report["by_kind"])]:
        cells = "".join(f"{_m(kinds.get(k, 0)):>13}" for k in KINDS)
        lines.append(f"{stage:<8}{cells}{_m(sum(kinds.values())):>13}")
    lines += ["", "One attention layer per stage (millions of MACs): the Swin paper's formulas "
              "(Liu et al. 2021, Eq. 1 and 2) against the counter",
              f"{'':<8}{'map':>9}{'C':>6}{'heads':>7}{'M':>4}{'global MSA':>13}"
              f"{'W-MSA':>11}{'measured':>11}{'ratio':>8}"]
    notes = set()
    for s in report["stages"]:
        window = f"{s['window']}{'*' if s['window_is_what_if'] else ''}"
        # Swin's layers are windowed, ViT's global: compare each with its own formula.
        formula = s["analytic_msa"] if s["window_is_what_if"] else s["analytic_wmsa"]
        ratio = s["measured_attention"] / formula
        flag = ""
        if s["padded"]:
            flag, _ = " (padded)", notes.add("padded")
        lines.append(f"{s['name']:<8}{s['map'][0]:>4}x{s['map'][1]:<4}{s['dim']:>6}"
                     f"{s['heads']:>7}{window:>4}{_m(s['analytic_msa']):>13}"
                     f"{_m(s['analytic_wmsa']):>11}{_m(s['measured_attention']):>11}"
                     f"{ratio:>8.3f}{flag}")
        if s["window_is_what_if"]:
            notes.add("vit")
    lines += ["", "ratio: measured over the formula of the attention the model really uses "
              "(W-MSA for Swin, MSA for ViT).",
              f"Counted: {report['counted']}.", f"Not counted: {report['not_counted']}."]
    if "vit" in notes:
        lines.append("ViT attends globally: its measured layer is the MSA formula with hw "
                     "counting the class token too; * the W-MSA column is a what-if with "
                     "Swin's 7x7 windows.")
    if "padded" in notes:
        lines.append("(padded): the map is padded to whole windows before attention, so the "
                     "layer really costs more than the formula for the unpadded map.")
    if "plot" in report:
        lines.append(f"Plot written to {report['plot']}")
    return "\n".join(lines)
