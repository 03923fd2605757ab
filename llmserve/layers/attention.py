"""The attention layer models use: paged KV cache plus a pluggable backend."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.attention.backends import AttentionFn, torch_attention, torch_attention_rows
from llmserve.attention.metadata import OutputRows, get_attention_metadata


class Attention(nn.Module):
    """Stores this step's K/V in the layer's cache slice and attends over the paged context.

    The model runner binds `k_cache` / `v_cache` (views into one big KV tensor) and the backend
    function after it has sized the pool; the metadata comes from the forward context.

    `sliding_window` (None = full attention): a query at position p attends only to keys at
    positions > p - sliding_window, i.e. the last `sliding_window` positions including its own
    (Hugging Face's convention for Mistral, Qwen2 and Gemma 3's local layers).
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        if sliding_window is not None and (
                isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.backend: AttentionFn = torch_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        meta = get_attention_metadata()
        if self.sliding_window is None:  # the 7-argument call: wrappers of a backend keep working
            out = self.backend(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        else:
            out = self.backend(
                q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def forward_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: OutputRows
                     ) -> torch.Tensor:
        """`forward` for the query rows `rows` only: every row's k and v are stored, `q` holds
        all rows, and the result has one row per entry of `rows` ([n, heads * head_dim])."""
        if self.backend is not torch_attention:  # another backend: attend for all, keep some
            return self.forward(q, k, v).index_select(0, rows.tokens)
        q = q.index_select(0, rows.tokens).view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = torch_attention_rows(q, k, v, self.k_cache, self.v_cache, get_attention_metadata(),
                                   self.scale, self.sliding_window, rows)
        return out.reshape(-1, self.num_heads * self.head_dim)
