"""bf16 on a CPU with bf16 arithmetic, side by side in one process: vistra's bf16 model
(`vistra.optimize(model, torch.bfloat16)`: cast once, modules accelerated) against vistra's
plain model under bf16 autocast and HuggingFace transformers eager (autocast, and cast to bf16),
Swin-T and ViT-B/16 inference at batch 16 and 1, with the kernels and fusions behind it;
ViT-S/16 and Swin-T training steps under bf16 autocast against HuggingFace (images/s and peak
memory); the Fashion-MNIST recipe models' training step in fp32 and bf16; and the accuracy of
bf16 inference on Fashion-MNIST checkpoints. Prints the tables and writes benchmarks/bf16.md,
with the targets met or missed.

    python benchmarks/bf16.py --fm-checkpoints runs/a/best.safetensors ... \\
        --fm-test data/fashion_mnist/test
    python benchmarks/bf16.py --tiny     # a check that the script runs (~1 min)

Only a CPU whose flags show avx512_bf16 or amx_bf16 gives meaningful figures: elsewhere bf16
is emulated, and the script says so at the top of its report.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import vistra
from vistra.accel.capabilities import cpu_has_bf16
from vistra.accel.kernels import fused_binary, fused_linear, pack_weight
from vistra.analysis.benchmark import GEMM_SIZE, benchmark, gemm_steps, malloc_heap_only
from vistra.analysis.peers import hf_peer
from vistra.data import ImageFolderDataset
from vistra.evaluate import _labelled_samples
from vistra.models import build_model
from vistra.runtime import load_classifier, mean_logits

sys.path.insert(0, str(Path(__file__).parent))
from fast_paths import compare  # noqa: E402
from inference import cpu_description  # noqa: E402

HERE = Path(__file__).parent
INFER = {"swin_tiny_patch4_window7_224": "Swin-T", "vit_base_patch16_224": "ViT-B/16"}
TRAIN = {"vit_small_patch16_224": "ViT-S/16", "swin_tiny_patch4_window7_224": "Swin-T"}
TINY = {"swin_tiny_patch4_window7_224": dict(depths=(2, 2, 2, 2), embed_dim=48),
        "vit_base_patch16_224": dict(depth=1), "vit_small_patch16_224": dict(depth=1)}
THREADS = 2


def inference_rows(name: str, batch: int, rounds: int, tiny: bool) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name, **(TINY[name] if tiny else {})).eval()
    peer = hf_peer(name).eval() if not tiny else None
    cast = vistra.optimize(copy.deepcopy(model), torch.bfloat16)  # as `vistra predict` runs it
    optimized = vistra.optimize(copy.deepcopy(model))
    x = torch.randn(batch, 3, 224, 224)
    xb = x.bfloat16()

    def autocast(m: torch.nn.Module) -> Callable[[], object]:
        def step() -> object:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)
        return step

    def plain(m: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
        def step() -> object:
            with torch.inference_mode():
                return m(inputs)
        return step

    steps = {"vistra bf16 (cast once)": plain(cast, xb), "vistra bf16 autocast": autocast(model),
             "vistra fp32": plain(optimized, x)}
    if peer is not None:
        steps["HF eager, bf16 autocast"] = autocast(peer)
        steps["HF eager, cast to bf16"] = plain(copy.deepcopy(peer).to(torch.bfloat16), xb)
    ms = compare(steps, rounds)
    with torch.inference_mode():
        reference = model(x)
        drift = float((cast(xb).float() - reference).abs().max() / reference.abs().max())
    rows = [{"model": INFER[name], "batch": batch, "impl": impl, "img_s": batch * 1e3 / t,
             "ms": t} for impl, t in ms.items()]
    rivals = {r["impl"]: r["img_s"] for r in rows if r["impl"] in RIVALS}
    rival = max(rivals, key=rivals.__getitem__)
    for r in rows:
        r["ratio"] = r["img_s"] / rivals[rival]
        r["rival"] = rival if r["impl"].startswith("vistra bf16 (") else None
        r["drift"] = drift if r["impl"].startswith("vistra bf16 (") else None
    return rows


# What vistra's bf16 model is measured against: vistra's own autocast path and HuggingFace's
# bf16 paths, autocast and cast, whichever is fastest in the same rounds.
RIVALS = ("vistra bf16 autocast", "HF eager, bf16 autocast", "HF eager, cast to bf16")


def training_rows(name: str, rounds: int, tiny: bool) -> list[dict]:
    kwargs = dict(batch_size=16, dtype="bf16", mode="train", repeats=rounds, warmup=1)
    if tiny:
        report = benchmark(name, compare=None, img_size=64, **kwargs)
    else:
        report = benchmark(name, compare="hf", **kwargs)
    rows = [{"model": TRAIN[name], "impl": r.impl, "img_s": r.images_per_s,
             "ms": r.latency_ms, "memory_mb": r.peak_memory_mb} for r in report.results]
    hf = next((r["img_s"] for r in rows if r["impl"] == "hf"), None)
    for r in rows:
        r["ratio"] = r["img_s"] / hf if hf else None
    return rows


def recipe_step_rows(rounds: int) -> list[dict]:
    """One optimizer step of each Fashion-MNIST recipe model at its batch of 64 (random
    28x28 images), fp32 and bf16 autocast interleaved."""
    rows = []
    for name in ("vit_fmnist", "swin_fmnist"):
        ms = compare({"fp32": recipe_steps(name, False),
                                "bf16": recipe_steps(name, True)}, rounds)
        rows.append({"model": name, "fp32_ms": ms["fp32"] / 10, "bf16_ms": ms["bf16"] / 10,
                     "speedup": ms["fp32"] / ms["bf16"]})
    return rows


def recipe_steps(name: str, bf16: bool) -> Callable[[], None]:
    """Ten training steps of a fresh `name` (the same seed for both dtypes)."""
    torch.manual_seed(0)
    model = build_model(name).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def run() -> None:
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return run


def accuracy_rows(checkpoints: list[Path], test: Path, limit: int | None) -> list[dict]:
    """Test top-1 of each checkpoint in fp32 and bf16 (vistra predict/eval --dtype bf16: the
    model cast once), and how often the two predict the same class."""
    rows = []
    for path in checkpoints:
        fp32 = load_classifier(path, dtype="fp32")
        bf16 = load_classifier(path, dtype="bf16")
        samples, _ = _labelled_samples(test, fp32.classes, None)
        samples = samples[:limit] if limit else samples
        loader = DataLoader(ImageFolderDataset(samples, fp32.transform, channels=fp32.in_chans),
                            batch_size=100)
        right = {"fp32": 0, "bf16": 0}
        same = total = 0
        for images, labels in loader:
            a, b = mean_logits(fp32(images)).argmax(1), mean_logits(bf16(images)).argmax(1)
            right["fp32"] += int((a == labels).sum())
            right["bf16"] += int((b == labels).sum())
            same += int((a == b).sum())
            total += len(labels)
        rows.append({"checkpoint": f"{path.parent.name}/{path.name}", "images": total,
                     "fp32_top1": right["fp32"] / total, "bf16_top1": right["bf16"] / total,
                     "agreement": same / total})
    return rows


ATTENTION_SHAPES = {  # [batch, heads, tokens, head dim] at batch 16; Swin's windows in the batch
    "Swin-T stage 1 windows": (16 * 64, 3, 49, 32), "Swin-T stage 3 windows": (16 * 4, 12, 49, 32),
    "ViT-B/16 224": (16, 12, 197, 64), "ViT-B/16 384": (16, 12, 577, 64)}
LINEAR_SHAPES = {  # rows, in, out at batch 16
    "Swin-T stage 1 qkv": (16 * 3136, 96, 288), "Swin-T stage 1 fc2": (16 * 3136, 384, 96),
    "Swin-T stage 3 fc1": (16 * 196, 384, 1536), "ViT-B/16 qkv": (16 * 197, 768, 2304),
    "ViT-B/16 fc2": (16 * 197, 3072, 768), "ViT-B/16 qkv, batch 1": (197, 768, 2304)}


def kernel_rows(rounds: int, tiny: bool) -> tuple[list[dict], list[dict]]:
    """The two kernel choices behind the bf16 model, measured alone: attention by SDPA's flash
    kernel or by explicit products (with Swin's bias), and a linear layer by F.linear or by
    oneDNN's fused linear with the weight packed once."""
    scale = 4 if tiny else 1
    attention = [attention_row(label, (max(1, b // scale), h, n, d), dtype, rounds)
                 for label, (b, h, n, d) in ATTENTION_SHAPES.items()
                 for dtype in (torch.bfloat16, torch.float32)]
    linear = [linear_row(label, max(1, m // scale), k, n, rounds)
              for label, (m, k, n) in LINEAR_SHAPES.items()]
    return attention, linear


def attention_row(label: str, shape: tuple[int, int, int, int], dtype: torch.dtype,
                  rounds: int) -> dict:
    q, k, v = (torch.randn(*shape, dtype=dtype) for _ in range(3))
    h, n, d = shape[1:]
    bias = torch.randn(h, n, n, dtype=dtype) if "Swin" in label else None

    def sdpa() -> object:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias[None], scale=d ** -0.5)

    def explicit() -> object:
        w = (q * d ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            w.add_(bias)
        return w.softmax(-1) @ v
    with torch.inference_mode():
        t = compare({"sdpa": sdpa, "explicit": explicit}, 3 * rounds)
    return {"shape": label, "dtype": str(dtype).removeprefix("torch."),
            "sdpa_ms": t["sdpa"], "explicit_ms": t["explicit"],
            "speedup": t["sdpa"] / t["explicit"]}


def linear_row(label: str, m: int, k: int, n: int, rounds: int) -> dict:
    """nn.Linear in bf16 (F.linear) against vistra.optimize's FastLinear, which packs the
    weight on its first call."""
    x = torch.randn(m, k, dtype=torch.bfloat16)
    layer = nn.Linear(k, n).eval().requires_grad_(False).to(torch.bfloat16)
    fast = vistra.optimize(copy.deepcopy(layer), torch.bfloat16)
    with torch.inference_mode():
        t = compare({"linear": lambda: layer(x), "packed": lambda: fast(x)}, 3 * rounds)
    flops = 2 * m * k * n
    return {"shape": label, "linear_gflops": flops / t["linear"] / 1e6,
            "packed_gflops": flops / t["packed"] / 1e6, "speedup": t["linear"] / t["packed"]}


FUSION_SHAPES = {  # Swin-T at batch 16: fc2's rows, hidden and output widths
    "Swin-T stage 1 fc2 + residual": (16 * 3136, 384, 96),
    "Swin-T stage 3 fc2 + residual": (16 * 196, 1536, 384)}


def fusion_rows(rounds: int, tiny: bool) -> list[dict]:
    """The two fusions of vistra.optimize around the GEMMs, each against the unfused pair:
    Swin-T's 4x4 patch embedding as a convolution then the copy to channels-last, or as one
    GEMM over the cut-out patches (vistra.accel's FastPatchConv); and fc2 then the residual
    add, or fc2's GEMM adding the residual (oneDNN's binary post-op, FastMlp.residual)."""
    scale = 4 if tiny else 1
    rows = [patch_row(dtype, 16 // scale, rounds) for dtype in (torch.bfloat16, torch.float32)]
    return rows + [residual_row(label, m // scale, k, n, rounds)
                   for label, (m, k, n) in FUSION_SHAPES.items()]


def patch_row(dtype: torch.dtype, batch: int, rounds: int) -> dict:
    """Swin-T's patch embedding: nn.Conv2d(3, 96, 4, 4) then the copy to channels-last,
    against FastPatchConv (vistra.optimize of the conv: in bf16 its weight packed as a bf16
    model's), whose [B, D, h, w] output is already a view of channels-last tokens."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 96, 4, 4).eval().requires_grad_(False).to(dtype)
    fast = vistra.optimize(copy.deepcopy(conv), dtype)
    image = torch.randn(batch, 3, 224, 224, dtype=dtype)
    with torch.inference_mode():
        t = compare({"plain": lambda: conv(image).permute(0, 2, 3, 1).contiguous(),
                     "fused": lambda: fast(image).permute(0, 2, 3, 1).contiguous()},
                    3 * rounds)
    return {"op": "Swin-T patch embedding", "dtype": str(dtype).removeprefix("torch."),
            "plain_ms": t["plain"], "fused_ms": t["fused"], "speedup": t["plain"] / t["fused"]}


def residual_row(label: str, m: int, k: int, n: int, rounds: int) -> dict:
    """fc2 (FastLinear's GEMM, packed weight) then the residual add, against the GEMM adding
    the residual as FastMlp.residual does; vistra.accel.kernels' names for oneDNN's ops."""
    x, residual = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(m, n, dtype=torch.bfloat16)
    weight = pack_weight(torch.randn(n, k, dtype=torch.bfloat16), m)
    bias = torch.randn(n, dtype=torch.bfloat16)
    with torch.inference_mode():
        t = compare({"plain": lambda: fused_linear(x, weight, bias, "none", [], "").add_(residual),
                     "fused": lambda: fused_binary(x, residual, weight, bias, "add")}, 3 * rounds)
    return {"op": label, "dtype": "bfloat16", "plain_ms": t["plain"], "fused_ms": t["fused"],
            "speedup": t["plain"] / t["fused"]}


def gemm_peaks(rounds: int) -> dict[str, tuple[float, str]]:
    """Per dtype: the fastest GEMM's GFLOP/s (torch.mm's MKL or oneDNN's linear) and which."""
    steps = {(label, gemm): step
             for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             for gemm, step in gemm_steps(dtype).items()}
    ms = compare(steps, rounds)
    peaks: dict[str, tuple[float, str]] = {}
    for (label, gemm), t in ms.items():
        gflops = 2 * GEMM_SIZE**3 / t / 1e6
        if gflops > peaks.get(label, (0.0, ""))[0]:
            peaks[label] = (gflops, gemm)
    return peaks


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fm-checkpoints", type=Path, nargs="*", default=[])
    parser.add_argument("--fm-test", type=Path)
    parser.add_argument("--tiny", action="store_true",
                        help="small models, few rounds, no file unless --out is given")
    parser.add_argument("--out", type=Path, help="default: benchmarks/bf16.md")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    malloc_heap_only()  # both libraries alike: no page faults on every forward
    rounds = 1 if args.tiny else args.rounds
    cpu, flags = cpu_description()
    peaks = gemm_peaks(rounds)
    head = [f"CPU: {cpu}; flags: {flags}; bf16 arithmetic: "
            f"{'yes' if cpu_has_bf16() else 'NO (emulated: these figures mean nothing)'}",
            f"torch {torch.__version__}, {THREADS} threads; GEMM peak ({GEMM_SIZE}^3, the "
            f"fastest of torch.mm and oneDNN's linear, same run): "
            + ", ".join(f"{k} {v:.0f} ({src})" for k, (v, src) in peaks.items()) + " GFLOP/s",
            f"run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"]
    print("\n".join(head), flush=True)
    attention, linear = kernel_rows(rounds, args.tiny)
    fusions = fusion_rows(rounds, args.tiny)
    print("\n".join(table(attention, ATTENTION_COLUMNS) + [""] + table(linear, LINEAR_COLUMNS)
                    + [""] + table(fusions, FUSION_COLUMNS)), flush=True)
    infer = []
    for name in INFER:
        for batch in (16, 1):
            rows = inference_rows(name, batch if not args.tiny else min(batch, 2),
                                  rounds if batch == 16 else 3 * rounds, args.tiny)
            infer += rows
            print("\n".join(table(rows, INFER_COLUMNS)), flush=True)
    train = []
    for name in TRAIN:
        rows = training_rows(name, rounds, args.tiny)
        train += rows
        print("\n".join(table(rows, TRAIN_COLUMNS)), flush=True)
    recipes = recipe_step_rows(rounds if not args.tiny else 1)
    print("\n".join(table(recipes, RECIPE_COLUMNS)), flush=True)
    accuracy = []
    if args.fm_checkpoints and args.fm_test:
        accuracy = accuracy_rows(args.fm_checkpoints, args.fm_test, 200 if args.tiny else None)
        print("\n".join(table(accuracy, ACCURACY_COLUMNS)), flush=True)
    if args.out or not args.tiny:
        write_report(args.out or HERE / "bf16.md", head, attention, linear, fusions, infer,
                     train, recipes, accuracy)
    return 0


INFER_COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("implementation", "impl", ""),
                 ("img/s", "img_s", ".2f"), ("ms/batch", "ms", ".1f"),
                 ("vs fastest rival", "ratio", ".2f"), ("fastest rival", "rival", ""),
                 ("max logit drift vs fp32", "drift", ".3%")]
TRAIN_COLUMNS = [("model", "model", ""), ("implementation", "impl", ""), ("img/s", "img_s", ".2f"),
                 ("ms/step", "ms", ".0f"), ("vs HF", "ratio", ".2f"),
                 ("peak memory MB", "memory_mb", ".0f")]
RECIPE_COLUMNS = [("model", "model", ""), ("fp32 ms/step", "fp32_ms", ".1f"),
                  ("bf16 autocast ms/step", "bf16_ms", ".1f"), ("bf16 speed-up", "speedup", ".2f")]
ATTENTION_COLUMNS = [("attention", "shape", ""), ("dtype", "dtype", ""),
                     ("SDPA ms", "sdpa_ms", ".2f"), ("explicit ms", "explicit_ms", ".2f"),
                     ("explicit speed-up", "speedup", ".2f")]
LINEAR_COLUMNS = [("bf16 linear", "shape", ""), ("F.linear GFLOP/s", "linear_gflops", ".0f"),
                  ("fused, packed GFLOP/s", "packed_gflops", ".0f"),
                  ("speed-up", "speedup", ".2f")]
FUSION_COLUMNS = [("op", "op", ""), ("dtype", "dtype", ""), ("unfused ms", "plain_ms", ".2f"),
                  ("fused ms", "fused_ms", ".2f"), ("speed-up", "speedup", ".2f")]
ACCURACY_COLUMNS = [("checkpoint", "checkpoint", ""), ("test images", "images", "d"),
                    ("fp32 top-1", "fp32_top1", ".2%"), ("bf16 top-1", "bf16_top1", ".2%"),
                    ("top-1 agreement", "agreement", ".2%")]


def write_report(out: Path, head: list[str], attention: list[dict], linear: list[dict],
                 fusions: list[dict], infer: list[dict], train: list[dict], recipes: list[dict],
                 accuracy: list[dict]) -> None:
    lines = ["# bf16 on a CPU with bf16 arithmetic", "",
             "Written by `python benchmarks/bf16.py`; every figure in a table comes from one "
             "process, its variants timed in turn round by round (median of the rounds).", "",
             *[f"- {h}" for h in head], "",
             "## Kernels", "",
             "Attention at batch 16 (Swin: 64 or 4 windows per image, folded into the batch, "
             "with the relative-position bias), SDPA's CPU flash kernel against the explicit "
             "products:", "",
             *table(attention, ATTENTION_COLUMNS), "",
             "Linear layers in bf16: F.linear (oneDNN matmul, plain weight) against oneDNN's "
             "fused linear with the weight packed once in its blocked layout:", "",
             *table(linear, LINEAR_COLUMNS), "",
             "Two fusions around the GEMMs, each against the unfused pair (bf16 weights "
             "packed): the patch embedding as a convolution and a copy to channels-last, or "
             "one GEMM over the cut-out patches; fc2 and then the residual add, or fc2's GEMM "
             "adding the residual (oneDNN's binary post-op):", "",
             *table(fusions, FUSION_COLUMNS), "",
             "## Inference", "",
             "`vistra bf16 (cast once)` is what `vistra predict/eval --dtype bf16` (and `auto` "
             "on such a CPU) runs: `vistra.optimize(model, torch.bfloat16)`, the weights cast "
             "to bf16 once and the modules swapped for vistra.accel's; `vistra fp32` is "
             "`vistra.optimize(model)`; `vistra bf16 autocast` is the plain model under "
             "autocast. \"vs fastest rival\" divides by the "
             "fastest of vistra's bf16 autocast path and HuggingFace eager's two bf16 paths, "
             "under bf16 autocast and cast to bf16, named in the next column. "
             "The drift is the largest logit difference from fp32, relative to the largest "
             "fp32 logit, on random weights and images.", "",
             *table(infer, INFER_COLUMNS), "",
             "## Training, batch 16, bf16 autocast", "",
             "`vistra benchmark NAME --mode train --dtype bf16 --compare hf`: forward, "
             "backward and a fused AdamW step; memory is the allocator's peak above the "
             "weights and optimizer state.", "",
             *table(train, TRAIN_COLUMNS), "",
             "## The Fashion-MNIST recipe models: fp32 or bf16 training", "",
             *table(recipes, RECIPE_COLUMNS), ""]
    lines += ["## Accuracy of bf16 inference (Fashion-MNIST test set)", "",
              *(table(accuracy, ACCURACY_COLUMNS) if accuracy else
                ["not regenerated: pass --fm-checkpoints CKPT ... --fm-test DIR"]), ""]
    lines += ["## Targets", "", *targets(infer, train, accuracy), ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def targets(infer: list[dict], train: list[dict], accuracy: list[dict]) -> list[str]:
    """Each target of this benchmark, its figure from the tables above, met or missed."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"
    out = []
    for model, goal in (("Swin-T", 1.2), ("ViT-B/16", 1.05)):
        row = next((r for r in infer if r["model"] == model and r["batch"] == 16
                    and r["impl"] == "vistra bf16 (cast once)"), None)
        if row is None:
            out.append(f"- {model} inference, batch 16: not measured in this run")
            continue
        out.append(f"- {model} inference, batch 16: vistra bf16 cast once {row['ratio']:.3f}x "
                   f"the fastest rival, {row['rival']} (of vistra autocast and HF eager autocast "
                   f"or cast; goal {goal}x): {verdict(row['ratio'] >= goal)}")
    for model in TRAIN.values():
        ours = next(r for r in train if r["model"] == model and r["impl"] == "vistra")
        hf = next((r for r in train if r["model"] == model and r["impl"] == "hf"), None)
        if hf is None:
            out.append(f"- {model} training, batch 16: HF not run in this run")
            continue
        ok = ours["ratio"] >= 1.15 and ours["memory_mb"] <= hf["memory_mb"]
        out.append(f"- {model} training, batch 16: {ours['ratio']:.3f}x HF (goal 1.15x), "
                   f"memory {ours['memory_mb']:.0f} vs {hf['memory_mb']:.0f} MB (goal <= HF): "
                   f"{verdict(ok)}")
    for r in accuracy:
        change = (r["bf16_top1"] - r["fp32_top1"]) * 100
        ok = abs(change) <= 0.1 and r["agreement"] >= 0.995
        out.append(f"- {r['checkpoint']}: bf16 top-1 {change:+.2f} points from fp32 (goal "
                   f"within 0.1), agreement {r['agreement']:.2%} (goal >= 99.5%): {verdict(ok)}")
    return out


if __name__ == "__main__":
    sys.exit(main())
