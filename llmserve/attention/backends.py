"""Attention backends: store this step's K/V into the paged cache, then attend.

A backend is a function `(q, k, v, k_cache, v_cache, metadata, scale, window=None) -> out` with
the shapes documented in `llmserve.kernels.ref`; `window` is the layer's sliding window (None =
full causal attention). `torch` is the CPU path (the torch twins, with decode rows
in the native C kernel of `llmserve.kernels.cpu_native` when it builds); `triton` runs the Triton
kernels on CUDA (or under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmserve.attention.metadata import AttentionMetadata
from llmserve.kernels import cpu_attention, cpu_native

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float,
     int | None],
    torch.Tensor,
]


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    key = "torch" if window is None else ("torch", window)
    cached = meta.backend_cache.get(key)
    if cached is None:  # first layer of the step with this window: index arithmetic and masks
        # Decode rows go to the native C kernel when it is built and the cache is fp32.
        plan = cpu_attention.plan_paged_attention(
            meta.query_start_loc, meta.seq_lens, meta.block_tables, k_cache.shape[1],
            native=k_cache.dtype == torch.float32, num_decodes=meta.num_decode_tokens,
            fresh_prefill=True, window=window,
        )
        cached = meta.backend_cache[key] = (cpu_attention.prepare_slots(meta.slot_mapping), plan)
    (slots, keep), plan = cached
    cpu_attention.store_kvcache_prepared(k, v, k_cache, v_cache, slots, keep)
    return cpu_attention.paged_attention_planned(q, k_cache, v_cache, plan, scale, k, v)


def get_attention_backend(name: str) -> AttentionFn:
    """Return the attention function for a resolved backend name ("torch" or "triton")."""
    if name == "torch":
        cpu_native.load()  # build or find the native decode kernel now, not in the first decode
        return torch_attention
    if name == "triton":
        from llmserve.attention.triton_backend import triton_attention

        return triton_attention
    raise ValueError(f"unknown attention backend {name!r}; use 'torch' or 'triton'")
