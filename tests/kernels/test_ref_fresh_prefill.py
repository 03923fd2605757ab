"""Fresh prefills (no cached context) attend over their own keys with a causal SDPA; the result
must equal the padded, masked path over the paged cache (the oracle), in every mix."""

from __future__ import annotations

import pytest
import torch

from llmserve.kernels import ref


def _step(q_lens, seq_lens, heads=4, kv_heads=2, dim=16, block=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block) for s in seq_lens) + 1
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    tables, slots, next_block = [], [], 1
    width = max(-(-s // block) for s in seq_lens)
    for q_len, s_len in zip(q_lens, seq_lens):
        ids = list(range(next_block, next_block + -(-s_len // block)))
        next_block += len(ids)
        tables.append(ids + [0] * (width - len(ids)))
        slots += [ids[p // block] * block + p % block for p in range(s_len - q_len, s_len)]
    total = sum(q_lens)
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen)
    v = torch.randn(total, kv_heads, dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = (cu, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(tables, dtype=torch.int32))
    ref.store_kvcache(k, v, k_cache, v_cache, torch.tensor(slots))
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("q_lens,seq_lens", [
    ([7], [7]),  # one fresh prefill
    ([1, 1, 9, 5], [6, 3, 9, 5]),  # decodes, then two fresh prefills
    ([1, 4, 6, 3], [5, 10, 6, 3]),  # a decode, an extend over a prefix, two fresh prefills
])
@pytest.mark.parametrize("native", [False, True])
def test_fresh_prefill_equals_the_masked_path(q_lens, seq_lens, native):
    q, k, v, k_cache, v_cache, (cu, lens, tables) = _step(q_lens, seq_lens)
    oracle = ref.paged_attention_planned(
        q, k_cache, v_cache, ref.plan_paged_attention(cu, lens, tables, 4, native=native), 0.25)
    plan = ref.plan_paged_attention(cu, lens, tables, 4, native=native, fresh_prefill=True)
    assert plan.fresh  # the fresh rows did take the new path
    got = ref.paged_attention_planned(q, k_cache, v_cache, plan, 0.25, k, v)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)


def test_a_plan_with_fresh_prefills_needs_the_new_keys():
    q, _, _, k_cache, v_cache, (cu, lens, tables) = _step([3], [3])
    plan = ref.plan_paged_attention(cu, lens, tables, 4, fresh_prefill=True)
    with pytest.raises(ValueError, match="own k and v"):
        ref.paged_attention_planned(q, k_cache, v_cache, plan, 0.25)
