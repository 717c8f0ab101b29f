"""torch.distributed helpers: the same code runs as one process or under ``torchrun --nproc_per_node N``
(gloo on CPU, nccl on GPU). Work is sharded by rank; rank 0 gathers, logs and writes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence, rank: int, world: int) -> list:
    """Every ``world``-th item starting at ``rank`` (round robin keeps shards balanced and deterministic)."""
    return list(items[rank::world])


def gather_to_rank0(obj, rank: int, world: int) -> list | None:
    """All ranks' ``obj`` as a list on rank 0 (None elsewhere); the identity list in a single process."""
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def shutdown() -> None:
    """Leave the process group if this process joined one. A process that exits with the gloo group still up
    can abort in its background threads' destructors ("terminate called without an active exception"), so a
    torchrun job would fail after its work was done; the CLI calls this on the way out."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
