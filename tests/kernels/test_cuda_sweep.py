"""A wider sweep, bf16 included, that only runs compiled on a CUDA GPU (too slow interpreted)."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import ops, ref
from llmserve.kernels.paged_decode import paged_decode_attention
from llmserve.kernels.prefill_attention import extend_attention

pytestmark = pytest.mark.cuda

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (group, head_dim, block_size): each value at least twice, without the full product, because
# every combination is a separate compile.
SHAPES = [(1, 64, 16), (4, 128, 16), (8, 128, 32), (4, 64, 64), (8, 64, 16), (2, 128, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_decode_sweep(paged_batch, tol, dtype, group, head_dim, block_size):
    lens = [1, block_size - 1, block_size, block_size + 1, 777, 4099, 2 * block_size]
    batch = paged_batch([1] * len(lens), lens, 4, group, head_dim, block_size, dtype)
    for splits in (None, 1, 5):
        out = paged_decode_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, max_seq_len=max(lens), num_splits=splits,
        )
        torch.testing.assert_close(out.float(), batch.reference(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_extend_sweep(paged_batch, tol, dtype, group, head_dim, block_size):
    q_lens = [1, block_size + 1, 300, 64, 1000]
    seq_lens = [1, block_size + 1, 300 + 517, 64 + 2 * block_size, 1000]
    batch = paged_batch(q_lens, seq_lens, 2, group, head_dim, block_size, dtype)
    out = extend_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_query_len=batch.max_query_len,
    )
    torch.testing.assert_close(out.float(), batch.reference(), **tol(dtype))


@pytest.mark.parametrize("head_dim", [80, 96])
def test_padded_head_dims_in_bf16(paged_batch, tol, head_dim):
    batch = paged_batch([1, 40, 1], [900, 100, 33], 2, 4, head_dim, 16, torch.bfloat16)
    out = torch.empty_like(batch.q)
    extend_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                     batch.block_tables, batch.scale, max_query_len=40, out=out,
                     skip_decode_rows=True)
    paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                           batch.seq_lens, batch.block_tables, batch.scale, out=out,
                           max_seq_len=900)
    torch.testing.assert_close(out.float(), batch.reference(), **tol(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_dispatch_to_triton_and_match_ref(tol, dtype):
    device = torch.device("cuda")
    x = torch.randn(37, 1024, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(1024, device=device, dtype=dtype)
    got, got_res = ops.rms_norm(x, weight, 1e-6, residual)
    want, want_res = ref.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(got, want, **tol(dtype))
    torch.testing.assert_close(got_res, want_res, **tol(dtype))
    gate_up = torch.randn(37, 2 * 3072, device=device, dtype=dtype)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), **tol(dtype))
    qkv = torch.randn(37, (16 + 2 * 8) * 128, device=device, dtype=dtype)
    q = qkv[:, : 16 * 128].view(37, 16, 128)
    k = qkv[:, 16 * 128 : 24 * 128].view(37, 8, 128)
    positions = torch.randint(0, 4096, (37,), device=device)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=device).float() / 128))
    freqs = torch.outer(torch.arange(4096, device=device).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    got_q, got_k = ops.rotary_embedding(positions, q, k, cache)
    assert got_q.data_ptr() == q.data_ptr()  # in place on CUDA
    torch.testing.assert_close(got_q, want_q, **tol(dtype))
    torch.testing.assert_close(got_k, want_k, **tol(dtype))
    k_new = torch.randn(37, 8, 128, device=device, dtype=dtype)
    k_cache = torch.zeros(8, 16, 8, 128, device=device, dtype=dtype)
    slots = torch.randperm(128, device=device)[:37]
    slots[::5] = -1
    k_want = k_cache.clone()
    ref.store_kvcache(k_new, k_new, k_want, k_want.clone(), slots)
    ops.store_kvcache(k_new, k_new, k_cache, k_cache.clone(), slots)
    assert torch.equal(k_cache, k_want)
