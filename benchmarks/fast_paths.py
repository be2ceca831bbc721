"""Each accelerated module of vistra.accel against the plain module it replaces, timed side by
side (interleaved rounds, medians) at Swin-T / ViT-S shapes and batch 16. The accelerated one
is `vistra.optimize(copy.deepcopy(plain))` (training: `accelerate_training` of a copy), so
both hold the same weights. With them, the measurements behind choices in the plain models and
in vistra.accel's kernel choice: SDPA's input rank, explicit attention, the shift mask, patch
merging, fresh memory and in-place residual adds. The figures in benchmarks/README.md come from
this script.

    python benchmarks/fast_paths.py                  # everything, several minutes
    python benchmarks/fast_paths.py --only linear gather
    python benchmarks/fast_paths.py --dtype bf16     # modules cast to bf16, as --dtype bf16 runs
    python benchmarks/fast_paths.py --tiny           # batch 2, one round: checks the script
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vistra
from vistra.accel import accelerate_training, probe
from vistra.accel.inference import ENABLED
from vistra.analysis.benchmark import make_step
from vistra.models.swin import shift_window_mask

SWIN_T, VIT_S = "swin_tiny_patch4_window7_224", "vit_small_patch16_224"
C, HW, M, HEADS = 96, 56, 7, 3  # Swin-T's first stage
N, NW, D = M * M, (HW // M) ** 2, C // HEADS
SHIFT = M // 2


@dataclass(frozen=True)
class Setting:
    batch: int
    dtype: torch.dtype
    rounds: int


def compare(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds of each callable, one call of each per round after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@functools.cache
def plain_model(name: str) -> nn.Module:
    """A randomly initialised model (seed 0) as create_model builds it, in eval mode."""
    torch.manual_seed(0)
    return vistra.create_model(name).eval().requires_grad_(False)


def plain_and_optimized(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A plain copy of `module` cast to `dtype`, and vistra.optimize of another copy."""
    plain = copy.deepcopy(module).eval().requires_grad_(False).to(dtype)
    return plain, vistra.optimize(copy.deepcopy(module), dtype)


def side_by_side(module: nn.Module, s: Setting, label: str, *inputs: torch.Tensor,
                 call: Callable = lambda m, *x: m(*x), rounds: int | None = None
                 ) -> dict[str, float]:
    """`call(module, *inputs)` for the plain module and its optimized copy, in inference."""
    plain, fast = plain_and_optimized(module, s.dtype)
    with torch.inference_mode():
        return compare({f"{label}: plain": lambda: call(plain, *inputs),
                        f"{label}: optimized": lambda: call(fast, *inputs)},
                       rounds or s.rounds)


def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def swin_block(shifted: bool = True) -> nn.Module:
    """A block of Swin-T's first stage: the second one shifts its windows."""
    return plain_model(SWIN_T).layers[0].blocks[int(shifted)]


def linear(s: Setting) -> dict:
    """nn.Linear (addmm: the bias written first, then the GEMM) against FastLinear (oneDNN's
    GEMM with the bias inside; in bf16 from a packed weight), Swin-T's linear shapes at the
    batch. Summed over the shapes."""
    shapes = [(3136, 96, 288), (3136, 96, 384), (3136, 384, 96), (784, 192, 576),
              (196, 384, 1536), (196, 1536, 384), (49, 768, 2304)]  # tokens per image, in, out
    totals: dict[str, float] = {}
    for tokens, fan_in, fan_out in shapes:
        torch.manual_seed(0)
        times = side_by_side(nn.Linear(fan_in, fan_out), s, "sum over shapes",
                             randn(s.batch * tokens, fan_in, dtype=s.dtype))
        for name, ms in times.items():
            totals[name] = totals.get(name, 0.0) + ms
    return totals


def mlp(s: Setting) -> dict:
    """Mlp against FastMlp (fc1 and GELU in one oneDNN call) at Swin-T's stages 1 and 3; and
    the block's second residual, `x + mlp(h)` into a fresh tensor, against FastMlp.residual
    (fc2's GEMM adding x)."""
    results = {}
    for stage, (side, dim) in ((1, (56, 96)), (3, (14, 384))):
        module = plain_model(SWIN_T).layers[stage - 1].blocks[0].mlp
        x, h = (randn(s.batch, side, side, dim, dtype=s.dtype) for _ in range(2))
        results.update(side_by_side(module, s, f"stage {stage} mlp(h)", h))
        results.update(side_by_side(module, s, f"stage {stage} x + mlp(h)", x, h,
                                    call=_residual))
    return results


def _residual(module: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return module.residual(x, h) if hasattr(module, "residual") else x + module(h)


def patch(s: Setting) -> dict:
    """The patch embedding, the convolution (and the copy to the token layout) against
    FastPatchConv (one GEMM over the cut-out patches, tokens written channels-last):
    Swin-T's 4x4 (with its LayerNorm) and ViT-S's 16x16 PatchEmbed modules."""
    image = randn(s.batch, 3, 224, 224, dtype=s.dtype)
    return {**side_by_side(plain_model(SWIN_T).patch_embed, s, "Swin-T 4x4", image),
            **side_by_side(plain_model(VIT_S).patch_embed, s, "ViT-S 16x16", image)}


def attention(s: Setting) -> dict:
    """Attention against FastAttention (the relative-position bias gathered from its table
    once, the kernel chosen for this CPU): Swin-T's first-stage window attention without and
    with the shift mask, and ViT-S's over 197 tokens."""
    windows = randn(s.batch, NW, N, C, dtype=s.dtype)
    mask = shift_window_mask(HW, HW, M, SHIFT).to(s.dtype)
    tokens = randn(s.batch, 197, 384, dtype=s.dtype)
    return {**side_by_side(swin_block(False).attn, s, "Swin-T W-MSA", windows),
            **side_by_side(swin_block(True).attn, s, "Swin-T SW-MSA", windows, mask),
            **side_by_side(plain_model(VIT_S).blocks[0].attn, s, "ViT-S", tokens)}


def gather(s: Setting) -> dict:
    """A shifted Swin-T block's window attention: SwinBlock.shifted_window_attention (roll,
    partition, attend, reverse, roll back) with plain or accelerated attention, against the
    optimized block's `mix` (one gather in and one out, indices and mask kept per size)."""
    block = swin_block(True)
    plain, fast = plain_and_optimized(block, s.dtype)
    rolled = copy.deepcopy(plain)
    vistra.optimize(rolled.attn, s.dtype)
    x = randn(s.batch, HW, HW, C, dtype=s.dtype)
    with torch.inference_mode():
        return compare({"roll + plain attention": lambda: plain.shifted_window_attention(x),
                        "roll + FastAttention": lambda: rolled.shifted_window_attention(x),
                        "gathers + FastAttention (optimized)": lambda: fast.mix(x)}, s.rounds)


def block(s: Setting) -> dict:
    """Whole blocks, SwinBlock / Block against FastSwinBlock / FastBlock with every module
    inside accelerated (residual adds in place or inside fc2's GEMM): Swin-T's shifted
    first-stage block and a ViT-S block."""
    return {**side_by_side(swin_block(True), s, "Swin-T block",
                           randn(s.batch, HW, HW, C, dtype=s.dtype)),
            **side_by_side(plain_model(VIT_S).blocks[0], s, "ViT-S block",
                           randn(s.batch, 197, 384, dtype=s.dtype))}


def models(s: Setting) -> dict:
    """Whole Swin-T and ViT-S/16 inference at the batch and at 1: `create_model(...).eval()`
    against `vistra.optimize` of a copy (what `vistra predict` runs)."""
    results = {}
    for name, short in ((SWIN_T, "Swin-T"), (VIT_S, "ViT-S")):
        for batch in dict.fromkeys((s.batch, 1)):
            image = randn(batch, 3, 224, 224, dtype=s.dtype)
            results.update(side_by_side(plain_model(name), s, f"{short} batch {batch}", image,
                                        rounds=s.rounds if batch > 1 else 5 * s.rounds))
    return results


def training(s: Setting) -> dict:
    """Training steps (forward, backward, fused AdamW; bf16 under autocast) of Swin-T and
    ViT-S/16 at half the batch: the plain model against `accelerate_training` of a copy
    (TrainingAttention: the kernel for this CPU, one-buffer backward of q, k, v)."""
    results = {}
    batch = max(1, s.batch // 2)
    for name, short in ((SWIN_T, "Swin-T"), (VIT_S, "ViT-S")):
        torch.manual_seed(0)
        plain = vistra.create_model(name)
        fast = accelerate_training(copy.deepcopy(plain))
        image = torch.randn(batch, 3, 224, 224)
        dtype = "bf16" if s.dtype == torch.bfloat16 else "fp32"
        results.update(compare({
            f"{short} batch {batch}: plain": make_step(plain, image, "train", dtype),
            f"{short} batch {batch}: accelerate_training": make_step(fast, image, "train",
                                                                     dtype)},
            max(1, s.rounds // 2)))
    return results


def window_qkv(s: Setting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, nW, heads, N, d], strided views of one qkv tensor, as the model makes them."""
    qkv = randn(s.batch, NW, N, 3, HEADS, D, dtype=s.dtype)
    return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)


def sdpa_rank(s: Setting) -> dict:
    """SDPA's CPU flash kernel takes 4-D inputs with a 4-D mask; anything else runs math
    (why vistra.models.layers.attention folds windows into the batch)."""
    q, k, v = window_qkv(s)
    bias = randn(HEADS, N, N, dtype=s.dtype)
    q4, k4, v4 = (t.reshape(-1, HEADS, N, D) for t in (q, k, v))
    with torch.inference_mode():
        return compare({
            "5-D q/k/v (math fallback)": lambda: F.scaled_dot_product_attention(q, k, v, bias),
            "4-D, 3-D bias (math fallback)": lambda: F.scaled_dot_product_attention(
                q4, k4, v4, bias),
            "4-D, 4-D bias (flash)": lambda: F.scaled_dot_product_attention(
                q4, k4, v4, bias[None]),
        }, s.rounds)


def explicit_vs_flash(s: Setting) -> dict:
    """Explicit matmul-softmax-matmul against SDPA's flash kernel, at Swin's 49-token windows
    and ViT-B's 197 tokens (the choice vistra.accel.attention makes per CPU and dtype)."""
    q, k, v = (t.reshape(-1, HEADS, N, D) for t in window_qkv(s))
    bias = randn(1, HEADS, N, N, dtype=s.dtype)
    vq, vk, vv = randn(3, s.batch, 12, 197, 64, dtype=s.dtype).unbind(0)

    def explicit(q, k, v, bias):
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return (logits + bias if bias is not None else logits).softmax(-1) @ v
    with torch.inference_mode():
        return compare({
            "Swin 49 tokens: flash": lambda: F.scaled_dot_product_attention(q, k, v, bias),
            "Swin 49 tokens: explicit": lambda: explicit(q, k, v, bias),
            "ViT-B 197 tokens: flash": lambda: F.scaled_dot_product_attention(vq, vk, vv),
            "ViT-B 197 tokens: explicit": lambda: explicit(vq, vk, vv, None),
        }, s.rounds)


def shift_mask(s: Setting) -> dict:
    """SW-MSA's bias differs per window, so folding windows into the batch copies it per
    image: what that costs against a bias broadcast over the batch (as W-MSA's)."""
    q, k, v = (t.reshape(-1, HEADS, N, D) for t in window_qkv(s))
    per_window = randn(NW, HEADS, N, N, dtype=s.dtype)
    with torch.inference_mode():
        return compare({
            "bias copied per image [B*nW, h, N, N]": lambda: F.scaled_dot_product_attention(
                q, k, v, per_window.expand(s.batch, -1, -1, -1, -1).reshape(-1, HEADS, N, N)),
            "bias broadcast [1, h, N, N]": lambda: F.scaled_dot_product_attention(
                q, k, v, per_window[:1]),
        }, s.rounds)


def merging(s: Setting) -> dict:
    """Patch merging's four sub-grids in the paper's order, concatenated or as one copy (the
    latter is what PatchMerging does)."""
    x = randn(s.batch, HW, HW, C, dtype=s.dtype)
    h = HW // 2
    return compare({
        "cat of 4 strided sub-grids": lambda: torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1),
        "view + permute, one copy": lambda: x.view(s.batch, h, 2, h, 2, C).permute(
            0, 1, 3, 4, 2, 5).reshape(s.batch, h, h, 4 * C),
    }, s.rounds)


def fresh_memory(s: Setting) -> dict:
    """Why in-place residuals pay: writing a fresh tensor (77 MB in fp32 at batch 16) costs
    page faults."""
    src = randn(s.batch * HW * HW, 4 * C, dtype=s.dtype)
    out = torch.empty_like(src)
    return compare({"copy into a fresh tensor": lambda: src.clone(),
                    "copy into an existing one": lambda: out.copy_(src)}, s.rounds)


def residual(s: Setting) -> dict:
    """A residual add at each Swin-T stage's size: `x + branch` into a fresh tensor, or written
    into the branch's own (FastBlock's first residual)."""
    results = {}
    for stage, (side, dim) in enumerate([(56, 96), (28, 192), (14, 384), (7, 768)], 1):
        x, branch = (randn(s.batch, side, side, dim, dtype=s.dtype) for _ in range(2))
        with torch.inference_mode():
            results.update(compare({
                f"stage {stage}: x + branch": functools.partial(torch.add, x, branch),
                f"stage {stage}: in place": functools.partial(branch.add_, x)}, 4 * s.rounds))
    return results


EXPERIMENTS = {"linear": linear, "mlp": mlp, "patch": patch, "attention": attention,
               "gather": gather, "block": block, "models": models, "training": training,
               "sdpa": sdpa_rank, "explicit": explicit_vs_flash, "mask": shift_mask,
               "merging": merging, "memory": fresh_memory, "residual": residual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tiny", action="store_true",
                        help="batch 2 and one round: a check that the script runs")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.rounds = 2, 1
    s = Setting(args.batch, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                args.rounds)
    cpu = probe()
    print(f"{cpu.cpu_model or 'unknown CPU'} (bf16 arithmetic: {'yes' if cpu.bf16 else 'no'}, "
          f"AMX: {'yes' if cpu.amx else 'no'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.dtype}, batch {s.batch}, {s.rounds} rounds, "
          "median ms")
    if not ENABLED:
        print("VISTRA_OPTIMIZE=0: the optimized modules are the plain ones")
    for name in args.only or EXPERIMENTS:
        print(f"\n{name}: {' '.join(EXPERIMENTS[name].__doc__.split())}", flush=True)
        for label, ms in EXPERIMENTS[name](s).items():
            print(f"  {label:<46} {ms:9.2f}", flush=True)


if __name__ == "__main__":
    main()
