"""Dispatch for the memory-bound ops: Triton kernels on CUDA, torch twins elsewhere.

The Triton modules are imported on first use with a CUDA tensor, so CPU-only installs (and
processes that never touch a GPU) do not pay for importing Triton.
"""

from __future__ import annotations

import torch

from llmserve.kernels import ref
from llmserve.kernels.common import triton_enabled


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, x + residual): see `ref.rms_norm`."""
    if triton_enabled(x):
        from llmserve.kernels.rmsnorm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    return ref.rms_norm(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): see `ref.rotary_embedding`. On CUDA q and k are rotated in place."""
    if triton_enabled(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        from llmserve.kernels.rotary import rotary_embedding as triton_rotary

        return triton_rotary(positions, q, k, cos_sin_cache)
    return ref.rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up: see `ref.silu_and_mul`."""
    if triton_enabled(x):
        from llmserve.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    return ref.silu_and_mul(x)


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v into their cache slots (slot -1 skipped): see `ref.store_kvcache`."""
    if triton_enabled(k):
        from llmserve.kernels.kv_store import store_kvcache as triton_store

        triton_store(k, v, k_cache, v_cache, slot_mapping)
        return
    ref.store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Mixture-of-experts MLP over the routed experts: see `ref.fused_moe`."""
    if triton_enabled(x):
        from llmserve.kernels.fused_moe import fused_moe as triton_fused_moe

        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids)
    return ref.fused_moe(x, w13, w2, topk_weights, topk_ids)
