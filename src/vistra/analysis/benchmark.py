"""Speed on this machine: images/s and latency, achieved GFLOP/s against the GEMM peak
measured in the same run, and peak memory; optionally next to HuggingFace transformers'
equivalent model in the same process.

Everything that is compared is interleaved: each round times a GEMM in fp32 and one in bf16,
one step of vistra and one step of the peer, so a machine shared with other work slows all of
them alike; the figures are medians over rounds, after warm-up steps that are not timed. The
report says whether the CPU has bf16 arithmetic: without it bf16 is emulated, and slow.
"""

from __future__ import annotations

import contextlib
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
from vistra.accel.capabilities import cpu_has_bf16, probe
from vistra.models import build_model

from .flops import params_and_macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


@dataclass
class Report:
    results: list[Result]
    gemm_peak_gflops: float  # the GEMM peak in the benchmarked dtype (below)
    threads: int
    notes: list[str]
    # The defaults are for reports read back from JSON written before these fields existed.
    # median over rounds of a GEMM_SIZE^3 torch.mm in each of "fp32" and "bf16", same rounds
    gemm_peak_gflops_by_dtype: dict[str, float] = field(default_factory=dict)
    cpu_model: str = ""  # vistra.accel.probe().cpu_model; "" where the system reports none
    cpu_bf16: bool | None = None  # vistra.accel.capabilities.cpu_has_bf16()
    cpu_bf16_flags: list[str] = field(default_factory=list)  # probe().bf16_flags

    def speedup(self) -> float | None:
        """vistra's images/s over the peer's, when a peer ran."""
        by_impl = {r.impl: r.images_per_s for r in self.results}
        return by_impl["vistra"] / by_impl["hf"] if "hf" in by_impl else None

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup_vs_hf": self.speedup()}

    def format(self) -> str:
        """A plain-text table: one row per model run, then the CPU line, the speedup over
        the peer when one ran, and the notes."""
        head = (f"{'model':<30} {'impl':<7} {'mode':<5} {'dtype':<5} {'batch':>5} {'img/s':>8} "
                f"{'latency ms':>11} {'GFLOP/s':>8} {'of peak':>8} {'peak MB':>8}")
        lines = [head]
        for r in self.results:
            impl = r.impl + ("+c" if r.compiled else "")
            memory = "-" if math.isnan(r.peak_memory_mb) else f"{r.peak_memory_mb:.0f}"
            lines.append(f"{r.model:<30} {impl:<7} {r.mode:<5} {r.dtype:<5} {r.batch_size:>5} "
                         f"{r.images_per_s:>8.2f} {r.latency_ms:>11.1f} "
                         f"{r.achieved_gflops:>8.1f} {r.fraction_of_peak:>8.0%} {memory:>8}")
        lines.append(self.cpu_line())
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
        peaks = ", ".join(f"{kind} {gflops:.0f}"
                          for kind, gflops in self.gemm_peak_gflops_by_dtype.items())
        return (f"CPU: {self.cpu_model or 'model not reported'}, {self.threads} threads, bf16 "
                f"arithmetic: {bf16}; GEMM peak {peaks} GFLOP/s (same run)")


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


def gemm_step(dtype: torch.dtype, n: int = GEMM_SIZE) -> tuple[Callable[[], None], int]:
    """A large square torch.mm into a preallocated output (a fresh one would add page-fault
    time that is no part of the GEMM), and its FLOPs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def make_step(model: nn.Module, x: torch.Tensor, mode: str, dtype: str) -> Callable[[], None]:
    """One inference batch (under inference_mode) or one training step (forward, cross-entropy,
    backward, fused AdamW, gradients freed), under bf16 autocast when asked."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
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
    labels = torch.randint(0, 10, (x.shape[0],))

    def train() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train


def peak_memory(step: Callable[[], None]) -> int:
    """Bytes: the highest the allocator's net allocations reached during one call of `step`."""
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


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(name: str, *, batch_size: int = 16, img_size: int | None = None,
              dtype: str = "fp32", mode: str = "infer", compile: bool = False,
              compare: str | None = None, repeats: int = 5, warmup: int = 1,
              measure_memory: bool = True, malloc_heap: bool = False, seed: int = 0,
              gemm_size: int = GEMM_SIZE) -> Report:
    """Time `name` (and, with compare="hf", its transformers twin) at `batch_size` images.
    malloc_heap: call `malloc_heap_only` first (for the whole process, from then on).
    gemm_size: the side of the square GEMMs that measure the peak (smaller in tests)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if compare not in (None, "hf"):
        raise ValueError(f"--compare takes 'hf' (HuggingFace transformers), got {compare!r}")
    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch size must be at least 1")
    heap = malloc_heap and malloc_heap_only()
    if malloc_heap and not heap:
        raise ValueError("--malloc-heap needs glibc's mallopt, not found on this system")
    torch.manual_seed(seed)
    model = build_model(name, img_size=img_size)
    size = model.data_config.img_size
    macs = params_and_macs(name, model.arch)[1]
    gflop = 2 * macs / 1e9 * (3 if mode == "train" else 1)
    # vistra as its commands run it: optimized for inference, training-accelerated to train
    model = optimize(model) if mode == "infer" else accelerate_training(model)
    runners: dict[str, nn.Module] = {"vistra": torch.compile(model) if compile else model}
    if compare == "hf":
        from .peers import hf_peer

        runners["hf"] = hf_peer(name, img_size)
    x = torch.randn(batch_size, model.arch.in_chans, *size)
    steps = {impl: make_step(m, x, mode, dtype) for impl, m in runners.items()}
    gemms = {kind: gemm_step(torch_dtype, gemm_size) for kind, torch_dtype in DTYPES.items()}
    for step in [*(gemm for gemm, _ in gemms.values()), *steps.values()]:
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {key: [] for key in [*gemms, *steps]}  # GEMM dtypes, impls
    for _ in range(repeats):
        for kind, (gemm, _) in gemms.items():
            times[kind].append(_time(gemm))
        for impl, step in steps.items():
            times[impl].append(_time(step))
    peaks = {kind: flops / statistics.median(times[kind]) / 1e9
             for kind, (_, flops) in gemms.items()}
    peak = peaks[dtype]
    results = []
    for impl, step in steps.items():
        latency = statistics.median(times[impl])
        achieved = gflop * batch_size / latency
        results.append(Result(
            model=name, impl=impl, mode=mode, dtype=dtype, batch_size=batch_size,
            img_size=list(size), compiled=compile and impl == "vistra",
            latency_ms=latency * 1e3, images_per_s=batch_size / latency,
            gflop_per_image=gflop, achieved_gflops=achieved, fraction_of_peak=achieved / peak,
            peak_memory_mb=peak_memory(step) / 2**20 if measure_memory else float("nan"),
            step_times_ms=[t * 1e3 for t in times[impl]]))
    notes = [f"GEMM peak: torch.mm of {gemm_size}x{gemm_size} in fp32 and in bf16, both timed "
             f"in every round; 'of peak' is against the {dtype} one",
             "FLOPs: 2 per multiply-add of the model's matrix products (vistra's count, the "
             "same architecture for the peer)"]
    if mode == "train":
        notes.append(TRAIN_FLOPS_NOTE)
    if heap:
        notes.append("allocator: glibc heap only, freed memory kept (malloc_heap_only)")
    if measure_memory:
        notes.append(MEMORY_NOTE)
    cpu = probe()
    return Report(results, peak, torch.get_num_threads(), notes, gemm_peak_gflops_by_dtype=peaks,
                  cpu_model=cpu.cpu_model, cpu_bf16=cpu_has_bf16(), cpu_bf16_flags=cpu.bf16_flags)
