"""Multiply-adds counted by running the model under torch's FLOP counter.

The counter counts matrix products and convolutions only (2 FLOPs per multiply-add); softmax,
bias and mask adds, scaling, LayerNorm, GELU and residual adds are left out. Attention goes
through `F.scaled_dot_product_attention`: on the meta device it decomposes into two counted
batched matmuls (QK^T and AV); on CPU it runs the flash kernel, which torch's counter does not
know, so `COUNTER_EXTRAS` teaches it the same 2 * N * N * d per head. The model is the plain
one `create_model` builds (no vistra.optimize), so the counter sees standard operators. Counting on
the meta device needs no memory and no arithmetic: even ViT-H is counted in a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vistra.accel.kernels import COUNTER_EXTRAS
from vistra.models import ModelFamily, build_from_arch, build_model, get_family, get_spec
from vistra.models.layers import to_2tuple

from .complexity import KINDS, model_cost, stages, unmodelled_fields


def _count(model: nn.Module, img_size: tuple[int, int], in_chans: int) -> FlopCounterMode:
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=COUNTER_EXTRAS)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter


def count_macs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-adds of one forward of one image."""
    return _count(model, img_size, in_chans).get_total_flops() // 2


@dataclass
class Measured:
    """A run of the FLOP counter: MACs by stage and kind (as `complexity.Cost`), and per stage
    the MACs of its first attention layer (qkv, projection and the two attention matmuls)."""

    params: int
    macs: dict[str, dict[str, int]]
    attention_layer: dict[str, int]

    @property
    def total_macs(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.macs.values())


def _place(path: str, family: ModelFamily) -> tuple[str, str]:
    """(stage, kind) of the module at `path` (relative to the model) that ran an op; the
    family names the stage."""
    parts = path.split(".")
    if parts[0] in ("head", "head_dist", "pre_logits", "norm", ""):
        return "head", "head"
    if parts[0] == "patch_embed":
        return "embed", "patch_embed"
    stage = family.flops_stage(path)
    if "downsample" in parts:
        kind = "merging"
    elif "attn" in parts:
        kind = "qkv_proj" if parts[-1] in ("qkv", "proj") else "attention"
    elif "mlp" in parts:
        kind = "mlp"
    else:
        raise ValueError(f"FLOPs counted in {path!r}, which no kind describes")
    return stage, kind


def measure(model: nn.Module, img_size: tuple[int, int] | None = None) -> Measured:
    """Count the built model's MACs for one image, by stage and kind."""
    img_size = img_size or model.data_config.img_size
    counter = _count(model, img_size, model.arch.in_chans)
    family = get_family(model)
    root = type(model).__name__
    totals = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()
              if name == root or name.startswith(root + ".")}
    macs: dict[str, dict[str, int]] = {}
    attention_layer: dict[str, int] = {}
    for name, total in totals.items():
        path = name[len(root) + 1:]
        children = sum(n for c, n in totals.items() if c.rpartition(".")[0] == name)
        own = total - children  # ops run by this module itself, not by a sub-module
        if path.endswith("blocks.0.attn"):
            attention_layer[_place(path, family)[0]] = total
        if own:
            stage, kind = _place(path, family)
            macs.setdefault(stage, {})
            macs[stage][kind] = macs[stage].get(kind, 0) + own
    params = sum(p.numel() for p in model.parameters())
    return Measured(params, macs, attention_layer)


def params_and_macs(name: str, arch: Any) -> tuple[int, int]:
    """Parameters and MACs per image of model `name` built with `arch`: worked out from its
    numbers (instant), or counted on the meta device when the analytic count does not model
    the architecture."""
    if not unmodelled_fields(arch):
        cost = model_cost(arch)
        return cost.params, cost.total_macs
    with torch.device("meta"):
        model = build_from_arch(name, dataclasses.asdict(arch), get_family(arch).name)
        measured = measure(model)
    return measured.params, measured.total_macs


def model_summary(name: str) -> dict:
    """Name, parameter count, MACs and input size of a registered model at its default size."""
    arch = get_spec(name).arch
    params, macs = params_and_macs(name, arch)
    return {
        "name": name,
        "params": params,
        "macs": macs,
        "img_size": list(to_2tuple(arch.img_size)),
        "num_classes": arch.num_classes,
    }


NOT_COUNTED = ("softmax, the relative-position bias and shift-mask adds, the 1/sqrt(d) scaling, "
               "LayerNorm, GELU and residual adds")


def flops_report(name: str, img_size: int | tuple[int, int] | None = None) -> dict:
    """Everything `vistra flops` prints: parameters and MACs of the built model counted by
    running it, by stage and kind, and per stage one attention layer's cost under the Swin
    paper's formulas (global MSA, W-MSA) next to the counted cost of the same layer."""
    with torch.device("meta"):
        model = build_model(name, img_size=img_size)
    measured = measure(model)
    by_kind = {kind: sum(k.get(kind, 0) for k in measured.macs.values()) for kind in KINDS}
    what_if = not get_family(model).windowed
    rows = []
    for s in stages(model.arch):
        rows.append({
            "name": s.name, "map": [s.h, s.w], "dim": s.dim, "heads": s.heads,
            "depth": s.depth, "window": s.window, "window_is_what_if": what_if,
            "attention_tokens": s.tokens, "padded": not what_if and s.tokens != s.h * s.w,
            "analytic_msa": s.analytic_msa, "analytic_wmsa": s.analytic_wmsa,
            "measured_attention": measured.attention_layer.get(s.name, 0),
        })
    return {
        "name": name,
        "img_size": list(model.data_config.img_size),
        "params": measured.params,
        "macs": measured.total_macs,
        "by_stage": measured.macs,
        "by_kind": by_kind,
        "stages": rows,
        "counted": "matrix products and convolutions, one multiply-add each (torch's FLOP "
                   "counter on the meta device; attention as its QK^T and AV matmuls)",
        "not_counted": NOT_COUNTED,
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}" if n else "."


def format_flops_report(report: dict) -> str:
    """A `flops_report` as plain-text tables: MACs by stage and kind, then one attention
    layer per stage against the Swin paper's formulas, with notes on what the ratio means."""
    h, w = report["img_size"]
    lines = [f"{report['name']} at {h}x{w}: {report['params'] / 1e6:.2f} M parameters, "
             f"{report['macs'] / 1e9:.3f} GMACs per image", "",
             "MACs by stage and kind (millions)"]
    head = f"{'':<8}" + "".join(f"{k:>13}" for k in KINDS) + f"{'total':>13}"
    lines.append(head)
    for stage, kinds in [*report["by_stage"].items(), ("total", report["by_kind"])]:
        cells = "".join(f"{_millions(kinds.get(k, 0)):>13}" for k in KINDS)
        lines.append(f"{stage:<8}{cells}{_millions(sum(kinds.values())):>13}")
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
            flag = " (padded)"
            notes.add("padded")
        lines.append(f"{s['name']:<8}{s['map'][0]:>4}x{s['map'][1]:<4}{s['dim']:>6}"
                     f"{s['heads']:>7}{window:>4}{_millions(s['analytic_msa']):>13}"
                     f"{_millions(s['analytic_wmsa']):>11}"
                     f"{_millions(s['measured_attention']):>11}{ratio:>8.3f}{flag}")
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
