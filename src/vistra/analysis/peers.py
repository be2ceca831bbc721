"""HuggingFace transformers' equivalent of a vistra model, randomly initialised from a config
with the same numbers, for side-by-side benchmarks. transformers is optional: imported only
here, and only when a peer is asked for."""

from __future__ import annotations

import torch
from torch import nn

from vistra.models import families, get_family, get_spec
from vistra.models.layers import to_2tuple


class HFClassifier(nn.Module):
    """Calls the transformers model with pixel_values and returns its logits, so a benchmark
    drives both libraries the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_peer(name: str, img_size: int | tuple[int, int] | None = None) -> HFClassifier:
    """The transformers model with the numbers of vistra's `name`, as its family's `hf_peer`
    builds it (for ViT and Swin: widths, depths, heads, window, MLP ratio, qkv bias, the same
    LayerNorm eps, no dropout and no stochastic depth)."""
    try:
        import transformers
    except ImportError as err:
        raise ValueError("comparing with HuggingFace needs transformers: "
                         "pip install transformers") from err
    arch = get_spec(name).arch
    size = to_2tuple(img_size or arch.img_size)
    if size[0] != size[1]:
        raise ValueError(f"transformers' configs take one square image_size, got {size}")
    make = get_family(arch).hf_peer
    peer = make(transformers, arch, size[0]) if make is not None else None
    if peer is None:
        with_peers = ", ".join(f.label for f in families() if f.hf_peer is not None)
        raise ValueError(f"{name} has no transformers equivalent here (its family builds "
                         f"none for these numbers); the families with one: {with_peers}")
    return HFClassifier(peer)
