"""Multiply-adds counted by running the model (torch's FLOP counter) on the meta device:
no memory, no arithmetic, so even ViT-H is counted in a second."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vistra.models import build_model


def count_macs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-adds of one forward of one image (the FLOP counter counts 2 per MAC)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_summary(name: str, **overrides) -> dict:
    """Name, parameter count, MACs and input size of a registered model at its default size."""
    with torch.device("meta"):
        model = build_model(name, **overrides)
    size = model.data_config.img_size
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, size, model.arch.in_chans),
        "img_size": list(size),
        "num_classes": model.num_classes,
    }
