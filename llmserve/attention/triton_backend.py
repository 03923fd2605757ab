"""Triton attention backend: K/V store by slot mapping, then paged attention for a flat batch.

Decode rows (one query token) go to the split-KV decode kernel; rows with several query tokens
(prefill, prefix-hit extend, chunked prefill) go to the extend kernel. Each kernel skips the
other's rows on the device, so routing needs no host sync: only the host ints carried by the
metadata (`max_query_len`, `max_seq_len`) size the launches.

The first layer of a step works out every launch (split count, grids, constexprs, merge
scratch) into a `StepPlan` kept in the metadata's `backend_cache`; the other layers only
launch. Eager (mixed prefill + decode) steps pay this host work once per step, not per layer.
"""

from __future__ import annotations

import torch

from llmserve.attention.metadata import AttentionMetadata

_KEY = "triton"


class StepPlan:
    """The launches of one step's attention, shared by every layer with the same signature."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        signature: tuple,
        window: int | None = None,
    ) -> None:
        try:
            from llmserve.kernels.kv_store import StorePlan
            from llmserve.kernels.paged_decode import DecodePlan
            from llmserve.kernels.prefill_attention import ExtendPlan
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(
                "attention_backend='triton' needs the 'triton' package; use 'torch' instead"
            ) from exc
        self.signature = signature
        # The signature says whether all pointers are 16-byte aligned, not which ones are not:
        # only the aligned case may relaunch compiled kernels, the rest always takes the JIT.
        self.key = signature if signature[0] else None
        self.store = StorePlan(k, v, k_cache, v_cache, meta.slot_mapping)
        self.extend = None
        # Padded CUDA-graph batches may carry rows with an empty query; neither kernel touches them.
        if meta.max_query_len > 1:
            self.extend = ExtendPlan(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, skip_decode_rows=True, window=window,
            )
        self.decode = None
        if meta.max_query_len == 1 or _may_have_decode_rows(meta, q.shape[0]):
            self.decode = DecodePlan(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                max_seq_len=meta.max_seq_len, window=window,
            )


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Same contract as `torch_attention`: store k/v into the cache, return attention of q."""
    signature = _signature(q, k, v, k_cache, v_cache)
    # Layers with another sliding window (or none) launch other kernels: one plan each.
    cache_key = _KEY if window is None else (_KEY, window)
    plan = meta.backend_cache.get(cache_key)
    if plan is None or plan.signature != signature:
        plan = meta.backend_cache[cache_key] = StepPlan(
            q, k, v, k_cache, v_cache, meta, signature, window)
    key = plan.key
    plan.store.launch(key, k, v, k_cache, v_cache)
    # Same dtype and strides as q, freshly allocated (so aligned): the key covers it.
    out = torch.empty_like(q)
    if plan.extend is not None:
        plan.extend.launch(key, q, k_cache, v_cache, out, scale)
    if plan.decode is not None:
        plan.decode.launch(key, q, k_cache, v_cache, out, scale)
    return out


def _signature(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple:
    """Everything about a layer's tensors that the plan or Triton's specialisation depends on.

    Scratch made outside a CUDA-graph capture must not be baked into the graph (it is freed
    with the metadata), so the capture state is part of it: warm-up and capture, which share
    one metadata, get separate plans.
    """
    aligned = not (q.data_ptr() | k.data_ptr() | v.data_ptr() | k_cache.data_ptr()
                   | v_cache.data_ptr()) & 15
    return (
        aligned, _capturing(q), q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype,
        q.shape, k.shape, v.shape, k_cache.shape, v_cache.shape,
        q.stride(), k.stride(), v.stride(), k_cache.stride(), v_cache.stride(),
    )


def _capturing(q: torch.Tensor) -> bool:
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _may_have_decode_rows(meta: AttentionMetadata, num_tokens: int) -> bool:
    """Whether a batch with a long row may also hold single-token rows, from host data only.

    If every token belongs to the longest row there is no decode row; otherwise we cannot
    tell without a sync, so the decode kernel is launched and its non-decode programs exit.
    """
    return meta.num_decode_tokens > 0 or num_tokens != meta.max_query_len
