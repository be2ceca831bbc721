"""What a state dict in vistra's layout shows of the config it was saved from, read from its
tensor shapes alone: each family's `weight_facts` (models/family.py). vistra.weights asks
every family in turn when a file does not fit the model it was loaded into, to name the
model it most likely belongs to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

State = Mapping[str, torch.Tensor]

# The facts that describe the network itself; the others (image size, classes, window) only
# rank the registered names.
VIT_STRUCTURE = frozenset({"depth", "patch_size", "hybrid_depths", "distilled"})
SWIN_STRUCTURE = frozenset({"depths", "num_heads"})


def _count(state: State, pattern: str) -> int:
    """1 + the largest index captured by `pattern` among the keys (0 if none)."""
    found = [int(m[1]) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def vit_weight_facts(state: State) -> dict | None:
    """ViT, DeiT and the R50 hybrid: known by their class token."""
    if "cls_token" not in state:
        return None
    dim = state["cls_token"].shape[-1]
    facts: dict = {"embed_dim": dim, "depth": _count(state, r"blocks\.(\d+)\."),
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


def swin_weight_facts(state: State) -> dict | None:
    """Swin: known by the LayerNorm after its patch embedding."""
    if "patch_embed.norm.weight" not in state:
        return None
    stages = _count(state, r"layers\.(\d+)\.")
    tables = [state.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
              for i in range(stages)]
    facts: dict = {
        "embed_dim": state["patch_embed.proj.weight"].shape[0],
        "depths": tuple(_count(state, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)),
        "num_heads": tuple(t.shape[1] if t is not None else 0 for t in tables),
    }
    if tables and tables[0] is not None:
        facts["window_size"] = (math.isqrt(tables[0].shape[0]) + 1) // 2
    if "head.weight" in state:
        facts["num_classes"] = state["head.weight"].shape[0]
    return facts
