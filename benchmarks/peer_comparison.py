"""vistra against HuggingFace transformers on this CPU: ViT-B/16, ViT-S/16 and Swin-T at batch
1 and 16, fp32 and bf16, inference and training steps (forward + backward + AdamW). Each
configuration runs both libraries in one process, interleaved round by round with the GEMMs
that give the same run's peak (the fastest of torch.mm's MKL and oneDNN's;
vistra.analysis.benchmark); vistra runs as its commands run it (inference:
`vistra.optimize(model)`, bf16 `vistra.optimize(model, torch.bfloat16)`, cast once; training:
`vistra.accel.accelerate_training(model)`), HuggingFace on its faster bf16 inference path
(autocast or cast, both measured and kept in results.json). Under the table, vistra's fastest
inference path against HuggingFace's fastest, each named. Writes benchmarks/results.md.

    python benchmarks/peer_comparison.py             # the full set, ~15-20 min on 2 cores
    python benchmarks/peer_comparison.py --quick     # Swin-T and ViT-S, batch 16, fp32 infer
    python benchmarks/peer_comparison.py --models swin_tiny_patch4_window7_224 --modes train
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
from pathlib import Path

import torch

from vistra.accel.capabilities import cpu_has_bf16, cpu_info
from vistra.analysis.benchmark import (
    AUTOCAST,
    FP32,
    MEMORY_NOTE,
    TRAIN_FLOPS_NOTE,
    Report,
    Result,
    benchmark,
)

VIT_B, VIT_S = "vit_base_patch16_224", "vit_small_patch16_224"
SWIN_T = "swin_tiny_patch4_window7_224"
SHORT = {VIT_B: "ViT-B/16", VIT_S: "ViT-S/16", SWIN_T: "Swin-T"}
TRAINED = (VIT_S, SWIN_T)  # ViT-B's training steps take minutes each here; ask with --models
HERE = Path(__file__).parent
ALLOCATOR = {False: "glibc defaults (large tensors page-fault on every forward, see README)",
             True: "glibc heap only, freed memory kept (--malloc-heap)"}


def targets(reports: list[Report]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, each as (what, measured, met); met is None when not run."""
    found = {(r.results[0].model, r.results[0].mode, r.results[0].dtype,
              r.results[0].batch_size): r for r in reports}
    rows = []
    for model, dtype, floor in [(SWIN_T, "fp32", 0.70), (SWIN_T, "bf16", 0.60),
                                (VIT_B, "fp32", 0.90), (VIT_B, "bf16", 0.85)]:
        r = found.get((model, "infer", dtype, 16))
        value = r.results[0].fraction_of_peak if r else None
        rows.append((f"{SHORT[model]} inference b16 {dtype}: >= {floor:.0%} of GEMM peak",
                     "-" if r is None else f"{value:.0%}",
                     None if r is None else value >= floor))
    for model, dtype, floor in [(SWIN_T, "fp32", 1.3), (SWIN_T, "bf16", 1.3),
                                (VIT_B, "fp32", 1.2), (VIT_B, "bf16", 1.2)]:
        r = found.get((model, "infer", dtype, 16))
        speedup = r.speedup() if r else None
        rows.append((f"{SHORT[model]} inference b16 {dtype}: >= {floor}x HF images/s",
                     "-" if speedup is None else f"{speedup:.2f}x",
                     None if speedup is None else speedup >= floor))
    for model, dtype in itertools.product((VIT_S, SWIN_T), ("fp32", "bf16")):
        r = found.get((model, "train", dtype, 16))
        if r is None or r.speedup() is None:
            rows.append((f"{SHORT[model]} training b16 {dtype}: >= HF images/s, <= HF memory",
                         "-", None))
            continue
        ours, theirs = r.results
        # To the MiB: the same architecture saves the same activations, give or take a few
        # bytes of bookkeeping.
        rows.append((f"{SHORT[model]} training b16 {dtype}: >= HF images/s, <= HF memory",
                     f"{r.speedup():.2f}x, {ours.peak_memory_mb:.0f} vs "
                     f"{theirs.peak_memory_mb:.0f} MB",
                     r.speedup() >= 1.0
                     and round(ours.peak_memory_mb) <= round(theirs.peak_memory_mb)))
    return rows


def cpu_name() -> str:
    return cpu_info()[0] or platform.processor() or "unknown CPU"


def path_of(result: Result) -> str:
    """The path a result ran; reports from before paths were recorded ran bf16 under autocast."""
    return result.path or (AUTOCAST if result.dtype == "bf16" else FP32)


def paths_cell(ours: Result, theirs: Result) -> str:
    """The one path both libraries ran, or each library's."""
    a, b = path_of(ours), path_of(theirs)
    return a if a == b else f"vistra {a}, HF {b}"


def peak_cell(report: Report) -> str:
    dtype = report.results[0].dtype
    source = report.gemm_peak_source_by_dtype.get(dtype, "torch.mm only")
    return f"{report.gemm_peak_gflops:.0f} ({source})"


def fastest_rows(reports: list[Report]) -> list[str]:
    """Per model and batch (inference): vistra's fastest path against HuggingFace's fastest,
    over every dtype and path this run measured, both named."""
    best: dict[tuple[str, int], dict[str, tuple[float, str]]] = {}
    for report in reports:
        for r in report.results:
            if r.mode != "infer":
                continue
            rates = r.images_per_s_by_path or {path_of(r): r.images_per_s}
            slot = best.setdefault((r.model, r.batch_size), {})
            for path, rate in rates.items():
                if rate > slot.get(r.impl, (0.0, ""))[0]:
                    slot[r.impl] = (rate, path)
    lines = []
    for (model, batch), slot in best.items():
        if {"vistra", "hf"} <= set(slot):
            (ours, a), (theirs, b) = slot["vistra"], slot["hf"]
            lines.append(f"| {SHORT.get(model, model)} | {batch} | vistra {a} vs HF {b} | "
                         f"{ours:.2f} | {theirs:.2f} | **{ours / theirs:.2f}x** |")
    if not lines:
        return []
    return ["", "## Fastest against fastest (inference)", "",
            "Each library's fastest path of this run (fp32, or bf16 on its faster of cast and "
            "autocast), named; a ratio across paths, so read it with the like-for-like rows "
            "above.", "",
            "| model | batch | paths | vistra img/s | HF img/s | vistra/HF |",
            "|---|---:|---|---:|---:|---:|", *lines]


def render(reports: list[Report], command: str, malloc_heap: bool) -> str:
    import transformers

    lines = [
        "# vistra against HuggingFace transformers on this CPU", "",
        f"Written by `{command}` on {datetime.date.today()}: {cpu_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. bf16 dot-product instructions (AVX512_BF16 / AMX): "
        f"{'yes' if cpu_has_bf16() else 'no, so bf16 GEMMs are emulated and slower than fp32'}. "
        f"Allocator: {ALLOCATOR[malloc_heap]}.",
        "", "Both libraries run the same architecture, randomly initialised, in one process; "
        "vistra as `vistra benchmark` runs it: inference on `vistra.optimize(model)` (bf16: "
        "`vistra.optimize(model, torch.bfloat16)`, the model cast once, as `vistra predict` "
        "runs it), training on `vistra.accel.accelerate_training(model)` (bf16: autocast); "
        "HuggingFace's bf16 inference both under autocast and cast to bf16, the faster in the "
        "table (the path column names each library's; both in results.json). Each round times "
        "the peak's GEMMs, one vistra step and one step of each transformers path, and "
        "the figures are medians over rounds after a warm-up step. img/s = batch / median step "
        "time. % of peak = achieved GFLOP/s over the same run's fastest GEMM in that dtype "
        "(torch.mm's MKL or oneDNN's linear, named in the last column). "
        f"{TRAIN_FLOPS_NOTE[0].upper()}{TRAIN_FLOPS_NOTE[1:]}; training uses fused AdamW for "
        f"both. {MEMORY_NOTE[0].upper()}{MEMORY_NOTE[1:]}. On a machine shared with other work "
        "the ratios are the figures to read; absolute numbers move with the load (see the GEMM "
        "peak column).", "",
        "| model | mode | path | batch | vistra img/s | HF img/s | vistra/HF | vistra % peak "
        "| HF % peak | vistra MB | HF MB | GEMM peak GFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        ours, theirs = report.results
        lines.append(
            f"| {SHORT.get(ours.model, ours.model)} | {ours.mode} | {paths_cell(ours, theirs)} | "
            f"{ours.batch_size} | {ours.images_per_s:.2f} | {theirs.images_per_s:.2f} | "
            f"**{report.speedup():.2f}x** | {ours.fraction_of_peak:.0%} | "
            f"{theirs.fraction_of_peak:.0%} | {ours.peak_memory_mb:.0f} | "
            f"{theirs.peak_memory_mb:.0f} | {peak_cell(report)} |")
    lines += fastest_rows(reports)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for what, value, met in targets(reports):
        mark = "not run" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {what} | {value} | {mark} |")
    lines += ["", "What limits the figures that miss: benchmarks/README.md.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="default: ViT-B/16, ViT-S/16, Swin-T (training: ViT-S and Swin-T "
                             "only; models named here are trained too)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=["infer", "train"],
                        default=["infer", "train"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per config")
    parser.add_argument("--repeats-slow", type=int, default=2,
                        help="timed rounds for batch-16 bf16 and training configs")
    parser.add_argument("--quick", action="store_true",
                        help="Swin-T and ViT-S, batch 16, fp32 inference, 2 rounds")
    parser.add_argument("--malloc-heap", action="store_true",
                        help="glibc keeps freed memory: no page faults on reused tensors "
                             "(vistra.analysis.benchmark.malloc_heap_only; both libraries)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the table from a run's results.json, running nothing")
    args = parser.parse_args()
    if args.from_json:
        reports = [Report([Result(**r) for r in d["results"]], d["gemm_peak_gflops"],
                          d["threads"], d["notes"],
                          gemm_peak_source_by_dtype=d.get("gemm_peak_source_by_dtype", {}))
                   for d in json.loads(args.from_json.read_text())]
        args.out.write_text(render(reports, f"python benchmarks/peer_comparison.py (table "
                                   f"re-rendered from {args.from_json.name})", args.malloc_heap))
        return
    if args.quick:
        args.models, args.batch_sizes, args.dtypes, args.modes = [SWIN_T, VIT_S], [16], \
            ["fp32"], ["infer"]
        args.repeats = args.repeats_slow = 2
    trained = TRAINED if args.models is None else args.models
    args.models = args.models or [VIT_B, VIT_S, SWIN_T]
    reports: list[Report] = []
    command = " ".join(["python benchmarks/peer_comparison.py", *sys.argv[1:]])
    for model, mode, dtype, batch in itertools.product(args.models, args.modes, args.dtypes,
                                                        args.batch_sizes):
        if mode == "train" and model not in trained:
            continue
        slow = batch > 1 and (dtype == "bf16" or mode == "train" or model == VIT_B)
        report = benchmark(model, batch_size=batch, dtype=dtype, mode=mode, compare="hf",
                           repeats=args.repeats_slow if slow else args.repeats,
                           malloc_heap=args.malloc_heap)
        reports.append(report)
        ours, theirs = report.results
        print(f"{SHORT.get(model, model):>9} {mode:<5} {paths_cell(ours, theirs)} b{batch:<3} "
              f"vistra "
              f"{ours.images_per_s:7.2f} img/s ({ours.fraction_of_peak:4.0%} of "
              f"{report.gemm_peak_gflops:.0f} GFLOP/s)  HF {theirs.images_per_s:7.2f} img/s  "
              f"{report.speedup():.2f}x  memory {ours.peak_memory_mb:.0f} vs "
              f"{theirs.peak_memory_mb:.0f} MB", flush=True)
        # Written after every configuration: a partial run still leaves a table.
        args.out.write_text(render(reports, command, args.malloc_heap))
        args.out.with_suffix(".json").write_text(
            json.dumps([r.to_dict() for r in reports], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
