"""The Triton attention backend against the torch backend on mixed flat batches."""

from __future__ import annotations

import pytest
import torch

from llmserve.attention.backends import get_attention_backend, torch_attention
from llmserve.attention.metadata import AttentionMetadata
from llmserve.attention.triton_backend import triton_attention


def _step(paged_batch, q_lens, seq_lens, dtype, pad_tokens=0, group=4, head_dim=64, block=16):
    """A step's inputs: new k/v for each query row plus their slots (padding slots = -1)."""
    batch = paged_batch(q_lens, seq_lens, 2, group, head_dim, block, dtype)
    device = batch.q.device
    slots = []
    for row, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            block_id = int(batch.block_tables[row, pos // block])
            slots.append(block_id * block + pos % block)
    slots += [-1] * pad_tokens
    num_tokens = len(slots)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(num_tokens, *batch.q.shape[1:], generator=gen).to(device, dtype)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_tokens, 2, head_dim, generator=gen).to(device, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_tables=batch.block_tables,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return batch, q, k, v, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_prefill_extend_decode_batch_matches_torch_backend(paged_batch, tol, dtype):
    q_lens, seq_lens = [1, 7, 1, 20, 3, 1], [40, 7, 16, 52, 19, 1]
    batch, q, k, v, meta = _step(paged_batch, q_lens, seq_lens, dtype, pad_tokens=2)
    k_ref, v_ref = batch.k_cache.float(), batch.v_cache.float()  # copies, written by the oracle
    want = torch_attention(q.float(), k.float(), v.float(), k_ref, v_ref, meta, batch.scale)
    got = triton_attention(q, k, v, batch.k_cache, batch.v_cache, meta, batch.scale)
    real = sum(q_lens)  # padded tokens belong to no row; their output is unspecified
    torch.testing.assert_close(got[:real].float(), want[:real], **tol(dtype))
    # The cache holds exactly what the torch backend stored, padding slots skipped.
    torch.testing.assert_close(batch.k_cache, k_ref.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(batch.v_cache, v_ref.to(dtype), atol=0, rtol=0)


# 600 tokens makes the split heuristic cut the context in two.
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [5, 600, 17]), ([12], [40])])
def test_decode_only_and_single_prefill_batches_match_torch_backend(
    paged_batch, tol, q_lens, seq_lens
):
    batch, q, k, v, meta = _step(paged_batch, q_lens, seq_lens, torch.float32, group=1, block=32)
    want = torch_attention(q, k, v, batch.k_cache.clone(), batch.v_cache.clone(), meta,
                           batch.scale)
    got = triton_attention(q, k, v, batch.k_cache, batch.v_cache, meta, batch.scale)
    torch.testing.assert_close(got, want, **tol(torch.float32))


def test_backend_registry_resolves_triton():
    assert get_attention_backend("triton") is triton_attention


def test_one_plan_serves_every_layer_of_a_step(paged_batch, tol):
    """Layers share the step's plan (built by the first) and each still gets its own answer."""
    q_lens, seq_lens = [1, 9, 1], [300, 9, 33]
    layers = [_step(paged_batch, q_lens, seq_lens, torch.float32) for _ in range(3)]
    meta = layers[0][4]
    plans = []
    for batch, q, k, v, _ in layers:
        want = torch_attention(q, k, v, batch.k_cache.clone(), batch.v_cache.clone(), meta,
                               batch.scale)
        got = triton_attention(q, k, v, batch.k_cache, batch.v_cache, meta, batch.scale)
        torch.testing.assert_close(got, want, **tol(torch.float32))
        plans.append(meta.backend_cache["triton"])
    assert plans[0] is plans[1] is plans[2]


def test_a_layer_with_another_head_layout_gets_its_own_plan(paged_batch, tol):
    q_lens, seq_lens = [1, 5], [40, 5]
    batch, q, k, v, meta = _step(paged_batch, q_lens, seq_lens, torch.float32, head_dim=64)
    triton_attention(q, k, v, batch.k_cache, batch.v_cache, meta, batch.scale)
    first = meta.backend_cache["triton"]
    other, q2, k2, v2, _ = _step(paged_batch, q_lens, seq_lens, torch.float32, head_dim=32)
    want = torch_attention(q2, k2, v2, other.k_cache.clone(), other.v_cache.clone(), meta,
                           other.scale)
    got = triton_attention(q2, k2, v2, other.k_cache, other.v_cache, meta, other.scale)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    assert meta.backend_cache["triton"] is not first
