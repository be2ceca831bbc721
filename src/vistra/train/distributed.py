"""One process or many (torchrun): who am I, which device, and how to combine results.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process.
Only rank 0 reads the data folder's report, prints and writes files; the other ranks get
what they need from it over the process group. An error in rank 0's part (`on_main`) is
sent to every rank, so all of them stop at once with its message; an error on any rank later
closes its connections, which ends the others' pending collectives at once (torchrun then
stops the rest).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from vistra.accel.capabilities import resolve_device

# Ranks wait in a collective while rank 0 scans the data folder, decoding every image: a
# million files take hours on a slow disk, far beyond torch's 30-minute default. Failures
# do not wait for it: a process that fails closes its connections.
TIMEOUT = timedelta(hours=6)

T = TypeVar("T")


class PeerError(RuntimeError):
    """Another process of the run failed; the message is that process's own."""


@dataclass(frozen=True)
class _Failure:
    message: str


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
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPUs). A
    process of several on CUDA takes the GPU of its LOCAL_RANK unless `device` names one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)  # None: cuda where there is one
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else 0)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    return DistContext(rank, world_size, local_rank, dev)


def close_distributed(ctx: DistContext, failed: bool = False) -> None:
    """Leave the process group; after a failure, leave it to the process's exit, as the
    others may still wait in a collective that this one will never join.

    Normally all ranks leave together (a barrier first), after the objects holding the group
    (DDP's reducer) are freed: a rank tearing its group down while rank 0 still writes the
    run's files, with a reducer alive, was seen to abort at exit under gloo ("terminate called
    without an active exception")."""
    if ctx.distributed and dist.is_initialized() and not failed:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def on_main(work: Callable[[], T], ctx: DistContext,
            send: Callable[[T], T] | None = None) -> T:
    """`work()` run on rank 0, its result on every rank (`send(result)` on the others). If it
    raises, every rank raises: rank 0 its own error, the others a PeerError with its message."""
    if not ctx.distributed:
        return work()
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:
            broadcast_from_main(_Failure(f"{err}"), ctx)
            raise
        broadcast_from_main(send(result) if send else result, ctx)
        return result
    result = broadcast_from_main(None, ctx)
    if isinstance(result, _Failure):
        raise PeerError(f"rank 0 failed: {result.message}")
    return result


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


@contextmanager
def process_group(ctx: DistContext) -> Iterator[None]:
    """Leave the process group at the end; after an error on this rank, at once (the others
    then stop too). A rank whose peer failed says so rather than showing the transport's
    error: the failed rank's own message is the one to read."""
    try:
        yield
    except BaseException as err:
        close_distributed(ctx, failed=True)
        if ctx.distributed and not isinstance(err, PeerError) and (
                isinstance(err, dist.DistError) or "closed by peer" in str(err)):
            raise PeerError("another process of this torchrun run failed; its message says "
                            "why") from err
        raise
    close_distributed(ctx)
