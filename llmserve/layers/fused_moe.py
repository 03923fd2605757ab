"""Mixture-of-experts MLP: a router, top-k expert selection and the experts' stacked weights.

All experts' weights live in two stacked parameters in the fused kernel's layout:
w13 [E, 2I, H] (each expert's gate rows, then its up rows) and w2 [E, H, I]. Per-expert
checkpoint tensors (`experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's `w1/w3/w2`) and the
fused tensors of transformers' own layout (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) are both copied into place at load time.

Tensor parallelism splits every expert's intermediate dimension as the dense MLP does (gate/up
rows column-parallel, down columns row-parallel) and sums the partial outputs with one
all-reduce; the router is replicated, so every rank routes identically.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llmserve.distributed.communication import all_reduce
from llmserve.distributed.parallel_state import get_tp_rank, get_tp_world_size
from llmserve.kernels import ops
from llmserve.layers.linear import Linear, Loaded, loaded_shape

# Checkpoint names of the expert weights: one expert's projection, or all experts fused.
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_FUSED_SHARDS = {"gate_up_proj": ("w13", "gate_up"), "down_proj": ("w2", "down")}


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weight_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k], expert ids [T, top_k]) as transformers' routers compute them.

    Softmax over all experts in float32, the top_k largest, divided by their sum when
    `renormalize` (Qwen3-MoE's norm_topk_prob; Mixtral always, which equals a softmax over the
    top-k logits), then cast to `weight_dtype` (Qwen3-MoE casts to the logits' dtype; Mixtral
    keeps float32: None).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weight_dtype is not None:
        weights = weights.to(weight_dtype)
    return weights, ids


def expert_checkpoint_target(name: str, proj_parts: dict[str, str]) -> tuple[str, str] | None:
    """Map an expert tensor's checkpoint name to (parameter name, shard); None if not one.

    `proj_parts` names each per-expert projection's part: e.g. {"gate_proj": "gate",
    "up_proj": "up", "down_proj": "down"} or Mixtral's {"w1": "gate", "w3": "up", "w2": "down"}.
    A per-expert shard is "part:expert"; a fused one is "gate_up" or "down".
    """
    match = _PER_EXPERT.match(name)
    if match and match["proj"] in proj_parts:
        part = proj_parts[match["proj"]]
        param = "w2" if part == "down" else "w13"
        return f"{match['prefix']}.{param}", f"{part}:{match['expert']}"
    match = _FUSED.match(name)
    if match:
        param, shard = _FUSED_SHARDS[match["proj"]]
        return f"{match['prefix']}.{param}", shard
    return None


class FusedMoE(nn.Module):
    """The experts of one MoE layer: forward(x [T, H], router_logits [T, E]) -> [T, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int,
                 renormalize: bool, weights_in_activation_dtype: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts={num_experts}]")
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        if intermediate % self.tp_size:
            raise ValueError(f"expert intermediate size ({intermediate}) is not divisible by "
                             f"tensor_parallel_size ({self.tp_size})")
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.intermediate = intermediate // self.tp_size  # this rank's share
        self.renormalize = renormalize
        self.weights_in_activation_dtype = weights_in_activation_dtype
        inter = self.intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self._loaded: dict[str, set[str]] = {"w13": set(), "w2": set()}

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if self.weights_in_activation_dtype else None
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize, dtype)
        out = ops.fused_moe(x, self.w13, self.w2, weights, ids)
        return all_reduce(out) if self.tp_size > 1 else out

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        """Copy this rank's slice of one expert's projection, or of all experts' fused tensor."""
        inter, start = self.intermediate, self.tp_rank * self.intermediate
        full, shape = inter * self.tp_size, loaded_shape(loaded)
        if shard in ("gate_up", "down"):
            self._load_fused(param, loaded, shard, shape, start)
        else:
            part, _, expert_text = (shard or "").partition(":")
            expert = int(expert_text) if expert_text.isdigit() else -1
            if part not in ("gate", "up", "down") or not 0 <= expert < self.num_experts:
                raise ValueError(f"unknown expert shard {shard!r} ({self.num_experts} experts)")
            if part == "down":
                _expect(shape, (self.hidden, full))
                param.data[expert].copy_(loaded[:, start : start + inter])
            else:
                _expect(shape, (full, self.hidden))
                offset = 0 if part == "gate" else inter
                param.data[expert, offset : offset + inter].copy_(loaded[start : start + inter])
        self._loaded["w2" if shard and shard.startswith("down") else "w13"].add(shard or "")

    def _load_fused(self, param: nn.Parameter, loaded: Loaded, shard: str,
                    shape: tuple[int, ...], start: int) -> None:
        inter, experts = self.intermediate, self.num_experts
        full = inter * self.tp_size
        if shard == "down":
            _expect(shape, (experts, self.hidden, full))
            param.data.copy_(loaded[:, :, start : start + inter])
            return
        _expect(shape, (experts, 2 * full, self.hidden))
        param.data[:, :inter].copy_(loaded[:, start : start + inter])
        param.data[:, inter:].copy_(loaded[:, full + start : full + start + inter])

    def missing_shards(self, param_name: str) -> list[str]:
        """Shards of `w13` / `w2` no checkpoint tensor has filled (the loader's completeness check)."""
        done = self._loaded[param_name]
        whole = "down" if param_name == "w2" else "gate_up"
        if whole in done:
            return []
        parts = ("down",) if param_name == "w2" else ("gate", "up")
        return [f"{p}:{e}" for e in range(self.num_experts) for p in parts if f"{p}:{e}" not in done]


def _expect(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != expected:
        raise ValueError(f"checkpoint shape {tuple(shape)} != expected {expected}")


class SparseMoeBlock(nn.Module):
    """Router (`gate`, a replicated [E, H] linear) and its experts: the MLP of an MoE layer."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int,
                 renormalize: bool, weights_in_activation_dtype: bool, hidden_act: str) -> None:
        super().__init__()
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for experts (only silu)")
        self.gate = Linear(hidden, num_experts)
        self.experts = FusedMoE(num_experts, top_k, hidden, intermediate, renormalize,
                                weights_in_activation_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
