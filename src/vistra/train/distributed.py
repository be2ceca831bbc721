"""One process or many (torchrun): who am I, which device, and how to combine results.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process.
Only rank 0 reads the data folder's report, prints and writes files; the other ranks get
what they need from it over the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else 0)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def close_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise sum over all ranks (the tensor itself on a single process)."""
    if ctx.distributed:
        tensor = tensor.to(ctx.device)
        dist.all_reduce(tensor)
    return tensor.cpu()


def broadcast_from_main(obj, ctx: DistContext):
    """Rank 0's `obj` on every rank (pickled over the process group, between our own
    processes, never from a file)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda"
                               else None)
    return box[0]
