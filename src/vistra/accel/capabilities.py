"""What this machine computes fast, probed once: the only place vistra reads the CPU, and
where every command's device and precision are chosen.

The flags come from /proc/cpuinfo (Linux; elsewhere none are known and every choice falls
back to fp32 and the plain kernels). bf16 pays only where the CPU has bf16 arithmetic
(AVX512_BF16 or AMX); elsewhere it is emulated and slower than fp32. AMX decides which bf16
attention kernel is faster (vistra.accel.attention); VNNI, whether int8 GEMMs saturate
(vistra.onnx's 7-bit weights).

On a CUDA GPU the compute capability decides: 8.0 (Ampere) and later compute bf16 and TF32
natively; older GPUs (T4, V100) compute fp16, whose gradients need a scaler.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = ("auto", "fp32", "bf16", "fp16")  # --dtype: what an inference model is cast to
AMP_MODES = ("auto", "bf16", "fp16", "off")  # --amp: the autocast of the forward pass
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CAPABILITY = (8, 0)  # CUDA compute capability from which bf16 and TF32 are native
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


def default_device() -> str:
    """cuda where torch sees a CUDA GPU, cpu elsewhere: every command's --device default."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` (None: default_device()) as a torch.device, refused with a message that says
    what to pass instead where torch cannot reach it."""
    dev = torch.device(default_device() if device is None else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU "
                             "here (a CPU-only build, or no driver); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return dev


def device_has_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability 8.0 or
    later, or a CPU with bf16 arithmetic."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev) >= NATIVE_BF16_CAPABILITY
    return dev.type == "cpu" and cpu_has_bf16()


def describe_device(device: str | torch.device = "cpu") -> str:
    """The device as the logs name it: the GPU's name and compute capability, or the CPU
    and whether it has bf16 arithmetic."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (compute capability {major}.{minor})"
    if dev.type == "cpu":
        return f"this CPU ({'has' if cpu_has_bf16() else 'no'} bf16 arithmetic)"
    return str(dev)


def resolve_amp(amp: str, device: str | torch.device = "cpu") -> str:
    """bf16, fp16 or off for `amp` auto|bf16|fp16|off on `device`. auto: bf16 where the
    device computes it natively, fp16 on a CUDA GPU without (training then scales the
    loss), off on a CPU without bf16 arithmetic (emulated bf16 is slower than fp32, fp16
    more so); bf16, fp16 and off are honoured as asked."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device_has_bf16(device):
        return "bf16"
    return "fp16" if torch.device(device).type == "cuda" else "off"


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved `amp` (bf16 or fp16), None for off."""
    return None if amp == "off" else TORCH_DTYPES[amp]


def has_tf32(device: str | torch.device) -> bool:
    """Whether `device` is a GPU with TF32 (10-bit mantissa, fp32 range, many times the
    fp32 rate): compute capability 8.0 or later."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= NATIVE_BF16_CAPABILITY


def enable_tf32(device: str | torch.device) -> bool:
    """Let fp32 matrix products on `device` run in TF32 where it has it (has_tf32), as timm
    and HuggingFace's Trainer do; cuDNN's convolutions already do. Process-wide; True if
    set."""
    if not has_tf32(device):
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    return True


def resolve_dtype(dtype: str, backend: str, device: str | torch.device = "cpu") -> str:
    """fp32, bf16 or fp16 for `dtype` auto|fp32|bf16|fp16: auto takes for the torch
    backend what resolve_amp's auto takes on `device` (bf16 where native, fp16 on an older
    GPU), fp32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        half = resolve_amp("auto", device) if backend == "torch" else "off"
        return "fp32" if half == "off" else half
    if dtype != "fp32" and backend != "torch":
        raise ValueError(f"--dtype {dtype} is for the torch backend; for a faster ONNX model "
                         "export it with --int8")
    return dtype
