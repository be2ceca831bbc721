"""The Swin authors' checkpoints (microsoft/Swin-Transformer; timm < 0.9 used the same keys).

Their patch merging sits at the end of stages 0..2 (`layers.i.downsample`), vistra's at the
start of stages 1..3, so the index moves up by one. The `relative_position_index` and
`attn_mask` buffers they saved are left for the loader to drop: vistra recomputes both.
"""

from __future__ import annotations

from .keymap import Tensors, rename


def describe(keys: set[str]) -> str | None:
    """The layout's name if these keys are the authors', else None. Only this layout has a
    patch merging in stage 0."""
    if "layers.0.downsample.reduction.weight" in keys:
        return "Swin authors' (or timm < 0.9) Swin"
    return None


def to_vistra(state: Tensors) -> Tensors:
    return rename(state, [
        (r"layers\.(\d+)\.downsample\.(.+)",
         lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    ])
