"""Options and process handling shared by `vistra predict` and `vistra eval`: the device,
backend, dtype, autocast and compilation to run with, and sharding the inputs over
torchrun's processes."""

from __future__ import annotations

import argparse
import sys

import torch

from vistra.accel.capabilities import (
    AMP_MODES,
    DTYPES,
    default_device,
    describe_device,
    device_has_bf16,
    has_tf32,
)
from vistra.runtime import BACKENDS, HEADS, resolve_backend


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help=f"cpu, cuda, cuda:1, ... (default: cuda if torch sees a GPU, else cpu; "
                        f"here {default_device()}; under torchrun each process uses its "
                        "LOCAL_RANK GPU)")


def runtime_device(args: argparse.Namespace, model: str) -> str | None:
    """--device as given; none given, cpu for a model the onnx backend runs (onnxruntime
    runs on the CPU), else None: the default device."""
    backend = getattr(args, "backend", "auto")
    if args.device is None and resolve_backend(model, backend) == "onnx":
        return "cpu"
    return args.device


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    add_device_option(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="torch (PyTorch eager) or onnx (onnxruntime); auto (default): onnx for "
                        "an .onnx file, torch otherwise. onnx with a .safetensors exports it in "
                        "memory first (nothing is written)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="torch backend: fp32, or the model cast once to bf16 (faster on GPUs "
                        "of compute capability 8.0 or later and CPUs with AVX512_BF16 or AMX; "
                        "emulated and slow on other CPUs) or fp16 (for older GPUs); auto "
                        "(default) picks by the device and says which")
    p.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="torch backend: the fp32 model under bf16 or fp16 autocast, as "
                        "training validates under --amp (auto: bf16 where native, fp16 on "
                        "older GPUs, off on CPUs without bf16); with --dtype auto or fp32 "
                        "(default: off, the cast of --dtype)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: run the model through torch.compile (the first "
                        "batch of each size compiles: worth it for many images)")
    p.add_argument("--head", choices=HEADS, default="mean",
                   help="a distilled model's (deit_*_distilled) logits: mean of its two heads "
                        "(default, as it answers), cls (its class head) or dist (its "
                        "distillation head), to see what each has learnt; torch backend")
    p.epilog = ("Under torchrun (e.g. `torchrun --nproc-per-node 2 -m vistra ...`) the inputs "
                "are split across the processes and rank 0 prints the merged result, the same "
                "as one process would.")


def report_dtype(chosen: str, backend: str, requested: str,
                 device: str | torch.device = "cpu") -> None:
    """Say on stderr what `--dtype auto` chose and why."""
    if requested != "auto":
        return
    dev = torch.device(device)
    if backend == "onnx":
        why = "the onnx backend runs the graph as exported"
    elif dev.type == "cuda":
        why = f"{describe_device(dev)} " + ("computes bf16 natively" if device_has_bf16(dev)
                                            else "has no native bf16")
    else:
        why = ("this CPU has" if device_has_bf16(dev) else "this CPU lacks") + " bf16 arithmetic"
    print(f"dtype: {chosen} (auto: {why})", file=sys.stderr)


def report_precision(dtype: str, amp: str, backend: str, requested_dtype: str,
                     device: str | torch.device) -> None:
    """Say on stderr how the model computes: what --dtype auto chose and why, the autocast,
    and TF32 for an fp32 torch model on a GPU that has it (vistra.runtime turns it on)."""
    report_dtype(dtype, backend, requested_dtype, device)
    if amp != "off":
        print(f"amp: {amp} autocast of the fp32 model", file=sys.stderr)
    if backend == "torch" and dtype == "fp32" and has_tf32(device):
        print("TF32: on for fp32 matrix products", file=sys.stderr)
