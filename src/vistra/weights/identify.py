"""Which registered model a state dict (in vistra's layout) most likely belongs to, read from
its tensor shapes: what a mismatch error tells the user to pick instead."""

from __future__ import annotations

import math
import re
from dataclasses import fields

from vistra.models import get_family, get_spec, list_models

from .keymap import Tensors


def _count(state: Tensors, pattern: str) -> int:
    """1 + the largest index captured by `pattern` among the keys (0 if none)."""
    found = [int(m[1]) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _vit_facts(state: Tensors) -> dict:
    dim = state["cls_token"].shape[-1]
    facts: dict = {"family": "vit", "embed_dim": dim, "depth": _count(state, r"blocks\.(\d+)\."),
                   "distilled": "dist_token" in state}
    if "patch_embed.backbone.stem.conv.weight" in state:  # the R50 hybrid
        stages = _count(state, r"patch_embed\.backbone\.stages\.(\d+)\.")
        facts["hybrid_depths"] = tuple(
            _count(state, rf"patch_embed\.backbone\.stages\.{i}\.blocks\.(\d+)\.")
            for i in range(stages))
        reduction = 4 * 2 ** (stages - 1)
    else:
        facts["hybrid_depths"] = None
        facts["patch_size"] = reduction = state["patch_embed.proj.weight"].shape[-1]
    if "pos_embed" in state:
        side = math.isqrt(state["pos_embed"].shape[1] - 1 - facts["distilled"])
        facts["img_size"] = (side * reduction, side * reduction)
    if "pre_logits.fc.weight" in state:
        facts["representation_size"] = state["pre_logits.fc.weight"].shape[0]
    if "head.weight" in state:
        facts["num_classes"] = state["head.weight"].shape[0]
    return facts


def _swin_facts(state: Tensors) -> dict:
    stages = _count(state, r"layers\.(\d+)\.")
    tables = [state.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
              for i in range(stages)]
    facts: dict = {
        "family": "swin",
        "embed_dim": state["patch_embed.proj.weight"].shape[0],
        "depths": tuple(_count(state, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)),
        "num_heads": tuple(t.shape[1] if t is not None else 0 for t in tables),
    }
    if tables and tables[0] is not None:
        facts["window_size"] = (math.isqrt(tables[0].shape[0]) + 1) // 2
    if "head.weight" in state:
        facts["num_classes"] = state["head.weight"].shape[0]
    return facts


def architecture_facts(state: Tensors) -> dict | None:
    """embed_dim, depth(s), patch or window size... as far as the shapes tell, or None when
    the keys are not a ViT's or a Swin's."""
    try:
        if "cls_token" in state:
            return _vit_facts(state)
        if "patch_embed.norm.weight" in state:
            return _swin_facts(state)
    except (KeyError, IndexError, ValueError):  # keys or shapes of something else
        pass
    return None


# Facts that describe the network itself; the others (image size, classes) only rank names.
_STRUCTURE = ("depth", "depths", "num_heads", "patch_size", "hybrid_depths", "distilled")


def likely_models(facts: dict) -> tuple[list[str], list[str]]:
    """Registered names of the same family and width as `facts`, best first (ties: all of
    them), and the structural facts in which they differ (empty for an exact match)."""
    scored = []
    for name in list_models():
        spec = get_spec(name)
        if spec.family != facts["family"] or spec.arch.embed_dim != facts["embed_dim"]:
            continue
        arch = {f.name: getattr(spec.arch, f.name) for f in fields(spec.arch)}
        arch["img_size"] = spec.data.img_size
        shared = [k for k in facts if k in arch]
        differ = [k for k in shared if k in _STRUCTURE and arch[k] != facts[k]]
        scored.append(((-len(differ), sum(arch[k] == facts[k] for k in shared)), name, differ))
    if not scored:
        return [], []
    best, _, differ = max(scored)
    return [name for score, name, _ in scored if score == best], differ


def describe_facts(facts: dict) -> str:
    """'a ViT with embed_dim 384, depth 12, ...' for an error message."""
    parts = []
    for key, value in facts.items():
        if key == "family" or value in (None, False):
            continue
        if isinstance(value, tuple):
            value = ("x" if key == "img_size" else "-").join(map(str, value))
        parts.append(f"{key} {value}")
    return f"a {get_family(facts['family']).label} with " + ", ".join(parts)
