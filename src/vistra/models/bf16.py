"""bf16 inference on CPUs with bf16 arithmetic: the model cast to bf16 once, instead of
autocast's per-call casts.

Autocast keeps the weights in fp32 and casts every one on every call, runs LayerNorm and the
residual adds in fp32 (so activations go back and forth between the two types), and leaves
vistra's fused linear aside. A model cast once runs every layer in bf16: the fused linear (and
linear+GELU) with weights packed in oneDNN's layout, attention as explicit products, which
oneDNN runs faster than the flash kernel in bf16 (vistra.models.layers). PyTorch's CPU
LayerNorm and softmax accumulate bf16 inputs in fp32, so only storage is bf16 between layers;
benchmarks/bf16.md measures the accuracy this keeps on the Fashion-MNIST recipe checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import PackedGemm


def to_bf16_inference(model: nn.Module) -> nn.Module:
    """`model` itself, in eval mode, without gradients, with bf16 weights; its vistra Linear
    and patch-embedding layers keep a packed copy of their weights from their first call (see
    PackedGemm). Feed it bf16 images; its logits are bf16."""
    model.eval().requires_grad_(False)
    with torch.inference_mode(False):  # ordinary tensors, whose versions PackedGemm watches
        model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, PackedGemm):
            module.packing = True
    return model
