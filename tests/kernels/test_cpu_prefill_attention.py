"""The native causal prefill attention (`llmserve.kernels.cpu_prefill`) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.kernels import cpu_native, cpu_prefill, ref

pytestmark = pytest.mark.skipif(cpu_native.find_compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_prefill.load.cache_clear()
    if cpu_prefill.load() is None:  # with a compiler at hand, a failed build is a bug
        pytest.fail("the prefill attention did not build (see the warning logged by cpu_prefill)")


def _qkv(tokens: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """q, k, v as views of one fused [tokens, (heads + 2 kv_heads) * dim] buffer, as the model
    hands them over (row stride wider than the heads)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    q_end, k_end = heads * dim, (heads + kv_heads) * dim
    return (qkv[:, :q_end].view(tokens, heads, dim), qkv[:, q_end:k_end].view(tokens, kv_heads, dim),
            qkv[:, k_end:].view(tokens, kv_heads, dim))


def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _run(q, k, v, lens, first=1, scale=None):
    """Sequences of `lens` back to back from row `first`; returns (out, starts)."""
    starts = [first + sum(lens[:i]) for i in range(len(lens))]
    out = torch.full_like(q, 7.0).contiguous()  # rows outside the sequences must stay 7
    scale = q.shape[2] ** -0.5 if scale is None else scale
    cpu_prefill.causal_attention(out, q, k, v, torch.tensor(starts), torch.tensor(lens), scale)
    return out, starts


# (heads, kv heads, head_dim, lengths): GQA groups 1, 4 and 8, head_dim 16/32/64/128; lengths of
# one token, around the 16-token query blocks and the 32/64-key blocks, and several blocks long.
CASES = [
    (8, 2, 32, [1, 5, 16, 17, 100, 300]),
    (4, 4, 64, [33, 64, 65]),
    (8, 1, 128, [70]),
    (6, 2, 16, [40, 3]),
]


@pytest.mark.parametrize("heads,kv_heads,dim,lens", CASES)
def test_matches_causal_sdpa_per_sequence_and_leaves_other_rows(heads, kv_heads, dim, lens):
    q, k, v = _qkv(sum(lens) + 2, heads, kv_heads, dim)
    assert cpu_prefill.accepts(q, k, v)
    out, starts = _run(q, k, v, lens, scale=0.3)
    for a, n in zip(starts, lens):
        # Float rounding of 128-deep dot products differs by a few 1e-6 from SDPA's order.
        torch.testing.assert_close(out[a : a + n], _sdpa(q[a : a + n], k[a : a + n], v[a : a + n], 0.3),
                                   rtol=1e-4, atol=1e-5)
    assert torch.equal(out[0], torch.full_like(out[0], 7.0))
    assert torch.equal(out[-1], torch.full_like(out[-1], 7.0))


def test_large_scores_do_not_overflow_and_every_thread_count_gives_the_same_bits():
    q, k, v = _qkv(2 * 260, 8, 2, 32, seed=1)
    q.mul_(30)  # scores in the hundreds: the online softmax must rescale, not overflow
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, starts = _run(q, k, v, [260, 259], first=0)
        torch.set_num_threads(max(2, previous))
        spread, _ = _run(q, k, v, [260, 259], first=0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, spread)
    assert torch.isfinite(one[:519]).all()
    # Scores near 170 carry ~1e-5 of rounding into the weights: a looser bound than above.
    torch.testing.assert_close(one[:260], _sdpa(q[:260], k[:260], v[:260], 32**-0.5),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("rise", [3.0, 7.9, 8.1, 60.0])
def test_scores_rising_over_later_key_blocks_match_sdpa(rise):
    """Every query's scores rise by `rise` over the keys, so its maximum is in its last key
    block: a rise under the kernel's lazy margin (8) keeps the first block's running maximum,
    one above it makes later blocks raise it (and rescale what was summed)."""
    tokens, dim = 200, 32
    q, k, v = _qkv(tokens, 4, 1, dim, seed=2)
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(9)), dim=0)
    q.copy_(direction.expand_as(q))  # every query along one direction, unit length
    k.copy_(direction * torch.linspace(0, rise, tokens)[:, None, None] + 0.01 * k)
    out, starts = _run(q, k, v, [tokens], first=0, scale=1.0)
    torch.testing.assert_close(out[:tokens], _sdpa(q[:tokens], k[:tokens], v[:tokens], 1.0),
                               rtol=1e-4, atol=1e-5)


def test_accepts_only_what_the_kernel_reads():
    q, k, v = _qkv(4, 4, 2, 32)
    assert cpu_prefill.accepts(q, k, v)
    assert not cpu_prefill.accepts(q.double(), k.double(), v.double())
    q40, k40, v40 = _qkv(4, 4, 2, 40)  # not a multiple of 16: SDPA keeps it
    assert not cpu_prefill.accepts(q40, k40, v40)
    assert not cpu_prefill.accepts(q.transpose(0, 1), k, v)  # heads not contiguous per token
    q3, k3, v3 = _qkv(4, 3, 2, 32)  # 3 query heads do not group over 2 KV heads
    assert not cpu_prefill.accepts(q3, k3, v3)


def test_bad_segments_raise_instead_of_reading_past_the_rows():
    q, k, v = _qkv(8, 4, 2, 32)
    out = torch.empty_like(q).contiguous()
    with pytest.raises(ValueError, match="past the 8 rows"):
        cpu_prefill.causal_attention(out, q, k, v, torch.tensor([4]), torch.tensor([5]), 1.0)
    with pytest.raises(ValueError, match="int64"):
        cpu_prefill.causal_attention(out, q, k, v, torch.tensor([0], dtype=torch.int32),
                                     torch.tensor([2], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="contiguous int64"):  # read through a raw pointer
        cpu_prefill.causal_attention(out, q, k, v, torch.tensor([0, 9, 4])[::2],
                                     torch.tensor([2, 9, 3])[::2], 1.0)
    with pytest.raises(ValueError, match="sequence length"):
        cpu_prefill.causal_attention(out, q, k, v, torch.tensor([3]), torch.tensor([-1]), 1.0)


def test_plan_sends_fresh_prefills_to_the_kernel_and_matches_the_torch_plan():
    heads, kv_heads, dim, block = 4, 2, 32, 4
    q_lens, seq_lens = [1, 6, 3, 9], [5, 6, 8, 9]  # a decode, a fresh prefill, an extend, fresh
    g = torch.Generator().manual_seed(3)
    width = max(-(-s // block) for s in seq_lens)
    k_cache = torch.randn(len(seq_lens) * width + 1, block, kv_heads, dim, generator=g)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(1, len(seq_lens) * width + 1, dtype=torch.int32).view(len(seq_lens), width)
    slots = torch.cat([tables[i].long().repeat_interleave(block)[s - n : s] * block
                       + torch.arange(s - n, s) % block
                       for i, (n, s) in enumerate(zip(q_lens, seq_lens))])
    q, k, v = _qkv(sum(q_lens), heads, kv_heads, dim, seed=4)
    ref.store_kvcache(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    plan = ref.plan_paged_attention(cu, lens, tables, block, native=True, fresh_prefill=True)
    assert plan.fresh == [(1, 7), (10, 19)] and plan.fresh_native is not None
    assert plan.chunks is not None and plan.chunks.starts.tolist() == [7]  # the extend
    assert all(g.pad_index is None for g in plan.groups)  # no padded torch group left
    got = ref.paged_attention_planned(q, k_cache, v_cache, plan, 0.2, k, v)
    oracle = ref.paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.2)  # padded torch path
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=2e-6)
    plan.use_torch_for_chunks()  # what a layer whose tensors the kernel refuses gets
    assert plan.chunks is None
    torch.testing.assert_close(ref.paged_attention_planned(q, k_cache, v_cache, plan, 0.2, k, v),
                               oracle, rtol=1e-5, atol=2e-6)


def _paged_case(heads, kv_heads, dim, block, ctx, lens, seed=0):
    """Chunks of `lens` rows after `ctx` cached positions, their blocks scattered over a cache:
    (q, k_cache, v_cache, query_start_loc, seq_lens, tables), q rows from row 1 (row 0 and the
    last row belong to no chunk)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx, lens)]
    width = max(-(-s // block) for s in seq_lens) + 1  # one spare column: never read
    blocks = torch.randperm(len(lens) * width + 3, generator=g)[: len(lens) * width]
    tables = blocks.view(len(lens), width).to(torch.int32)
    k_cache = torch.randn(len(lens) * width + 3, block, kv_heads, dim, generator=g)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(lens) + 2, heads, dim, generator=g)
    cu = torch.tensor([1, *(1 + torch.tensor(lens).cumsum(0)).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables


# (heads, kv heads, head_dim, block size, cached context, chunk rows): contexts of none, one
# token, around a block and the 64-key blocks and several of them; chunks of one row and around
# the 16-token query blocks.
PAGED_CASES = [
    (8, 2, 32, 16, [0, 1, 15, 16, 17, 63, 64, 300], [5, 16, 17, 1, 40, 2, 64, 33]),
    (4, 4, 64, 4, [7, 100], [9, 70]),
    (8, 1, 128, 16, [200], [20]),
    (6, 2, 16, 12, [30, 5], [3, 50]),
]


@pytest.mark.parametrize("heads,kv_heads,dim,block,ctx,lens", PAGED_CASES)
def test_paged_chunks_match_the_padded_torch_path(heads, kv_heads, dim, block, ctx, lens):
    q, k_cache, v_cache, cu, seq_lens, tables = _paged_case(heads, kv_heads, dim, block, ctx, lens)
    assert cpu_prefill.accepts_paged(q, k_cache, v_cache)
    out = torch.full_like(q, 7.0)
    starts = cu[:-1].long()
    batch = cpu_prefill.chunks(starts, torch.tensor(lens), torch.tensor(ctx), tables)
    cpu_prefill.paged_prefill_attention(out, q, k_cache, v_cache, batch, 0.3)
    # The padded torch oracle attends from row 0: give it the chunk rows only.
    rows = q[1:-1]
    oracle = ref.paged_attention(rows, k_cache, v_cache, cu - 1, seq_lens, tables, 0.3)
    torch.testing.assert_close(out[1:-1], oracle, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[0], torch.full_like(out[0], 7.0))
    assert torch.equal(out[-1], torch.full_like(out[-1], 7.0))


def test_paged_chunks_give_the_same_bits_on_every_thread_count():
    q, k_cache, v_cache, cu, _, tables = _paged_case(8, 2, 32, 16, [90, 0, 33], [70, 40, 65], 5)
    batch = cpu_prefill.chunks(cu[:-1], torch.tensor([70, 40, 65]), torch.tensor([90, 0, 33]),
                               tables)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, previous)):
            torch.set_num_threads(threads)
            out = torch.zeros_like(q)
            cpu_prefill.paged_prefill_attention(out, q, k_cache, v_cache, batch, 0.2)
            outs.append(out)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(*outs)


def test_paged_chunks_refuse_blocks_outside_the_cache():
    q, k_cache, v_cache, cu, _, tables = _paged_case(4, 2, 32, 4, [6], [3])
    out = torch.empty_like(q)

    def run(ctx, lens, tables):
        batch = cpu_prefill.chunks(cu[:-1], torch.tensor(lens), torch.tensor(ctx), tables)
        cpu_prefill.paged_prefill_attention(out, q, k_cache, v_cache, batch, 1.0)

    bad = tables.clone()
    bad[0, 1] = k_cache.shape[0]  # read: positions 4..7
    with pytest.raises(ValueError, match="outside the cache"):
        run([6], [3], bad)
    bad[0, 1] = -1
    with pytest.raises(ValueError, match="outside the cache"):
        run([6], [3], bad)
    unread = tables.clone()
    unread[0, -1] = -1  # past the chunk's blocks: never read, so accepted
    run([6], [3], unread)
    with pytest.raises(ValueError, match="past its block-table row"):
        run([6 + 4 * tables.shape[1]], [3], tables)
    with pytest.raises(ValueError, match="negative"):
        run([-1], [3], tables)
    with pytest.raises(ValueError, match=f"runs past the {q.shape[0]} rows of q"):
        run([6], [q.shape[0] - int(cu[0]) + 1], tables)  # one row more than q has
    assert not cpu_prefill.accepts_paged(q, k_cache.double(), v_cache.double())
    assert not cpu_prefill.accepts_paged(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2))


def test_native_kernels_switch_keeps_fresh_prefills_on_sdpa(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    cpu_prefill.load.cache_clear()
    try:
        assert cpu_prefill.load() is None
        cu, lens = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
        plan = ref.plan_paged_attention(cu, lens, torch.zeros(1, 2, dtype=torch.int32), 4,
                                        native=True, fresh_prefill=True)
        assert plan.fresh == [(0, 5)] and plan.fresh_native is None
    finally:
        monkeypatch.delenv(cpu_native.ENV_SWITCH)
        cpu_prefill.load.cache_clear()


def test_a_nan_key_reaches_exactly_the_queries_that_see_it():
    """A NaN key (in a full block of keys, whose softmax takes the unmasked path) makes NaN
    every output that attends to it, as SDPA's do, and no other."""
    tokens = 150
    q, k, v = _qkv(tokens, 4, 2, 32, seed=5)
    k[70, 1, 3] = float("nan")
    out, _ = _run(q, k, v, [tokens], first=0, scale=0.2)
    want = _sdpa(q, k, v, 0.2)
    assert torch.equal(out.isnan(), want.isnan())
    assert out[70:, 2:].isnan().all() and not out[:70].isnan().any() and not out[:, :2].isnan().any()
    torch.testing.assert_close(out[:70], want[:70], rtol=1e-4, atol=1e-5)
