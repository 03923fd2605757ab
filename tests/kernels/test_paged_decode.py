"""Split-KV paged decode attention against the torch twin (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels.paged_decode import choose_num_splits, paged_decode_attention

F32, F16 = torch.float32, torch.float16

# (kv_heads, group, head_dim, block_size, dtype): every GQA ratio, head_dim, block size and
# dtype appears at least once without running the full product under the slow interpreter.
CASES = [
    (2, 1, 64, 16, F32),
    (1, 4, 128, 32, F16),
    (1, 8, 64, 32, F32),
    (2, 4, 64, 16, F16),
    (1, 8, 128, 16, F16),
]


def _lengths(block_size: int) -> list[int]:
    return [1, block_size - 1, block_size, block_size + 1, 20 * block_size + 3]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_heads,group,head_dim,block_size,dtype", CASES)
def test_decode_matches_ref_across_lengths_and_splits(
    paged_batch, tol, kv_heads, group, head_dim, block_size, dtype, num_splits
):
    lens = _lengths(block_size)
    batch = paged_batch([1] * len(lens), lens, kv_heads, group, head_dim, block_size, dtype)
    out = paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_seq_len=max(lens), num_splits=num_splits,
    )
    torch.testing.assert_close(out.float(), batch.reference(), **tol(dtype))


@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_pads_head_dims_that_are_not_powers_of_two(paged_batch, tol, head_dim):
    batch = paged_batch([1, 1], [7, 40], 2, 2, head_dim, 16, F16)
    out = paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, num_splits=2,
    )
    torch.testing.assert_close(out.float(), batch.reference(), **tol(F16))


def test_decode_leaves_rows_with_several_queries_untouched(paged_batch, tol):
    batch = paged_batch([3, 1, 2, 1], [10, 20, 35, 17], 2, 4, 64, 16, F32)
    out = torch.full_like(batch.q, 7.0)
    paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, out=out, num_splits=2,
    )
    decode_rows = [3, 6]
    torch.testing.assert_close(out[decode_rows], batch.reference()[decode_rows], **tol(F32))
    assert bool((out[[0, 1, 2, 4, 5]] == 7.0).all())


def test_num_splits_fills_the_gpu_for_small_batches_and_stays_one_for_large():
    # 2 x 132 programs over 8 KV heads asks for 33 slices; 32 of 512 tokens cover 16k exactly.
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=16384, sms=132) == 32
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=512, sms=132) == 2
    assert choose_num_splits(batch=1, num_kv_heads=1, max_seq_len=10**6, sms=132) == 64
    assert choose_num_splits(batch=256, num_kv_heads=8, max_seq_len=16384, sms=132) == 1
    assert choose_num_splits(batch=4, num_kv_heads=8, max_seq_len=100, sms=132) == 1


def test_decode_rejects_block_sizes_that_are_not_powers_of_two(paged_batch):
    batch = paged_batch([1], [30], 1, 2, 64, 24, F32)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale,
        )


def test_decode_rejects_head_counts_that_do_not_divide(paged_batch):
    batch = paged_batch([1], [30], 2, 2, 64, 16, F32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(
            batch.q[:, :3], batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale,
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("block_n", [32, 64])
def test_num_splits_cut_the_longest_context_into_whole_tiles_and_no_empty_slice(block_n):
    for batch in (1, 2, 3, 8, 16, 40):
        for kv_heads in (1, 2, 8):
            for length in (1, 255, 256, 511, 1000, 4096, 16384, 100_003):
                n = choose_num_splits(batch, kv_heads, length, sms=132, block_n=block_n)
                assert 1 <= n <= 64
                if n == 1:
                    continue
                # The kernel's own slice length for the longest sequence.
                per_split = _cdiv(_cdiv(length, n), block_n) * block_n
                assert per_split >= 256, (batch, kv_heads, length, n)
                assert (n - 1) * per_split < length <= n * per_split, (batch, kv_heads, length, n)
