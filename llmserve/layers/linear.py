"""Linear layers, replicated or split over the tensor-parallel ranks, with their weight loaders.

Megatron-style pairs: a column-parallel layer splits its output features (each rank computes its
own slice, no communication); the row-parallel layer after it splits its input features and sums
the partial products over the ranks with one all-reduce. q/k/v and gate/up are fused
column-parallel projections filled shard by shard at load time.

Weight loaders receive either a tensor or a lazy safetensors slice and read only this rank's part,
so no rank materialises a full weight it does not keep. At tensor_parallel_size=1 every layer
holds the full weight and runs exactly one `F.linear`, as a plain linear layer does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.distributed.communication import all_reduce
from llmserve.distributed.parallel_state import get_tp_rank, get_tp_world_size

# A checkpoint tensor: a torch.Tensor or a safetensors slice (`get_shape()`, `[a:b]`, `[:, a:b]`).
Loaded = Any


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def read_part(loaded: Loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start + length) of a checkpoint tensor."""
    if dim == 0:
        return loaded[start : start + length]
    return loaded[:, start : start + length]


def default_weight_loader(param: nn.Parameter, loaded: Loaded) -> None:
    """Copy a replicated tensor whole; its shape must match the parameter's."""
    shape = loaded_shape(loaded)
    if shape != tuple(param.shape):
        raise ValueError(f"checkpoint shape {shape} != model {tuple(param.shape)}")
    param.data.copy_(loaded[:])


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


class Linear(nn.Module):
    """y = x W^T (+ b), the same full weight on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        default_weight_loader(param, loaded)


class ColumnParallelLinear(Linear):
    """Output features split over the ranks: rank r holds rows [r*n, (r+1)*n) of W (and b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        super().__init__(in_features, _divide(out_features, self.tp_size, "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        rows = param.shape[0]
        expected = (rows * self.tp_size, *param.shape[1:])
        if loaded_shape(loaded) != expected:
            raise ValueError(f"checkpoint shape {loaded_shape(loaded)} != expected {expected}")
        param.data.copy_(read_part(loaded, 0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate/up).

    `shards` gives each part's full output width; every part is split evenly over the ranks and
    this rank's slices are laid side by side. `shard_offsets[name]` = (offset, width) on this rank.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        tp = get_tp_world_size()
        local = {name: _divide(width, tp, f"shard {name!r} width") for name, width in shards.items()}
        super().__init__(in_features, sum(local.values()) * tp, bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, width in local.items():
            self.shard_offsets[name] = (offset, width)
            offset += width

    def source_rows(self, shard: str) -> tuple[int, int, int]:
        """(rows in the checkpoint tensor, first row this rank reads, rows it reads)."""
        width = self.shard_offsets[shard][1]
        return width * self.tp_size, self.tp_rank * width, width

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        if shard not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard!r}; expected one of {sorted(self.shard_offsets)}")
        offset, width = self.shard_offsets[shard]
        total, start, _ = self.source_rows(shard)
        shape = loaded_shape(loaded)
        if shape[0] != total or shape[1:] != tuple(param.shape[1:]):
            expected = (total, *param.shape[1:])
            raise ValueError(f"checkpoint shard {shard!r} has shape {shape}, expected {expected}")
        param.data[offset : offset + width].copy_(read_part(loaded, 0, start, width))


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v: query heads split over the ranks; KV heads split too, or, when there are fewer
    KV heads than ranks, each rank keeps the one KV head its query heads attend to."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp = get_tp_world_size()
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
        else:
            _divide(tp, num_kv_heads, "KV-head replication: tensor_parallel_size / num_key_value_heads")
            self.num_kv_heads = 1
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim * tp, self.num_kv_heads * head_dim * tp
        super().__init__(hidden, {"q": q, "k": kv, "v": kv}, bias)

    def source_rows(self, shard: str) -> tuple[int, int, int]:
        if shard == "q":
            return super().source_rows(shard)
        total_heads = self.total_num_kv_heads
        first_head = self.tp_rank * total_heads // self.tp_size
        return total_heads * self.head_dim, first_head * self.head_dim, self.num_kv_heads * self.head_dim


class RowParallelLinear(Linear):
    """Input features split over the ranks; partial products are summed with one all-reduce.

    The bias (replicated) is added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        super().__init__(_divide(in_features, self.tp_size, "input features"), out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        if param.dim() == 1:  # the bias is replicated
            default_weight_loader(param, loaded)
            return
        cols = param.shape[1]
        expected = (param.shape[0], cols * self.tp_size)
        if loaded_shape(loaded) != expected:
            raise ValueError(f"checkpoint shape {loaded_shape(loaded)} != expected {expected}")
        param.data.copy_(read_part(loaded, 1, self.tp_rank * cols, cols))
