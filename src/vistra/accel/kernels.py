"""The CPU kernels vistra.accel calls that PyTorch does not expose publicly, and the one test of
when they may run. Nothing outside this package touches private torch APIs.

oneDNN's linear adds the bias (and optionally GELU, or a residual) inside the GEMM, where
nn.Linear's addmm writes the bias into the whole output in a separate pass; in bf16 it also
runs from a weight kept in oneDNN's own blocked layout. Figures: benchmarks/README.md and
benchmarks/bf16.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import sdpa_flop_count

from vistra.models.layers import tracing

fused_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
pack_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
fused_binary = getattr(fused_linear, "binary", None)  # the GEMM plus an elementwise op
FUSED_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if torch.backends.mkldnn.is_available()
    and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def eager_inference(x: torch.Tensor) -> bool:
    """Whether an accelerated module may take its fast path for input `x`: eager CPU
    inference. Not under autocast (the plain path is the one that casts), not when a gradient
    must flow, not while a graph is recorded (export, torch.compile: standard operators
    only)."""
    return (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and x.requires_grad) and not tracing())


def fused_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's fused linear serves x and weight of one dtype it supports."""
    return (fused_linear is not None and eager_inference(x) and x.dtype in FUSED_DTYPES
            and weight.dtype == x.dtype and not weight.requires_grad)


def onednn_gemm(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """a @ b as oneDNN's linear computes it for vistra.optimize's modules (in bf16 from b packed
    in oneDNN's blocked layout, as they pack it), for timing beside torch.mm, which runs MKL's
    GEMM: on some CPUs (AMD EPYC with AVX-512) oneDNN reaches about twice MKL's rate, so a
    peak from torch.mm alone is not the machine's. None where this torch build has no oneDNN
    linear for a's dtype."""
    if fused_linear is None or a.dtype not in FUSED_DTYPES or b.dtype != a.dtype:
        return None
    weight = b.t().contiguous()  # linear's [out, in]
    if a.dtype == torch.bfloat16 and pack_weight is not None:
        weight = pack_weight(weight, a.shape[0])

    def gemm() -> torch.Tensor:
        return fused_linear(a, weight, None, "none", [], "")
    return gemm


def softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of softmax over the last dim, from its output: aten's own kernel."""
    return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # the counter is handed shapes, not tensors


# What torch's FLOP counter does not know: the CPU flash-attention kernel SDPA runs, counted
# as SDPA's two matrix products (vistra.analysis.flops).
COUNTER_EXTRAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}
