"""`vistra.optimize(model, dtype)`: a model ready for inference on this machine, in the manner
of Intel's `ipex.optimize`: the speed work is applied to a finished model, so the model files
stay the papers' code and everything that reads a model (export, FLOP counting, explain,
training) sees it plain.

What it does on a CPU: eval mode, no gradients, the cast to `dtype` once (bf16 through
autocast casts every weight on every call and runs LayerNorm and the residual adds in fp32),
and the modules swapped for their accelerated versions (vistra.accel.modules): oneDNN's fused
linear, linear+GELU and patch-embedding GEMMs with bf16 weights packed, residual adds in place
or inside fc2's GEMM, Swin's bias tables gathered once and its window layouts kept per size,
and attention by the kernel fastest on this CPU. Elsewhere only the eval mode and the cast.
Figures: benchmarks/README.md, benchmarks/bf16.md.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vistra.models.layers import Attention, Mlp
from vistra.models.swin import SwinBlock
from vistra.models.vit import Block

from .modules import (
    FastAttention,
    FastBlock,
    FastLinear,
    FastMlp,
    FastPatchConv,
    FastSwinBlock,
    is_patch_conv,
)
from .swap import accelerate

# The one switch: VISTRA_OPTIMIZE=0 makes optimize() only set eval mode and cast, so predict,
# eval, serve and benchmark run the plain model.
ENABLED = os.environ.get("VISTRA_OPTIMIZE", "1").strip().lower() not in ("0", "false", "no")


def optimize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """`model` itself, ready for inference: eval mode, no gradients, cast to `dtype` (None
    keeps its own) and, on a CPU, its modules accelerated in place. Feed it inputs of that
    dtype. The model is for inference from then on; forward hooks on sub-modules that a
    fused kernel replaces (fc1, act, fc2, drop_path) are not called: hook the plain model."""
    model.eval().requires_grad_(False)
    if dtype is not None:
        with torch.inference_mode(False):  # ordinary tensors, usable outside inference mode
            model.to(dtype)
    param = next(model.parameters(), None)
    if not ENABLED or param is None or param.device.type != "cpu":
        return model
    for module in model.modules():
        fast = _fast_version(module)
        if fast is not None:
            accelerate(module, fast)
    return model


def _fast_version(module: nn.Module) -> type | None:
    if isinstance(module, SwinBlock):
        return FastSwinBlock
    if isinstance(module, Block):
        return FastBlock
    if isinstance(module, Attention):
        return FastAttention
    if type(module) is Mlp:
        return FastMlp
    if type(module) is nn.Linear:
        return FastLinear
    if isinstance(module, nn.Conv2d) and is_patch_conv(module):
        return FastPatchConv
    return None
