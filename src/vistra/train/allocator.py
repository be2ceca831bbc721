"""Keep freed memory in the process during training instead of handing it back to the kernel.

Each training step frees its activations and allocates them again. With glibc's default
thresholds most of those blocks go back to the kernel and return as fresh pages, so a small
model's step spends its time in page faults (benchmarks/fashion_mnist_ablations.md
counts them, and what raising the thresholds bought).
Raising the thresholds once, as `MALLOC_TRIM_THRESHOLD_`/`MALLOC_TOP_PAD_`/
`MALLOC_MMAP_THRESHOLD_` would, lets the process reuse its peak memory; Intel's PyTorch CPU
guide makes the same point with jemalloc/tcmalloc. The cost is that the process keeps its
peak resident size until it exits, which is what a training process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_SETTINGS = {_M_MMAP_THRESHOLD: 1 << 30,  # blocks up to 1 GiB come from the heap...
             _M_TRIM_THRESHOLD: (1 << 31) - 1,  # ...which is (almost) never trimmed
             _M_TOP_PAD: 256 << 20}  # and grows by at least 256 MiB at a time


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for a training process; False where there is no glibc
    (macOS, Windows, musl) or a setting was refused, which changes nothing but speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS.items())
