"""Write this step's keys and values into the paged KV cache by slot mapping (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.kernels.common import StepLaunch, check_launchable, launch_key, next_pow2


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,  # elements between consecutive slots (kv_heads * head_dim)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding row (e.g. CUDA-graph batch padding): nothing to store
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src_k = k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = slot * stride_cache_slot + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class StorePlan:
    """The K/V store launch of one step, worked out once and reused by every layer.

    k, v: [num_tokens, kv_heads, head_dim] (any token/head strides, e.g. views of a fused qkv);
    k_cache, v_cache: contiguous [num_blocks, block_size, kv_heads, head_dim]. A layer whose
    tensors have other shapes needs its own plan.
    """

    def __init__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(
                f"k and v must both be [tokens, kv_heads, head_dim], got {k.shape} and {v.shape}"
            )
        if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
            raise ValueError(
                f"cache shape {tuple(k_cache.shape)} does not fit k of shape {tuple(k.shape)}"
            )
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("k_cache and v_cache must be contiguous")
        if slot_mapping.shape[0] < k.shape[0]:
            raise ValueError("slot_mapping must have one entry per token")
        self.num_tokens = num_tokens = k.shape[0]
        if num_tokens:
            check_launchable(k, v, k_cache, v_cache, slot_mapping)
        self.slot_mapping = slot_mapping
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        self.slot_stride = num_kv_heads * head_dim
        self.kernel = StepLaunch(
            _store_kv_kernel, (max(num_tokens, 1), 1, 1),
            dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads),
                 BLOCK_D=next_pow2(head_dim)),
            num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
        )

    def run(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor) -> None:
        """Write k and v into the caches at the plan's slots (slot -1 is skipped)."""
        self.launch(launch_key(k, v, k_cache, v_cache), k, v, k_cache, v_cache)

    def launch(self, key: object, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> None:
        """`run` with the `StepLaunch` key given: it must cover k, v and the caches."""
        if self.num_tokens == 0:
            return
        # A copy made here is laid out by k's own layout, so the key still decides the launch.
        k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
        ks, vs = k.stride(), v.stride()
        self.kernel(key, k, v, k_cache, v_cache, self.slot_mapping, ks[0], ks[1], vs[0], vs[1],
                    self.slot_stride)


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `ref.store_kvcache`: one program per token; slot -1 is skipped.

    Shapes as in `StorePlan`, which a caller storing many layers of one step builds once.
    """
    # One launch: nothing to relaunch, so no key.
    StorePlan(k, v, k_cache, v_cache, slot_mapping).launch(None, k, v, k_cache, v_cache)
