"""Sliding-window attention: the torch twin, the native C decode kernel and the Triton kernels
(interpreter on CPU) against a brute-force oracle, with released (-1) block table entries."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import cpu_native, ref
from llmserve.kernels.paged_decode import paged_decode_attention
from llmserve.kernels.prefill_attention import extend_attention

F32 = torch.float32


def brute_force(batch, window: int) -> torch.Tensor:
    """Each query row over its sequence's keys in (p - window, p], from contiguous K/V."""
    bs = batch.k_cache.shape[1]
    out = torch.empty_like(batch.q, dtype=F32)
    qsl, lens = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
    group = batch.q.shape[1] // batch.k_cache.shape[2]
    for b, seq_len in enumerate(lens):
        blocks = batch.block_tables[b, : -(-seq_len // bs)].long().clamp_min(0)
        k = batch.k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        v = batch.v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        q_len = qsl[b + 1] - qsl[b]
        for i in range(q_len):
            p = seq_len - q_len + i
            lo = max(0, p - window + 1)
            s = torch.einsum("hd,thd->ht", batch.q[qsl[b] + i].float(), k[lo : p + 1]) * batch.scale
            out[qsl[b] + i] = torch.einsum("ht,thd->hd", s.softmax(-1), v[lo : p + 1])
    return out


def release(batch, window: int):
    """Mark -1 the blocks that every query row of a sequence has left behind, as the engine
    does: a kernel that read one would fail (CPU) or read garbage."""
    bs = batch.k_cache.shape[1]
    q_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    for b, (q_len, seq_len) in enumerate(zip(q_lens, batch.seq_lens.tolist())):
        first_needed = max(0, seq_len - q_len - window + 1)
        batch.block_tables[b, : first_needed // bs] = -1
    return batch


# Decode rows (one query each) with contexts shorter than, equal to and longer than the window;
# one extend row per case: a fresh prompt longer than the window, a chunk after a long prefix.
DECODE = ([1, 1, 1, 1, 1], [3, 20, 21, 45, 150])
MIXED = ([1, 40, 7, 1, 25], [90, 40, 70, 5, 25 + 64])


@pytest.mark.parametrize("window", [1, 20, 33])
@pytest.mark.parametrize("case", [DECODE, MIXED])
def test_torch_twin_matches_brute_force(paged_batch, window, case):
    batch = release(paged_batch(*case, 2, 2, 32, 16, F32), window)
    want = brute_force(batch, window)
    got = ref.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                              batch.seq_lens, batch.block_tables, batch.scale, window=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [5, 33])
def test_native_decode_matches_brute_force(paged_batch, window):
    if cpu_native.load() is None:
        pytest.skip("native CPU kernel unavailable")
    batch = release(paged_batch(*MIXED, 2, 2, 32, 16, F32), window)
    got = ref.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                              batch.seq_lens, batch.block_tables, batch.scale, native=True,
                              window=window)
    torch.testing.assert_close(got, brute_force(batch, window), atol=1e-5, rtol=1e-5)


def test_twin_without_window_differs_when_the_context_is_longer():
    # The window is not a no-op: guards against a test that passes for any window.
    gen = torch.Generator().manual_seed(0)
    q, kc = torch.randn(1, 2, 32, generator=gen), torch.randn(4, 16, 2, 32, generator=gen)
    args = (q, kc, kc, torch.tensor([0, 1]), torch.tensor([50]), torch.tensor([[0, 1, 2, 3]]), 0.2)
    assert not torch.allclose(ref.paged_attention(*args), ref.paged_attention(*args, window=20))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [17, 40])
def test_triton_decode_with_window(paged_batch, tol, window, num_splits):
    batch = release(paged_batch(*DECODE, 1, 4, 32, 16, F32), window)
    out = paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_seq_len=150, num_splits=num_splits, window=window,
    )
    torch.testing.assert_close(out.float(), brute_force(batch, window), **tol(F32))


@pytest.mark.parametrize("window,block", [(20, None), (33, 16)])
def test_triton_extend_with_window(paged_batch, tol, window, block):
    batch = release(paged_batch([40, 7, 25], [40, 70, 89], 1, 2, 32, 16, F32), window)
    out = extend_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_query_len=batch.max_query_len, window=window,
        block_m=block, block_n=block,
    )
    torch.testing.assert_close(out.float(), brute_force(batch, window), **tol(F32))
