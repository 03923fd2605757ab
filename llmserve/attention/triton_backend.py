"""Triton attention backend: K/V store by slot mapping, then paged attention for a flat batch.

Decode rows (one query token) go to the split-KV decode kernel; rows with several query tokens
(prefill, prefix-hit extend, chunked prefill) go to the extend kernel. Each kernel skips the
other's rows on the device, so routing needs no host sync: only the host ints carried by the
metadata (`max_query_len`, `max_seq_len`) size the launches.
"""

from __future__ import annotations

import torch

from llmserve.attention.metadata import AttentionMetadata


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as `torch_attention`: store k/v into the cache, return attention of q."""
    try:
        from llmserve.kernels.kv_store import store_kvcache
        from llmserve.kernels.paged_decode import paged_decode_attention
        from llmserve.kernels.prefill_attention import extend_attention
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "attention_backend='triton' needs the 'triton' package; use 'torch' instead"
        ) from exc
    store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    # Padded CUDA-graph batches may carry rows with an empty query; neither kernel touches them.
    if meta.max_query_len > 1:
        extend_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            max_query_len=meta.max_query_len, out=out, skip_decode_rows=True,
        )
    if meta.max_query_len == 1 or _may_have_decode_rows(meta, q.shape[0]):
        paged_decode_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            out=out, max_seq_len=meta.max_seq_len,
        )
    return out


def _may_have_decode_rows(meta: AttentionMetadata, num_tokens: int) -> bool:
    """Whether a batch with a long row may also hold single-token rows, from host data only.

    If every token belongs to the longest row there is no decode row; otherwise we cannot
    tell without a sync, so the decode kernel is launched and its non-decode programs exit.
    """
    return meta.num_decode_tokens > 0 or num_tokens != meta.max_query_len
