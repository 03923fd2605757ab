"""Linear layers, including the fused projections built at load time (q/k/v, gate/up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). Weights arrive from the loader through `weight_loader`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul, e.g. q/k/v or gate/up.

    `shards` names each part and its output width; the loader copies a checkpoint tensor into
    its slice with `load_shard`.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, width in shards.items():
            self.shard_offsets[name] = (offset, width)
            offset += width

    def load_shard(self, param: nn.Parameter, shard: str, tensor: torch.Tensor) -> None:
        offset, width = self.shard_offsets[shard]
        if tensor.shape[0] != width:
            raise ValueError(
                f"checkpoint shard {shard!r} has {tensor.shape[0]} rows, expected {width}"
            )
        param.data[offset : offset + width].copy_(tensor)
