"""One process per GPU under ``torchrun``: the process group, and rank 0's data shared with every rank."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> None:
    """Under torchrun (several processes), join the process group before collecting, so that rank 0 can share
    the data: every rank must train on exactly the same examples, and each fetching its own window a moment apart
    could differ. Trainer/accelerate reuse this group."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def from_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its value (or its exception) handed to every rank; just ``compute()`` alone."""
    import torch.distributed as dist

    if world_size() <= 1 or not dist.is_initialized():
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, compute())]
        except Exception as exc:
            box = [(False, exc)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
