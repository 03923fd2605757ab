"""Collectives over the tensor-parallel group. At world size 1 each returns its input untouched."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from llmserve.distributed.parallel_state import get_state


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; every rank gets the sum."""
    if get_state().world_size == 1:
        return x
    dist.all_reduce(x)
    return x


def gather_to_first_rank(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's `x` along `dim` on rank 0; other ranks get None.

    Used for the LM head: only rank 0 samples, so the other ranks need not hold full logits.
    """
    state = get_state()
    if state.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.world_size)] if state.rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=dim) if parts is not None else None


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest `value` over the ranks (e.g. how many KV blocks every rank can hold)."""
    if get_state().world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj: Any = None) -> Any:
    """Send a picklable object from rank 0 to every rank over the gloo control group."""
    state = get_state()
    if state.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.cpu_group)
    return box[0]
