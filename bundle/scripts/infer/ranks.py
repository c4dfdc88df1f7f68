"""The few torch.distributed calls inference needs under torchrun (a no-op in a single process)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["join", "sum_over_ranks", "leave", "share_range"]


def join() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(value: int) -> int:
    """Sum of ``value`` over all ranks; also a barrier (every rank waits for the others)."""
    if not dist.is_initialized():
        return value
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share_range(start: int, stop: int, rank: int, world: int, multiple: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of ``[start, stop)``, cut at multiples of ``multiple`` (batches)."""
    blocks = -(-(stop - start) // multiple)
    first, last = blocks * rank // world, blocks * (rank + 1) // world
    return min(stop, start + first * multiple), min(stop, start + last * multiple)
