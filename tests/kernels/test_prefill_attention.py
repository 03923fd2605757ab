"""Prefill / extend attention over the paged cache against the torch twin."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels.prefill_attention import extend_attention

F32, F16 = torch.float32, torch.float16


def _run(batch, **kwargs) -> torch.Tensor:
    return extend_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_query_len=batch.max_query_len, **kwargs,
    )


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,block_size,dtype",
    [(2, 1, 64, 16, F32), (1, 4, 128, 32, F16), (1, 8, 64, 32, F16), (2, 4, 128, 16, F32)],
)
def test_prefill_matches_ref_for_lengths_around_the_block_size(
    paged_batch, tol, kv_heads, group, head_dim, block_size, dtype
):
    lens = [1, block_size - 1, block_size, block_size + 1, 8 * block_size + 5]
    batch = paged_batch(lens, lens, kv_heads, group, head_dim, block_size, dtype)
    torch.testing.assert_close(_run(batch).float(), batch.reference(), **tol(dtype))


@pytest.mark.parametrize("dtype", [F32, F16])
def test_extend_reads_the_cached_prefix(paged_batch, tol, dtype):
    # Prefix hits (block-aligned and not) and a chunk in the middle of a chunked prefill.
    q_lens, seq_lens = [5, 17, 2, 30], [37, 49, 18, 30 + 64]
    batch = paged_batch(q_lens, seq_lens, 2, 4, 64, 16, dtype)
    torch.testing.assert_close(_run(batch).float(), batch.reference(), **tol(dtype))


def test_small_tiles_cross_the_diagonal_in_several_places(paged_batch, tol):
    # BLOCK_M = BLOCK_N = 16 with a 37-token prefix: several query tiles, each with
    # unmasked tiles below the diagonal and masked tiles on it.
    batch = paged_batch([40, 23], [77, 23], 1, 4, 64, 16, F32)
    out = _run(batch, block_m=16, block_n=16)
    torch.testing.assert_close(out.float(), batch.reference(), **tol(F32))


def test_skip_decode_rows_leaves_single_token_rows_untouched(paged_batch, tol):
    batch = paged_batch([1, 6, 1, 3], [9, 20, 33, 3], 2, 2, 64, 16, F32)
    out = torch.full_like(batch.q, 7.0)
    _run(batch, out=out, skip_decode_rows=True)
    long_rows = [1, 2, 3, 4, 5, 6, 8, 9, 10]
    torch.testing.assert_close(out[long_rows], batch.reference()[long_rows], **tol(F32))
    assert bool((out[[0, 7]] == 7.0).all())


def test_extend_pads_head_dim_96(paged_batch, tol):
    batch = paged_batch([4, 9], [20, 9], 1, 2, 96, 16, F16)
    torch.testing.assert_close(_run(batch).float(), batch.reference(), **tol(F16))
