"""Options and process handling shared by `vistra predict` and `vistra eval`: the backend
and dtype to run in, and sharding the inputs over torchrun's processes."""

from __future__ import annotations

import argparse
import sys

from vistra.accel.capabilities import DTYPES, cpu_has_bf16
from vistra.runtime import BACKENDS, HEADS


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="torch (PyTorch eager) or onnx (onnxruntime); auto (default): onnx for "
                        "an .onnx file, torch otherwise. onnx with a .safetensors exports it in "
                        "memory first (nothing is written)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="torch backend: fp32, or bf16 (the model cast once; faster "
                        "where the CPU has bf16 arithmetic, AVX512_BF16 or AMX; emulated and "
                        "slow elsewhere); auto (default) picks by the CPU and says which")
    p.add_argument("--head", choices=HEADS, default="mean",
                   help="a distilled model's (deit_*_distilled) logits: mean of its two heads "
                        "(default, as it answers), cls (its class head) or dist (its "
                        "distillation head), to see what each has learnt; torch backend")
    p.epilog = ("Under torchrun (e.g. `torchrun --nproc-per-node 2 -m vistra ...`) the inputs "
                "are split across the processes and rank 0 prints the merged result, the same "
                "as one process would.")


def report_dtype(chosen: str, backend: str, requested: str) -> None:
    """Say on stderr what `--dtype auto` chose and why."""
    if requested != "auto":
        return
    if backend == "onnx":
        why = "the onnx backend runs the graph as exported"
    else:
        why = ("this CPU has" if cpu_has_bf16() else "this CPU lacks") + " bf16 arithmetic"
    print(f"dtype: {chosen} (auto: {why})", file=sys.stderr)
