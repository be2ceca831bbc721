"""vistra on a CUDA GPU against timm and HuggingFace transformers, like for like, in one
process: training images/s and peak memory (ViT-B/16 and Swin-T at 224, batch 128, bf16
autocast, fused AdamW, channels-last) and inference images/s (batch 256, the model cast to
bf16), each eager and through torch.compile, the compile's first-step cost apart; and the
ViT-B/16 training step's share of the GPU's bf16 peak in model FLOPs (vistra's analytic
counts, as `vistra flops` prints them; a training step counts three forwards). The GPU,
driver, CUDA, cuDNN, torch, timm and transformers versions head the table.

Every library runs the same step on the same inputs: vistra as its commands run it (training:
the model built as `vistra train` builds it; inference: `vistra.optimize(model, bfloat16)`,
which on a GPU only sets eval mode and casts), timm's `create_model` and transformers'
equivalent of the same numbers (vistra.analysis.peers). The libraries of one configuration
are timed in interleaved rounds with CUDA events (medians), so a clock change hits them alike.
timm imports torchvision: where it is missing its rows are left out, and the table says so.

    python benchmarks/gpu.py                   # everything, eager and compiled (~15 min, H100)
    python benchmarks/gpu.py --quick           # eager, and ViT-B/16 training compiled (~3 min)
    python benchmarks/gpu.py --quick --output OUT/gpu.md --budget-s 200

Writes benchmarks/gpu.md and, beside it, every figure in gpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import vistra
from vistra.accel import enable_tf32, optimize
from vistra.analysis.flops import params_and_macs
from vistra.analysis.peers import hf_peer
from vistra.models import get_spec

HERE = Path(__file__).parent
MODELS = {"vit_base_patch16_224": "ViT-B/16", "swin_tiny_patch4_window7_224": "Swin-T"}
BATCH = {"train": 128, "infer": 256}
LIBRARIES = ("vistra", "timm", "HF")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, no sparsity), by a part of
# the name torch reports; the first that matches (so "H100 PCIe" before "H100", "L40S" before
# "L4"). Where none does, the measured GEMM stands alone.
DATASHEET_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
                  ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))
GOAL_FRACTION = 0.40  # issue 34: ViT-B/16 training at 40% of the bf16 peak or more


@dataclass
class Row:
    model: str
    mode: str  # train or infer
    library: str
    compiled: bool
    batch: int
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_gib: float | None = None  # the library's state (weights, AdamW) + one step's peak
    first_step_s: float | None = None  # compilation included, for a compiled model
    tflops: float | None = None  # model FLOPs per second (vistra's counts)
    error: str | None = None
    step_times_ms: list[float] = field(default_factory=list)


def gpu_environment() -> dict:
    """The GPU and the software the figures depend on."""
    props = torch.cuda.get_device_properties(0)
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": str(torch.backends.cudnn.version()), "vistra": vistra.__version__}
    for name in ("timm", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as err:  # timm without torchvision raises at import
            versions[name] = f"not available ({type(err).__name__}: {err})"
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "driver": driver_version(),
            "python": sys.version.split()[0], **versions}


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def datasheet_peak(gpu: str) -> float | None:
    return next((tflops for part, tflops in DATASHEET_BF16 if part in gpu), None)


def measured_gemm_peak(n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of a bf16 n x n x n torch.mm on random data, median of `repeats`."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = [event_ms(lambda: torch.mm(a, b, out=out), 1) for _ in range(repeats)]
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e12


def event_ms(step: Callable[[], object], steps: int) -> float:
    """Milliseconds per call of `step`, over `steps` calls, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def build(library: str, name: str) -> nn.Module:
    """The library's model of `name`'s numbers, randomly initialised, on the GPU."""
    torch.manual_seed(0)
    if library == "vistra":
        model = vistra.create_model(name)
    elif library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        model = hf_peer(name)
    return model.cuda().to(memory_format=torch.channels_last)


def make_step(library: str, model: nn.Module, mode: str, x: torch.Tensor,
              y: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One training step (bf16 autocast, cross-entropy, backward, fused AdamW, gradients
    freed) or one inference batch (the model cast to bf16, under inference_mode)."""
    if mode == "infer":
        if library == "vistra":
            model = optimize(model, torch.bfloat16)  # as `vistra predict` runs it
        else:
            model = model.eval().requires_grad_(False).to(torch.bfloat16)
        run = torch.compile(model) if compiled else model
        x = x.to(torch.bfloat16)

        def infer() -> None:
            with torch.inference_mode():
                run(x)
        return infer
    model.train()
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train


def measure(name: str, mode: str, compiled: bool, libraries: list[str], rounds: int,
            steps: int, warmup: int) -> list[Row]:
    """Every library's row of one configuration, timed in interleaved rounds."""
    batch = BATCH[mode]
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    macs = params_and_macs(name, get_spec(name).arch)[1]
    flops_per_image = 2 * macs * (3 if mode == "train" else 1)
    rows, runners = [], {}
    for library in libraries:
        row = Row(MODELS[name], mode, library, compiled, batch)
        rows.append(row)
        try:
            before = torch.cuda.memory_allocated()
            step = make_step(library, build(library, name), mode, x, y, compiled)
            clock = time.perf_counter()
            step()  # compiles, if compiled; creates the optimizer state
            torch.cuda.synchronize()
            row.first_step_s = time.perf_counter() - clock
            for _ in range(warmup):
                step()
            torch.cuda.synchronize()
            state = torch.cuda.memory_allocated() - before
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row.peak_gib = (state + torch.cuda.max_memory_allocated() - start) / 2**30
            runners[library] = step
        except Exception as err:  # one library failing leaves the others' rows
            row.error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            print(f"  {MODELS[name]} {mode} {library}: {row.error}", file=sys.stderr)
    for _ in range(rounds):
        for row in rows:
            if row.library in runners:
                row.step_times_ms.append(event_ms(runners[row.library], steps))
    for row in rows:
        if row.step_times_ms:
            row.step_ms = statistics.median(row.step_times_ms)
            row.images_per_s = batch / (row.step_ms / 1e3)
            row.tflops = flops_per_image * row.images_per_s / 1e12
    del runners
    gc.collect()
    torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(env: dict, rows: list[Row], gemm: float, datasheet: float | None, mode: str,
           notes: list[str]) -> str:
    date = datetime.date.today().isoformat()
    lines = [f"# vistra on a GPU against timm and HuggingFace transformers ({env['gpu']})", "",
             f"Written by `python benchmarks/gpu.py{' --quick' if mode == 'quick' else ''}` on "
             f"{date}. GPU: **{env['gpu']}** (compute capability {env['capability']}, "
             f"{env['memory_gib']} GiB, {env['multiprocessors']} SMs), driver {env['driver']}, "
             f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, torch {env['torch']}, timm "
             f"{env['timm']}, transformers {env['transformers']}, vistra {env['vistra']}, "
             f"Python {env['python']}.", "",
             f"bf16 peak: {gemm:.0f} TFLOP/s measured (8192³ torch.mm, this process)"
             + (f", {datasheet:.0f} TFLOP/s datasheet (dense)." if datasheet else
                "; no datasheet figure known for this GPU."), ""]
    titles = {"train": "Training step: batch 128, 224², bf16 autocast, fused AdamW, "
                       "channels-last",
              "infer": "Inference: batch 256, 224², the model cast to bf16, inference_mode"}
    for kind in ("train", "infer"):
        lines += [f"## {titles[kind]}", "",
                  "| model | library | compiled | images/s | step ms | peak GiB | first step s "
                  "| vs timm |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for row in (r for r in rows if r.mode == kind):
            timm = next((r for r in rows if (r.model, r.mode, r.compiled, r.library) ==
                         (row.model, kind, row.compiled, "timm") and r.images_per_s), None)
            ratio = f"{row.images_per_s / timm.images_per_s:.2f}x" \
                if timm is not None and row.images_per_s else "-"
            speed = row.error and f"failed: {row.error}" or _num(row.images_per_s, ".0f")
            lines.append(f"| {row.model} | {row.library} | {'yes' if row.compiled else 'no'} | "
                         f"{speed} | {_num(row.step_ms, '.1f')} | {_num(row.peak_gib, '.2f')} | "
                         f"{_num(row.first_step_s, '.1f')} | {ratio} |")
        lines.append("")
    peak = datasheet or gemm
    lines += ["## Model FLOPs utilisation of the training step", "",
              "Model FLOPs: 2 per multiply-add of vistra's analytic count (`vistra flops`), "
              "three forwards per training step, the same for every library.", "",
              "| model | library | compiled | TFLOP/s | of measured GEMM | of datasheet |",
              "|---|---|---|---:|---:|---:|"]
    for row in (r for r in rows if r.mode == "train" and r.tflops):
        sheet = f"{row.tflops / datasheet:.0%}" if datasheet else "-"
        lines.append(f"| {row.model} | {row.library} | {'yes' if row.compiled else 'no'} | "
                     f"{row.tflops:.0f} | {row.tflops / gemm:.0%} | {sheet} |")
    lines += ["", "## Against the goals of issue 34", ""]
    behind = [r for r in rows if r.library == "vistra" and r.images_per_s and any(
        t.library == "timm" and t.images_per_s and t.images_per_s > r.images_per_s and
        (t.model, t.mode, t.compiled) == (r.model, r.mode, r.compiled) for t in rows)]
    compared = any(r.library == "timm" and r.images_per_s for r in rows)
    if not compared:
        lines.append("- vistra >= timm in every row: not measured (timm did not run here).")
    elif behind:
        lines.append("- vistra >= timm in every row: **no**; behind in " + ", ".join(
            f"{r.model} {r.mode}{' compiled' if r.compiled else ''}" for r in behind) + ".")
    else:
        lines.append("- vistra >= timm in every row: yes.")
    vit = [r for r in rows if (r.model, r.mode, r.library) == ("ViT-B/16", "train", "vistra")
           and r.tflops]
    if vit:
        best = max(vit, key=lambda r: r.tflops)
        share = best.tflops / peak
        lines.append(f"- ViT-B/16 training >= {GOAL_FRACTION:.0%} of the bf16 peak "
                     f"({'datasheet' if datasheet else 'measured GEMM'}): "
                     f"{'yes' if share >= GOAL_FRACTION else '**no**'}, {share:.0%} "
                     f"({'compiled' if best.compiled else 'eager'}).")
    lines += ["", "## How it is measured", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write(args: argparse.Namespace, env: dict, rows: list[Row], gemm: float,
          datasheet: float | None, notes: list[str], seconds: float) -> str:
    """gpu.md and gpu.json at args.output from the rows so far; the markdown text."""
    notes = [*notes, f"Run time so far: {seconds:.0f} s."]
    text = render(env, rows, gemm, datasheet, "quick" if args.quick else "full", notes)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"environment": env, "gemm_peak_tflops": gemm, "datasheet_peak_tflops": datasheet,
         "rows": [asdict(r) for r in rows], "notes": notes}, indent=2) + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds; compiled: ViT-B/16 training only, vistra and timm")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no compiled configuration after this many seconds")
    parser.add_argument("--output", type=Path, default=HERE / "gpu.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA GPU: torch {torch.__version__} sees none here, so there is nothing to "
              "measure. Run this on a GPU machine (benchmarks/gpu_check.sh installs the "
              "project, runs `pytest -m gpu` and this script with --quick).", file=sys.stderr)
        return 1
    start = time.perf_counter()
    env = gpu_environment()
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    libraries = ["vistra", "HF"]
    notes = []
    if env["timm"].startswith("not available"):
        notes.append(f"timm {env['timm']}: its rows are left out.")
        print(f"timm {env['timm']}: its rows are left out", file=sys.stderr)
    else:
        libraries.insert(1, "timm")
    if env["transformers"].startswith("not available"):
        libraries.remove("HF")
        notes.append(f"transformers {env['transformers']}: its rows are left out.")
    torch.backends.cudnn.benchmark = True
    enable_tf32("cuda")  # the fp32 parts outside autocast, for every library alike
    rounds, steps, warmup = (3, 5, 2) if args.quick else (5, 10, 3)
    gemm = measured_gemm_peak()
    datasheet = datasheet_peak(env["gpu"])
    configs = [(name, mode, compiled) for compiled in (False, True) for name in MODELS
               for mode in ("train", "infer")]
    if args.no_compile:
        configs = [c for c in configs if not c[2]]
    elif args.quick:
        configs = [c for c in configs if not c[2] or c[:2] == ("vit_base_patch16_224", "train")]
    notes += [
        f"Timing: CUDA events around {steps} steps, {rounds} rounds per configuration with the "
        f"libraries interleaved, the median reported; {warmup} untimed steps after the first. "
        "Inputs are random (never zeros), already on the GPU: no data loading.",
        "First step: the wall time of the first call, with torch.compile's compilation for "
        "a compiled model (and cuBLAS/cuDNN set-up for an eager one); never in the images/s.",
        "Peak GiB: the library's state once training runs (weights, and for training the "
        "fp32 AdamW state) plus the most torch's CUDA allocator held above it during one "
        "step: about what the process alone would peak at.",
        "Same step for all: vistra's model as its commands build it, timm's "
        "`create_model(name)`, transformers' model with the same numbers "
        "(vistra.analysis.peers); each library's own default attention; "
        "`torch.backends.cudnn.benchmark` and TF32 on for all."]
    if args.quick:
        notes.append("--quick: fewer rounds; compiled rows for ViT-B/16 training only, and "
                     "not for transformers.")
    rows: list[Row] = []
    for name, mode, compiled in configs:
        if compiled and args.budget_s and time.perf_counter() - start > args.budget_s:
            notes.append(f"{MODELS[name]} {mode} compiled: skipped, past --budget-s "
                         f"{args.budget_s:g}.")
            continue
        print(f"{MODELS[name]} {mode}{' compiled' if compiled else ''} ...", flush=True)
        which = [lib for lib in libraries if not (args.quick and compiled and lib == "HF")]
        rows += measure(name, mode, compiled, which, rounds, steps, warmup)
        for row in rows[-len(which):]:
            print(f"  {row.library:<7} {_num(row.images_per_s, '>8.0f')} img/s  "
                  f"{_num(row.peak_gib, '.2f')} GiB  first step {_num(row.first_step_s, '.1f')} s"
                  f"{'  ' + row.error if row.error else ''}", flush=True)
        # after every configuration: a run stopped by a time limit keeps what it measured
        write(args, env, rows, gemm, datasheet, notes, time.perf_counter() - start)
    text = write(args, env, rows, gemm, datasheet, notes, time.perf_counter() - start)
    print(text)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
