"""Peak memory of one training step with and without gradient checkpointing
(`--grad-checkpointing`, `model.set_grad_checkpointing()`), and its time.

    python benchmarks/grad_checkpointing.py --model vit_small_patch16_224 --batch-size 16

Memory is the allocator's peak during one step (forward, backward, AdamW), measured by the
profiler as `vistra benchmark` does; the first step is run once before, so the optimizer's
state is allocated and not counted as a difference.
"""

from __future__ import annotations

import argparse
import time

import torch

import vistra
from vistra.analysis.benchmark import make_step, peak_memory


def measure(name: str, batch_size: int, checkpointing: bool) -> tuple[int, float]:
    torch.manual_seed(0)
    model = vistra.create_model(name, num_classes=10)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch_size, model.arch.in_chans, *model.data_config.img_size)
    step = make_step(model, x, "train", "fp32")
    step()  # optimizer state allocated
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return peak_memory(step), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    plain, plain_s = measure(args.model, args.batch_size, False)
    ckpt, ckpt_s = measure(args.model, args.batch_size, True)
    print(f"{args.model}, batch {args.batch_size}, one fp32 training step on CPU:")
    print(f"  peak memory  {plain / 2**20:8.0f} MiB plain, {ckpt / 2**20:8.0f} MiB with "
          f"checkpointing ({1 - ckpt / plain:.0%} less)")
    print(f"  step time    {plain_s:8.2f} s plain,   {ckpt_s:8.2f} s with checkpointing "
          f"({ckpt_s / plain_s - 1:+.0%})")


if __name__ == "__main__":
    main()
