"""Neox-style rotary embedding applied in place to q and k (Triton), one program per token.

The cos/sin cache ([max_pos, head_dim]: cos in the first half, sin in the second, float32) is
built by the rotary layer, llama3/linear scaling included, so the kernel only reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.common import check_launchable, next_pow2


@triton.jit
def _rotate_heads(ptr, stride_h, cos, sin, offs_half, NUM_HEADS: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_half[None, :] < HALF)
    first = ptr + offs_h[:, None] * stride_h + offs_half[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    half_mask = offs_half < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs_half, mask=half_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_half, mask=half_mask, other=0.0)
    cos, sin = cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, cos, sin, offs_half, NUM_HEADS, HALF, BLOCK_H
    )
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, cos, sin, offs_half, NUM_KV_HEADS, HALF, BLOCK_KH
    )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (any token/head strides); returns (q, k).

    Same values as `ref.rotary_embedding`, which returns new tensors instead.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [tokens, heads, head_dim], got {q.shape} and {k.shape}")
    head_dim = q.shape[2]
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_positions, {head_dim}] with an even head_dim, "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache must be contiguous in their last dimension")
    check_launchable(positions, q, k, cos_sin_cache)
    if q.shape[0]:
        half = head_dim // 2
        _rotary_kernel[(q.shape[0],)](
            positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), NUM_HEADS=q.shape[1], NUM_KV_HEADS=k.shape[1], HALF=half,
            BLOCK_HALF=next_pow2(half), BLOCK_H=next_pow2(q.shape[1]),
            BLOCK_KH=next_pow2(k.shape[1]), num_warps=4,
        )
    return q, k
