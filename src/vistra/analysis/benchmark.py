"""Speed on this machine: images/s and latency, achieved GFLOP/s against the GEMM peak
measured in the same run, and peak memory; optionally next to HuggingFace transformers'
equivalent model in the same process.

Everything that is compared is interleaved: each round times the GEMMs that give the peak
(torch.mm, which runs MKL, and oneDNN's linear, in fp32 and in bf16), one step of vistra and
one step of each path of the peer, so a machine shared with other work slows all of them
alike; the figures are medians over rounds, after warm-up steps that are not timed. The peak
is the fastest of those GEMMs in the benchmarked dtype, so "of peak" is against the best this
machine's libraries reach. The report says whether the CPU has bf16 arithmetic: without it
bf16 is emulated, and slow.

bf16 inference runs each library on its faster path, like for like: vistra as `vistra predict`
runs it (`vistra.optimize(model, torch.bfloat16)`, the weights cast once), the peer both under
bf16 autocast and cast to bf16, the faster one reported and both kept (`images_per_s_by_path`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vistra.accel import accelerate_training, optimize
from vistra.accel.capabilities import cpu_has_bf16, describe_device, probe
from vistra.accel.kernels import onednn_gemm
from vistra.models import build_model

from .flops import params_and_macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GEMMS = ("torch.mm", "oneDNN")  # the GEMMs timed for the peak: MKL's (torch.mm) and oneDNN's
GEMM_NAMES = {"torch.mm": "torch.mm (MKL)", "oneDNN": "oneDNN's linear"}
FP32, CAST, AUTOCAST = "fp32", "bf16 cast", "bf16 autocast"  # the paths a step can take
MODES = ("infer", "train")
GEMM_SIZE = 2048
MEMORY_NOTE = ("peak memory: the most bytes torch's CPU allocator held at once during one "
               "step, above what was held before it (activations, gradients and temporaries; "
               "weights and optimizer state already exist), from torch.profiler's memory events")
TRAIN_FLOPS_NOTE = "training FLOPs are 3x the forward's (backward ~ 2x forward)"


@dataclass
class Result:
    """One model's figures in one run."""

    model: str
    impl: str  # "vistra" or "hf"
    mode: str
    dtype: str
    batch_size: int
    img_size: list[int]
    compiled: bool
    latency_ms: float  # median time of one step (one batch)
    images_per_s: float
    gflop_per_image: float
    achieved_gflops: float
    fraction_of_peak: float
    peak_memory_mb: float
    step_times_ms: list[float] = field(default_factory=list)
    # fp32, bf16 cast (weights and inputs bf16, no autocast) or bf16 autocast; "" in reports
    # read back from JSON written before paths were recorded (their bf16 was autocast)
    path: str = ""
    # every path this library ran in this configuration, the reported one included
    images_per_s_by_path: dict[str, float] = field(default_factory=dict)
    # the untimed first step (for a compiled model, torch.compile compiling); None in reports
    # written before it was recorded, or run without warm-up
    first_step_s: float | None = None


@dataclass
class Report:
    results: list[Result]
    gemm_peak_gflops: float  # the GEMM peak in the benchmarked dtype (below)
    threads: int
    notes: list[str]
    # The defaults are for reports read back from JSON written before these fields existed.
    # per dtype ("fp32", "bf16"): the fastest GEMM's median over rounds (GEMM_SIZE^3), which
    # GEMM that was (one of GEMMS), and every GEMM's figure
    gemm_peak_gflops_by_dtype: dict[str, float] = field(default_factory=dict)
    gemm_peak_source_by_dtype: dict[str, str] = field(default_factory=dict)
    gemm_gflops_by_dtype: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_model: str = ""  # vistra.accel.probe().cpu_model; "" where the system reports none
    cpu_bf16: bool | None = None  # vistra.accel.capabilities.cpu_has_bf16()
    cpu_bf16_flags: list[str] = field(default_factory=list)  # probe().bf16_flags
    device: str = "cpu"  # where the models and the GEMMs ran
    device_name: str = ""  # vistra.accel.describe_device(device) for a GPU

    def speedup(self) -> float | None:
        """vistra's images/s over the peer's, when a peer ran."""
        by_impl = {r.impl: r.images_per_s for r in self.results}
        return by_impl["vistra"] / by_impl["hf"] if "hf" in by_impl else None

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup_vs_hf": self.speedup()}

    def format(self) -> str:
        """A plain-text table: one row per model run, then the CPU line, the speedup over
        the peer when one ran, and the notes."""
        head = (f"{'model':<30} {'impl':<7} {'mode':<5} {'path':<13} {'batch':>5} {'img/s':>8} "
                f"{'latency ms':>11} {'GFLOP/s':>8} {'of peak':>8} {'peak MB':>8}")
        lines = [head]
        for r in self.results:
            impl = r.impl + ("+c" if r.compiled else "")
            memory = "-" if math.isnan(r.peak_memory_mb) else f"{r.peak_memory_mb:.0f}"
            lines.append(f"{r.model:<30} {impl:<7} {r.mode:<5} {r.path or r.dtype:<13} "
                         f"{r.batch_size:>5} {r.images_per_s:>8.2f} {r.latency_ms:>11.1f} "
                         f"{r.achieved_gflops:>8.1f} {r.fraction_of_peak:>8.0%} {memory:>8}")
            others = {p: v for p, v in r.images_per_s_by_path.items() if p != r.path}
            if others:
                lines.append(f"  {r.impl} {r.path} chosen as its faster bf16 path; also ran "
                             + ", ".join(f"{p} {v:.2f} img/s" for p, v in others.items()))
            if r.compiled and r.first_step_s is not None:
                lines.append(f"  {impl} first step {r.first_step_s:.1f} s (torch.compile "
                             "compiling; not in the figures)")
        lines.append(self.cpu_line() if self.device == "cpu" else self.gpu_line())
        speedup = self.speedup()
        if speedup is not None:
            lines.append(f"vistra / HuggingFace images/s: {speedup:.2f}x")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def cpu_line(self) -> str:
        """The CPU, whether it has bf16 arithmetic, and the GEMM peak in each dtype: what the
        figures are to be read against (as the run recorded them, from vistra.accel.probe)."""
        flags = f" ({', '.join(self.cpu_bf16_flags)})" if self.cpu_bf16_flags else ""
        bf16 = f"yes{flags}" if self.cpu_bf16 else "no (bf16 is emulated: slow)"
        peaks = ", ".join(
            f"{kind} {gflops:.0f}" + (f" ({self.gemm_peak_source_by_dtype[kind]})"
                                      if kind in self.gemm_peak_source_by_dtype else "")
            for kind, gflops in self.gemm_peak_gflops_by_dtype.items())
        return (f"CPU: {self.cpu_model or 'model not reported'}, {self.threads} threads, bf16 "
                f"arithmetic: {bf16}; GEMM peak {peaks} GFLOP/s (same run)")


    def gpu_line(self) -> str:
        """The GPU and its GEMM peak in each dtype, for a run on one."""
        peaks = ", ".join(f"{kind} {gflops / 1e3:.0f}"
                          for kind, gflops in self.gemm_peak_gflops_by_dtype.items())
        return (f"GPU: {self.device_name or self.device}; GEMM peak {peaks} TFLOP/s "
                "(torch.mm, same run)")


def malloc_heap_only() -> bool:
    """Have glibc serve every allocation from its heap and keep freed memory (mallopt
    M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB). By default it maps each allocation over 32 MiB
    afresh and unmaps it when freed, so every forward page-faults its large tensors again:
    on a VM that takes longer than the arithmetic of Swin-T's first-stage GEMMs. Process-wide,
    so every model benchmarked gets it; False where glibc's mallopt is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def gemm_step(dtype: torch.dtype, n: int = GEMM_SIZE,
              device: str | torch.device = "cpu") -> tuple[Callable[[], None], int]:
    """A large square torch.mm into a preallocated output (a fresh one would add page-fault
    time that is no part of the GEMM), and its FLOPs."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def gemm_steps(dtype: torch.dtype, n: int = GEMM_SIZE,
               device: str | torch.device = "cpu") -> dict[str, Callable[[], object]]:
    """The GEMMs this machine offers for an n x n x n product in `dtype`, by name (GEMMS):
    torch.mm (MKL on a CPU, cuBLAS on a GPU) always, oneDNN's linear where torch has it on
    the CPU. Each does 2 n^3 FLOPs."""
    steps: dict[str, Callable[[], object]] = {"torch.mm": gemm_step(dtype, n, device)[0]}
    if torch.device(device).type != "cpu":
        return steps
    onednn = onednn_gemm(torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
    if onednn is not None:
        steps["oneDNN"] = onednn
    return steps


def fastest_gemm(gflops: dict[str, float]) -> tuple[str, float]:
    """The GEMM with the highest GFLOP/s: the peak a model's fraction is measured against."""
    name = max(gflops, key=gflops.__getitem__)
    return name, gflops[name]


def make_step(model: nn.Module, x: torch.Tensor, mode: str, dtype: str,
              cast: bool = False) -> Callable[[], None]:
    """One inference batch (under inference_mode) or one training step (forward, cross-entropy,
    backward, fused AdamW, gradients freed), under bf16 autocast when asked. cast: the model
    and x are already in bf16 (inference): they run as they are, without autocast."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16,
                              enabled=dtype == "bf16" and not cast)
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast:
                model(x)
        return infer
    model.train()
    # fused: one kernel per step on CPU instead of a dozen passes per parameter tensor, which
    # took a quarter of a ViT-S step; every model benchmarked gets the same optimizer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    labels = torch.randint(0, 10, (x.shape[0],), device=x.device)

    def train() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train


def peak_memory(step: Callable[[], None], device: str | torch.device = "cpu") -> int:
    """Bytes: the highest the allocator's net allocations reached during one call of `step`
    (on a GPU, from the CUDA allocator's statistics)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - held
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side logs its start and stop to file descriptor 2."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _time(fn: Callable[[], None], device: torch.device | None = None) -> float:
    """Seconds of one call of `fn`; on a GPU, up to the end of the work it queued."""
    gpu = device is not None and device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if gpu:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def benchmark(name: str, *, batch_size: int = 16, img_size: int | None = None,
              dtype: str = "fp32", mode: str = "infer", compile: bool = False,
              compare: str | None = None, repeats: int = 5, warmup: int = 1,
              measure_memory: bool = True, malloc_heap: bool = False, seed: int = 0,
              gemm_size: int = GEMM_SIZE, device: str = "cpu") -> Report:
    """Time `name` (and, with compare="hf", its transformers twin) at `batch_size` images on
    `device`. malloc_heap: call `malloc_heap_only` first (for the whole process, from then
    on). gemm_size: the side of the square GEMMs that measure the peak (smaller in tests).
    compile: through torch.compile, whose compiling first step is timed apart (a compiled
    run has at least that one warm-up step)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if compare not in (None, "hf"):
        raise ValueError(f"--compare takes 'hf' (HuggingFace transformers), got {compare!r}")
    cast = mode == "infer" and dtype == "bf16"  # vistra's bf16 inference: the model cast once
    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch size must be at least 1")
    heap = malloc_heap and malloc_heap_only()
    if malloc_heap and not heap:
        raise ValueError("--malloc-heap needs glibc's mallopt, not found on this system")
    dev = torch.device(device)
    if compile:
        warmup = max(warmup, 1)
    torch.manual_seed(seed)
    model = build_model(name, img_size=img_size).to(dev)
    size = model.data_config.img_size
    macs = params_and_macs(name, model.arch)[1]
    gflop = 2 * macs / 1e9 * (3 if mode == "train" else 1)
    x = torch.randn(batch_size, model.arch.in_chans, *size, device=dev)
    # vistra as its commands run it: optimized for inference (bf16: cast once, as `vistra
    # predict` runs it), training-accelerated to train
    if mode == "train":
        model = accelerate_training(model)
    else:
        model = optimize(model, torch.bfloat16 if cast else None)
    ours = torch.compile(model) if compile else model
    path = CAST if cast else AUTOCAST if dtype == "bf16" else FP32
    # (library, path) -> one step; bf16 inference runs the peer both ways
    steps = {("vistra", path): make_step(ours, x.bfloat16() if cast else x, mode, dtype, cast)}
    if compare == "hf":
        from .peers import hf_peer

        peer = hf_peer(name, img_size).to(dev)
        steps["hf", AUTOCAST if dtype == "bf16" else FP32] = make_step(peer, x, mode, dtype)
        if cast:
            steps["hf", CAST] = make_step(copy.deepcopy(peer).to(torch.bfloat16), x.bfloat16(),
                                          mode, dtype, cast=True)
    gemms = {(kind, gemm): step for kind, torch_dtype in DTYPES.items()
             for gemm, step in gemm_steps(torch_dtype, gemm_size, dev).items()}
    first: dict[tuple[str, str], float] = {}  # the first warm-up step's seconds
    for key, step in [*gemms.items(), *steps.items()]:
        for i in range(warmup):
            seconds = _time(step, dev)
            if i == 0:
                first[key] = seconds
    times: dict[tuple[str, str], list[float]] = {key: [] for key in [*gemms, *steps]}
    for _ in range(repeats):
        for key, step in [*gemms.items(), *steps.items()]:
            times[key].append(_time(step, dev))
    gemm_gflops: dict[str, dict[str, float]] = {kind: {} for kind in DTYPES}
    for kind, gemm in gemms:
        gemm_gflops[kind][gemm] = 2 * gemm_size**3 / statistics.median(times[kind, gemm]) / 1e9
    best = {kind: fastest_gemm(by_gemm) for kind, by_gemm in gemm_gflops.items()}
    peaks = {kind: gflops for kind, (_, gflops) in best.items()}
    peak = peaks[dtype]
    results = []
    for impl in dict.fromkeys(library for library, _ in steps):
        by_path = {p: batch_size / statistics.median(times[lib, p])
                   for lib, p in steps if lib == impl}
        chosen = max(by_path, key=by_path.__getitem__)
        latency = statistics.median(times[impl, chosen])
        achieved = gflop * batch_size / latency
        results.append(Result(
            model=name, impl=impl, mode=mode, dtype=dtype, batch_size=batch_size,
            img_size=list(size), compiled=compile and impl == "vistra",
            latency_ms=latency * 1e3, images_per_s=batch_size / latency,
            gflop_per_image=gflop, achieved_gflops=achieved, fraction_of_peak=achieved / peak,
            peak_memory_mb=(peak_memory(steps[impl, chosen], dev) / 2**20 if measure_memory
                            else float("nan")),
            step_times_ms=[t * 1e3 for t in times[impl, chosen]], path=chosen,
            images_per_s_by_path=by_path, first_step_s=first.get((impl, chosen))))
    gemm_names = " and ".join(GEMM_NAMES[g] for g in gemm_gflops[dtype])
    notes = [f"GEMM peak: the fastest of {gemm_names} of {gemm_size}x{gemm_size}, in fp32 and "
             f"in bf16, all timed in every round; 'of peak' is against the {dtype} one, "
             f"{best[dtype][0]} here",
             "FLOPs: 2 per multiply-add of the model's matrix products (vistra's count, the "
             "same architecture for the peer)"]
    if cast:
        notes.append("bf16 inference: vistra cast once (vistra.optimize(model, torch.bfloat16), "
                     "as `vistra predict` runs it); the peer under bf16 autocast and cast to "
                     "bf16, the faster reported")
    if mode == "train":
        notes.append(TRAIN_FLOPS_NOTE)
    if heap:
        notes.append("allocator: glibc heap only, freed memory kept (malloc_heap_only)")
    if measure_memory:
        notes.append(MEMORY_NOTE if dev.type == "cpu" else MEMORY_NOTE.replace(
            "CPU allocator", "CUDA allocator").replace("torch.profiler's memory events",
                                                       "torch.cuda's memory statistics"))
    cpu = probe()
    return Report(results, peak, torch.get_num_threads(), notes, gemm_peak_gflops_by_dtype=peaks,
                  gemm_peak_source_by_dtype={kind: gemm for kind, (gemm, _) in best.items()},
                  gemm_gflops_by_dtype=gemm_gflops, cpu_model=cpu.cpu_model,
                  cpu_bf16=cpu_has_bf16(), cpu_bf16_flags=cpu.bf16_flags, device=str(dev),
                  device_name=describe_device(dev) if dev.type == "cuda" else "")
