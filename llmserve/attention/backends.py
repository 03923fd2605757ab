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

from llmserve.attention.metadata import AttentionMetadata, OutputRows
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
    plan = meta.backend_cache.get(key)
    if plan is None:  # first layer of the step with this window: index arithmetic and masks
        # Decode rows go to the native C kernel when it is built and the cache is fp32.
        plan = meta.backend_cache[key] = cpu_attention.plan_paged_attention(
            meta.query_start_loc, meta.seq_lens, meta.block_tables, k_cache.shape[1],
            native=k_cache.dtype == torch.float32, num_decodes=meta.num_decode_tokens,
            fresh_prefill=True, window=window,
        )
    _store(k, v, k_cache, v_cache, meta)
    return cpu_attention.paged_attention_planned(q, k_cache, v_cache, plan, scale, k, v)


def torch_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    rows: OutputRows,
) -> torch.Tensor:
    """`torch_attention` for the query rows `rows` only ([n, heads, head_dim] `q`, those rows'
    queries), after storing every row's k and v: each is the last token of its sequence, so it
    attends like a decode over the whole context (the native decode kernel where it builds)."""
    key = ("rows", window)
    plan = meta.backend_cache.get(key)
    if plan is None:
        n = len(rows.seqs)
        plan = meta.backend_cache[key] = cpu_attention.plan_paged_attention(
            torch.arange(n + 1, dtype=torch.int32), meta.seq_lens[rows.seqs],
            meta.block_tables[rows.seqs], k_cache.shape[1],
            native=k_cache.dtype == torch.float32, num_decodes=n, window=window,
        )
    _store(k, v, k_cache, v_cache, meta)
    if not len(rows.seqs):
        return q.new_empty(q.shape)
    return cpu_attention.paged_attention_planned(q, k_cache, v_cache, plan, scale)


def _store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata) -> None:
    """This step's k and v into the paged cache (the slots are prepared once per step)."""
    slots = meta.backend_cache.get("slots")
    if slots is None:
        slots = meta.backend_cache["slots"] = cpu_attention.prepare_slots(meta.slot_mapping)
    cpu_attention.store_kvcache_prepared(k, v, k_cache, v_cache, *slots)


def get_attention_backend(name: str) -> AttentionFn:
    """Return the attention function for a resolved backend name ("torch" or "triton")."""
    if name == "torch":
        cpu_native.load()  # build or find the native decode kernel now, not in the first decode
        return torch_attention
    if name == "triton":
        from llmserve.attention.triton_backend import triton_attention

        return triton_attention
    raise ValueError(f"unknown attention backend {name!r}; use 'torch' or 'triton'")
