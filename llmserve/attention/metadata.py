"""AttentionMetadata and the forward context: the only bridge between the engine and the models.

The model runner builds one AttentionMetadata per step and sets it around the forward pass; each
attention layer reads it from the context, so models only ever see `input_ids` and `positions`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each query row attends to.

    See `llmserve.kernels.ref` for the exact meaning and shapes of each tensor.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    query_start_loc: torch.Tensor  # [batch + 1] int32
    seq_lens: torch.Tensor  # [batch] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends can plan without a device sync.
    num_decode_tokens: int = 0  # leading rows that are single-token decodes (0 if unknown)
    # Per-step scratch for backends: layer-independent work done by the first layer and reused.
    backend_cache: dict = field(default_factory=dict)
    # The rows whose final hidden states the step reads (see OutputRows); None = every row.
    output_rows: OutputRows | None = None


@dataclass(frozen=True)
class OutputRows:
    """The rows of a step whose final hidden states anyone reads: the LM head's rows.

    Set by the model runner only for models that declare `prunes_output_rows`; such a model then
    returns the hidden states of these rows only, in this order, and may skip work that no other
    row needs (the last layer's attention and MLP of every other row). Each row is the last query
    token of its sequence in the step, so its attention is a decode over the sequence's whole
    context.
    """

    tokens: torch.Tensor  # [n] int64: flat token index of each row
    seqs: torch.Tensor  # [n] int64: the sequence (batch row) each belongs to


_current: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside a forward context")
    return _current


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make `metadata` visible to every attention layer for the duration of one forward pass."""
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous
