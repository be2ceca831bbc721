"""Each CPU optimisation of vistra's models against the plain code it replaced, timed side by
side (interleaved rounds, medians), at Swin-T / ViT-B shapes and batch 16. The numbers in
benchmarks/README.md come from this script.

    python benchmarks/fast_paths.py                 # everything, a few minutes
    python benchmarks/fast_paths.py --only linear gather
    python benchmarks/fast_paths.py --baseline /path/to/old/src/vistra/models
        # also whole models: a copy of the models package from before the optimisations
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import vistra
from vistra.analysis.benchmark import make_step
from vistra.models import fastpath, swin
from vistra.models.swin import window_order, window_partition, window_reverse

B, C, HW, M, HEADS = 16, 96, 56, 7, 3  # Swin-T's first stage at batch 16
N, NW, D = M * M, (HW // M) ** 2, C // HEADS


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


def window_qkv():
    qkv = torch.randn(B, NW, N, 3, HEADS, D)
    return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # [B, nW, heads, N, d] views, as the model


def sdpa_rank(rounds: int) -> dict:
    """SDPA's CPU flash kernel takes 4-D inputs with a 4-D mask; anything else runs math."""
    q, k, v = window_qkv()
    bias = torch.randn(HEADS, N, N)
    q4, k4, v4 = (t.reshape(B * NW, HEADS, N, D) for t in (q, k, v))
    return compare({
        "5-D q/k/v (math fallback)": lambda: F.scaled_dot_product_attention(q, k, v, bias),
        "4-D, 3-D bias (math fallback)": lambda: F.scaled_dot_product_attention(q4, k4, v4, bias),
        "4-D, 4-D bias (flash)": lambda: F.scaled_dot_product_attention(q4, k4, v4, bias[None]),
    }, rounds)


def explicit_vs_flash(rounds: int) -> dict:
    """Is an explicit matmul-softmax-matmul faster for small windows? (No.)"""
    q, k, v = (t.reshape(B * NW, HEADS, N, D) for t in window_qkv())
    bias = torch.randn(1, HEADS, N, N)
    vq, vk, vv = torch.randn(3, B, 12, 197, 64).unbind(0)

    def explicit(q, k, v, bias):
        logits = (q * D**-0.5) @ k.transpose(-2, -1)
        return (logits + bias if bias is not None else logits).softmax(-1) @ v
    return compare({
        "Swin 49 tokens: flash": lambda: F.scaled_dot_product_attention(q, k, v, bias),
        "Swin 49 tokens: explicit": lambda: explicit(q, k, v, bias),
        "ViT-B 197 tokens: flash": lambda: F.scaled_dot_product_attention(vq, vk, vv),
        "ViT-B 197 tokens: explicit": lambda: explicit(vq, vk, vv, None),
    }, rounds)


def shift_mask(rounds: int) -> dict:
    """SW-MSA's bias differs per window, so folding windows into the batch copies it per
    image: what that costs against a bias broadcast over the batch (as W-MSA's)."""
    q, k, v = (t.reshape(B * NW, HEADS, N, D) for t in window_qkv())
    per_window = torch.randn(NW, HEADS, N, N)
    return compare({
        "bias copied per image [B*nW, h, N, N]": lambda: F.scaled_dot_product_attention(
            q, k, v, per_window.expand(B, -1, -1, -1, -1).reshape(B * NW, HEADS, N, N)),
        "bias broadcast [1, h, N, N]": lambda: F.scaled_dot_product_attention(
            q, k, v, per_window[:1]),
    }, rounds)


def gather(rounds: int) -> dict:
    """Cyclic shift + window partition (and back) as torch.roll + permute copies, or as one
    index_select each way."""
    x = torch.randn(B, HW, HW, C)
    s = M // 2
    order, restore = window_order(HW, HW, M, s)
    windows = window_partition(x, M)
    return compare({
        "roll + partition": lambda: window_partition(torch.roll(x, (-s, -s), (1, 2)), M),
        "one gather in": lambda: x.reshape(B, -1, C).index_select(1, order),
        "reverse + roll back": lambda: torch.roll(window_reverse(windows, M, HW, HW), (s, s),
                                                  (1, 2)),
        "one gather out": lambda: windows.reshape(B, -1, C).index_select(1, restore),
    }, rounds)


def merging(rounds: int) -> dict:
    """Patch merging's four sub-grids in the paper's order, concatenated or as one copy."""
    x = torch.randn(B, HW, HW, C)
    h = HW // 2
    return compare({
        "cat of 4 strided sub-grids": lambda: torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1),
        "view + permute, one copy": lambda: x.view(B, h, 2, h, 2, C).permute(
            0, 1, 3, 4, 2, 5).reshape(B, h, h, 4 * C),
    }, rounds)


def _linear_variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tag: str) -> dict:
    fused = torch.ops.mkldnn._linear_pointwise
    return {f"{tag} F.linear": lambda: F.linear(x, w, b),
            f"{tag} fused linear": lambda: fused(x, w, b, "none", [], ""),
            f"{tag} F.linear + GELU": lambda: F.gelu(F.linear(x, w, b)),
            f"{tag} fused linear + GELU": lambda: fused(x, w, b, "gelu", [], "none")}


def linear(rounds: int) -> dict:
    """Swin-T's linear layers at batch 16: addmm (bias written first) against oneDNN's linear
    with the bias, and GELU, inside the GEMM. Summed over the layer shapes."""
    shapes = [(50176, 96, 288), (50176, 96, 384), (50176, 384, 96), (12544, 192, 576),
              (3136, 384, 1536), (3136, 1536, 384), (784, 768, 2304)]
    totals: dict[str, float] = {}
    for dtype, tag in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        for T, K, Nout in shapes:
            x, w = torch.randn(T, K, dtype=dtype), torch.randn(Nout, K, dtype=dtype)
            with torch.inference_mode():
                times = compare(_linear_variants(x, w, torch.randn(Nout, dtype=dtype), tag),
                                rounds)
            for name, ms in times.items():
                totals[name] = totals.get(name, 0.0) + ms
    return totals


def fresh_memory(rounds: int) -> dict:
    """Why in-place residuals pay: writing a fresh 77 MB tensor costs page faults."""
    src = torch.randn(B * HW * HW, 4 * C)
    out = torch.empty_like(src)
    return compare({"copy into a fresh tensor": lambda: src.clone(),
                    "copy into an existing one": lambda: out.copy_(src)}, rounds)


def _swin_infer(batch: int = B):
    torch.manual_seed(0)
    model = vistra.create_model("swin_tiny_patch4_window7_224").eval()
    return model, make_step(model, torch.randn(batch, 3, 224, 224), "infer", "fp32")


def _swap(module, name: str, variants: dict, step) -> dict:
    """Callables that run `step` with module.<name> set to each variant (the caller puts the
    shipped one back)."""
    def with_(value):
        def run():
            setattr(module, name, value)
            step()
        return run
    return {label: with_(value) for label, value in variants.items()}


def residual(rounds: int) -> dict:
    """A residual add at each Swin-T stage's size (batch 16): `x + branch` into a fresh
    tensor, or written into the branch's own (the model's add_residual in inference). Whole
    models are too noisy on a shared machine to resolve the difference."""
    results = {}
    for stage, (side, dim) in enumerate([(56, 96), (28, 192), (14, 384), (7, 768)], 1):
        x, branch = torch.randn(B, side, side, dim), torch.randn(B, side, side, dim)
        with torch.inference_mode():
            results.update(compare({f"stage {stage}: x + branch": partial(torch.add, x, branch),
                                    f"stage {stage}: in place": partial(branch.add_, x)},
                                   4 * rounds))
    return results


def bias_cache(rounds: int) -> dict:
    """Whole Swin-T inference at batch 16 and 1: the relative-position bias cached while the
    table holds the same values, or gathered from the table in every forward."""
    shipped = swin.WindowAttention._bias
    gathered = lambda self, dtype: self.relative_position_bias().to(dtype)  # noqa: E731
    results = {}
    try:
        for batch in (B, 1):
            _, step = _swin_infer(batch)
            variants = {f"batch {batch}: cached (shipped)": shipped,
                        f"batch {batch}: gathered every forward": gathered}
            results.update(compare(_swap(swin.WindowAttention, "_bias", variants, step),
                                   rounds if batch == B else 5 * rounds))
    finally:
        swin.WindowAttention._bias = shipped
    return results


def switch(rounds: int) -> dict:
    """Whole Swin-T and ViT-S/16 inference at batch 16 and 1: every fast path on, or all off
    (vistra.models.fastpath, the plain path that export and analysis see)."""
    shipped = fastpath.enabled()
    results = {}
    try:
        for name, short in (("swin_tiny_patch4_window7_224", "Swin-T"),
                            ("vit_small_patch16_224", "ViT-S")):
            torch.manual_seed(0)
            model = vistra.create_model(name)
            for batch in (B, 1):
                step = make_step(model, torch.randn(batch, 3, 224, 224), "infer", "fp32")
                variants = {f"{short} batch {batch}: fast paths on": True,
                            f"{short} batch {batch}: off": False}
                results.update(compare(_swap(fastpath, "_enabled", variants, step),
                                       rounds if batch == B else 5 * rounds))
    finally:
        fastpath.set_enabled(shipped)
    return results


def training_attention(rounds: int) -> dict:
    """Swin-T training step (batch 8): explicit attention when the bias needs a gradient,
    against SDPA with windows folded into the batch (math fallback, bias copied per image)."""
    from vistra.models import layers

    torch.manual_seed(0)
    model = vistra.create_model("swin_tiny_patch4_window7_224")
    step = make_step(model, torch.randn(8, 3, 224, 224), "train", "fp32")
    shipped = swin.attention

    def folded(q, k, v, *, bias=None, scale, dropout_p=0.0, need_weights=False):
        return layers._fused_attention(q, k, v, bias, scale, dropout_p), None
    try:
        return compare(_swap(swin, "attention", {"explicit (shipped)": shipped,
                                                 "SDPA, windows folded": folded}, step),
                       max(1, rounds // 2))
    finally:
        swin.attention = shipped


def baseline_models(path: Path):
    """Import a copy of the models package (e.g. from git history) as `baseline_models`."""
    spec = importlib.util.spec_from_file_location(
        "baseline_models", path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_models"] = module
    spec.loader.exec_module(module)
    return module


def whole_models(rounds: int, baseline: Path) -> dict:
    """Inference at batch 16, fp32: the models package before the optimisations and now."""
    old = baseline_models(baseline)
    results = {}
    for name in ("swin_tiny_patch4_window7_224", "vit_small_patch16_224"):
        torch.manual_seed(0)
        new = vistra.create_model(name).eval()
        before = old.build_model(name).eval()
        before.load_state_dict(new.state_dict())
        x = torch.randn(B, 3, 224, 224)
        times = compare({f"{name} before": make_step(before, x, "infer", "fp32"),
                         f"{name} now": make_step(new, x, "infer", "fp32")}, rounds)
        results.update(times)
    return results


EXPERIMENTS = {"sdpa": sdpa_rank, "explicit": explicit_vs_flash, "mask": shift_mask,
               "gather": gather, "merging": merging, "linear": linear, "memory": fresh_memory,
               "residual": residual, "bias": bias_cache, "switch": switch,
               "training": training_attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="directory of the models package before the optimisations")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, median ms")
    for name in args.only or EXPERIMENTS:
        print(f"\n{name}: {' '.join(EXPERIMENTS[name].__doc__.split())}")
        for label, ms in EXPERIMENTS[name](args.rounds).items():
            print(f"  {label:<40} {ms:9.1f}")
    if args.baseline:
        print("\nwhole models, inference batch 16 fp32")
        for label, ms in whole_models(args.rounds, args.baseline).items():
            print(f"  {label:<40} {ms:9.1f}")


if __name__ == "__main__":
    main()
