"""What this machine computes fast, probed once: the only place vistra reads the CPU.

The flags come from /proc/cpuinfo (Linux; elsewhere none are known and every choice falls
back to fp32 and the plain kernels). bf16 pays only where the CPU has bf16 arithmetic
(AVX512_BF16 or AMX); elsewhere it is emulated and slower than fp32. AMX decides which bf16
attention kernel is faster (vistra.accel.attention); VNNI, whether int8 GEMMs saturate
(vistra.onnx's 7-bit weights).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = ("auto", "fp32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bf16 arithmetic
AMX_FLAGS = ("amx_tile",)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class Capabilities:
    """The CPU as vistra sees it. `cpu_model` is "" where the system reports none."""

    cpu_model: str
    flags: frozenset[str]
    cores: int

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512_BF16 or AMX)."""
        return not self.flags.isdisjoint(BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return not self.flags.isdisjoint(AMX_FLAGS)

    @property
    def vnni(self) -> bool:
        return not self.flags.isdisjoint(VNNI_FLAGS)

    @property
    def bf16_flags(self) -> list[str]:
        """Which of BF16_FLAGS the CPU reports, for benchmark records."""
        return [flag for flag in BF16_FLAGS if flag in self.flags]


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name ("" where the system reports none) and its feature flags, from
    /proc/cpuinfo (nothing where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    lines = text.splitlines()
    name = next((line.partition(":")[2].strip() for line in lines
                 if line.startswith("model name")), "")
    flags = next((line.partition(":")[2].split() for line in lines
                  if line.startswith("flags")), [])
    return name, frozenset(flags)


@functools.cache
def probe() -> Capabilities:
    """This machine's CPU, read once per process."""
    name, flags = cpu_info()
    return Capabilities(name, flags, os.cpu_count() or 1)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic, where bf16 pays."""
    return probe().bf16


def resolve_dtype(dtype: str, backend: str, device: str = "cpu") -> str:
    """fp32 or bf16 for `dtype` auto|fp32|bf16: auto takes bf16 for the torch backend on a
    CPU with bf16 arithmetic (or a GPU), fp32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        fast = torch.device(device).type == "cuda" or cpu_has_bf16()
        return "bf16" if backend == "torch" and fast else "fp32"
    if dtype == "bf16" and backend != "torch":
        raise ValueError("--dtype bf16 is for the torch backend; for a faster ONNX model "
                         "export it with --int8")
    return dtype
