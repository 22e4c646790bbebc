"""Multi-process training under torchrun: which process this is, and the few collectives dfkd needs.

`torchrun --nproc_per_node=N -m dfkd run CONFIG` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK set; each trains on its own synthetic batches (seeded per rank) and DDP averages the
student's, the generator's and the discriminator's gradients. Rank 0 alone writes files and W&B.
Without torchrun every function here is a cheap no-op for a world of one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dfkd.errors import DfkdError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device_name: str) -> None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); nothing for one process."""
    if world_size() == 1 or active():
        return
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= local_rank():
            raise DfkdError(
                f"process {local_rank()} on this node has no GPU ({torch.cuda.device_count()} visible); "
                "start no more processes per node than GPUs, or use train.device=cpu"
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (say, training and caching a teacher); the others then find its result."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any."""
    if not active():
        return flag
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over every rank (itself without torchrun)."""
    if not active():
        return value
    t = torch.tensor([value], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo, CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def gather(obj) -> list:
    """`obj` from every rank, in rank order (a list of one without torchrun)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around a trained network under torchrun (gradients averaged across ranks); else itself."""
    if not active():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
