"""`vistra benchmark NAME`: images/s, latency, achieved GFLOP/s against this machine's GEMM
peak (the fastest of MKL's and oneDNN's), and peak memory; optionally next to HuggingFace
transformers' equivalent model."""

from __future__ import annotations

import argparse

from vistra.accel import resolve_device
from vistra.analysis.benchmark import DTYPES, MODES, benchmark
from vistra.cli.inference import add_device_option
from vistra.output import to_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="measure images/s, latency, GFLOP/s against the GEMM peak, memory",
        description="Time a model on random images: median step time over repeated rounds "
                    "after warm-up, images/s, achieved GFLOP/s as a fraction of the fastest "
                    "large GEMM timed in the same rounds (torch.mm's MKL and oneDNN's, in fp32 "
                    "and in bf16, the peak and which GEMM gave it reported, with whether the "
                    "CPU has bf16 arithmetic), and peak memory of one step. With --compare hf, "
                    "HuggingFace transformers' equivalent model runs in the same process, "
                    "interleaved round by round; in bf16 inference on its faster path (autocast "
                    "or cast to bf16), beside vistra's model cast once as `vistra predict` runs "
                    "it.")
    p.add_argument("name", help="a registered model name (see `vistra models`)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--img-size", type=int, default=None,
                   help="square input size (default: the model's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="fp32, or bf16: inference on the model cast once (as predict runs it), "
                        "training under bf16 autocast (default fp32)")
    p.add_argument("--mode", choices=MODES, default="infer",
                   help="infer: forward under inference_mode; train: forward, backward and an "
                        "AdamW step (default infer)")
    p.add_argument("--compile", action="store_true",
                   help="run vistra's model through torch.compile (compiling takes minutes "
                        "on a small CPU; the first warm-up step does it, reported apart)")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also run HuggingFace transformers' equivalent (random init, same "
                        "numbers) and print the images/s ratio")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory step (it runs once more under the profiler)")
    p.add_argument("--malloc-heap", action="store_true",
                   help="first make glibc keep freed memory instead of unmapping large blocks, "
                        "so tensors stop page-faulting on every forward (process-wide: both "
                        "libraries get it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = benchmark(args.name, batch_size=args.batch_size, img_size=args.img_size,
                       dtype=args.dtype, mode=args.mode, compile=args.compile,
                       compare=args.compare, repeats=args.repeats, warmup=args.warmup,
                       measure_memory=not args.no_memory, malloc_heap=args.malloc_heap,
                       device=str(resolve_device(args.device)))
    print(to_json(report.to_dict(), indent=2) if args.json else report.format())
    return 0
