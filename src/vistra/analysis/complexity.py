"""The complexity argument of the Swin paper (Liu et al. 2021, "Swin Transformer: Hierarchical
Vision Transformer using Shifted Windows", Eq. 1 and 2), in code: cost per attention layer,
and the whole model's parameters and multiply-adds worked out from its numbers by its family
(the formulas are in vistra/models/cost.py, beside the models).

    Omega(MSA)   = 4 hw C^2 + 2 (hw)^2 C      (qkv + output projection, QK^T and AV)
    Omega(W-MSA) = 4 hw C^2 + 2 M^2 hw C

Only matrix products count (one multiply-add each); softmax, the bias and mask adds, the
scaling, LayerNorm, GELU and residual adds are left out, as in the paper and in torch's FLOP
counter. `model_cost` gives the same breakdown as `vistra.analysis.flops.measure` does by
running the model (a test holds them equal), without building anything, so listing every
model is instant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vistra.models import get_family
from vistra.models.cost import KINDS, VIT_WHAT_IF_WINDOW, Cost, Stage, msa_macs, wmsa_macs

__all__ = ["KINDS", "VIT_WHAT_IF_WINDOW", "Cost", "Stage", "model_cost", "msa_macs", "stages",
           "unmodelled_fields", "wmsa_macs"]


def stages(arch: Any) -> list[Stage]:
    """The stages of a model built from `arch` (at arch.img_size); [] for a family that
    declares none."""
    family = get_family(arch)
    return family.stages(arch) if family.stages is not None else []


def unmodelled_fields(arch: Any) -> list[str]:
    """Fields set away from their defaults that the analytic count does not follow; for a
    family without an analytic count, every field (so callers count by running)."""
    family = get_family(arch)
    if family.cost is None:
        return [f.name for f in dataclasses.fields(arch)]
    default = type(arch)()
    return [f.name for f in dataclasses.fields(arch)
            if f.name not in family.modelled_fields
            and getattr(arch, f.name) != getattr(default, f.name)]


def model_cost(arch: Any) -> Cost:
    """Parameters and MACs of the model `arch` builds, from its numbers alone."""
    family = get_family(arch)
    if family.cost is None:
        raise ValueError(f"the {family.label} family has no analytic count; count by running "
                         "the model (vistra.analysis.flops.measure)")
    unknown = unmodelled_fields(arch)
    if unknown:
        raise ValueError(f"the analytic count does not model {', '.join(unknown)}; "
                         "count by running the model (vistra.analysis.flops.measure)")
    return family.cost(arch)
