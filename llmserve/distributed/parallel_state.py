"""Who this process is in the tensor-parallel group, and the process groups it talks through.

One tensor-parallel group per process: it is torch.distributed's default group, created either by
the engine for the workers it spawns (a TCPStore on loopback) or through the env:// rendezvous
that torchrun sets up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which is how ranks
on several nodes join. Tensors travel on NCCL for CUDA models and on gloo for CPU models; small
control messages (the step descriptions sent by broadcast) always use a gloo group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "LLMSERVE_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the tensor-parallel group (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    cpu_group: Any = None  # gloo group for pickled control messages


_state = ParallelState()


def get_state() -> ParallelState:
    return _state


def get_tp_rank() -> int:
    return _state.rank


def get_tp_world_size() -> int:
    return _state.world_size


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def timeout_seconds() -> float:
    """How long a collective (or a worker start-up) may wait for a peer before it fails."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def rank_device(device: torch.device, local_rank: int | None = None) -> torch.device:
    """The device this rank computes on: CUDA ranks on one node take consecutive GPUs."""
    local = _state.local_rank if local_rank is None else local_rank
    if device.type != "cuda" or local == 0:
        return device  # rank 0 keeps the device exactly as configured
    return torch.device("cuda", (device.index or 0) + local)


def env_launch() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when torchrun (or a scheduler doing the same) launched us.

    Only a world of more than one process counts: `torchrun --nproc-per-node 1` on one node is
    an ordinary single process.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return (rank, world, local_rank) if world > 1 else None


def init_tensor_parallel(
    rank: int,
    world_size: int,
    local_rank: int,
    device: torch.device,
    store: dist.Store | None = None,
) -> ParallelState:
    """Join the tensor-parallel group: through `store` if given, else env:// (torchrun)."""
    global _state
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process; one tensor-parallel "
            "engine per process (shut the previous engine down first)"
        )
    backend = backend_for(device)
    own = rank_device(device, local_rank)
    if own.type == "cuda" and own.index is not None:
        torch.cuda.set_device(own)
    dist.init_process_group(
        backend,
        init_method=None if store is not None else "env://",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_seconds()),
    )
    # Every rank must create the same groups in the same order.
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    _state = ParallelState(rank, world_size, local_rank, backend, cpu_group)
    return _state


def destroy_tensor_parallel() -> None:
    """Leave the group (idempotent); afterwards this process is rank 0 of 1 again."""
    global _state
    _state = ParallelState()
    if dist.is_initialized():
        dist.destroy_process_group()


def check_tensor_parallel_size(hf_config: dict, tensor_parallel_size: int) -> None:
    """Raise ValueError unless the model's heads and MLP split evenly over the ranks.

    KV heads are sharded when there are at least as many as ranks, else each is replicated on
    `tensor_parallel_size / num_key_value_heads` ranks (which must then be a whole number).
    """
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    cfg = hf_config if "num_attention_heads" in hf_config else hf_config.get("text_config", hf_config)
    heads = int(cfg.get("num_attention_heads", 0))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg.get("intermediate_size", 0))
    if heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide num_attention_heads ({heads})"
        )
    if kv_heads >= tp and kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide num_key_value_heads ({kv_heads})"
        )
    if kv_heads < tp and tp % kv_heads:
        raise ValueError(
            f"with fewer KV heads ({kv_heads}) than ranks, tensor_parallel_size {tp} must be a "
            "multiple of num_key_value_heads so that each KV head is replicated evenly"
        )
    if inter % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide intermediate_size ({inter})")
