"""timm state dicts, whose key layout vistra follows: ViT, DeiT (distilled too) and the R50
hybrid as they are; Swin of timm >= 0.9 (patch merging at the start of a stage, like vistra)
keeps its head under `head.fc`. Swin of timm < 0.9 has the authors' layout: official_swin.py."""

from __future__ import annotations

from .keymap import Tensors, rename


def describe(keys: set[str]) -> str | None:
    """The layout's name if these keys are timm's, else None."""
    if "patch_embed.proj.weight" not in keys:
        return None
    return "timm Swin" if any(k.startswith("layers.") for k in keys) else "timm ViT"


def to_vistra(state: Tensors) -> Tensors:
    return rename(state, [(r"head\.fc\.(weight|bias)", r"head.\1")])
