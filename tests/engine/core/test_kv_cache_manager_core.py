"""KVCacheManager without a model: block tables, prefix hits, reclaiming and freeing, by id."""

from __future__ import annotations

from llmserve.engine.kv_cache_manager import KVCacheManager
from tests.engine.core.driver import make_request

PROMPT = list(range(1000, 1010))  # 10 tokens: two full blocks of 4 and a partial one


def computed(request, num_new: int) -> None:
    """What the scheduler does once it has scheduled `num_new` tokens."""
    request.num_computed_tokens += num_new


def test_prompt_gets_fresh_blocks_and_its_full_blocks_are_cached():
    kv = KVCacheManager(6, 4)
    r = make_request("a", PROMPT)
    assert kv.allocate_slots(r, 10) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert [b.block_hash is not None for b in kv.pool.blocks[:3]] == [True, True, False]
    assert list(kv.pool.free_queue) == [3, 4, 5]


def test_decode_reuses_the_last_block_until_it_is_full():
    kv = KVCacheManager(6, 4)
    r = make_request("a", PROMPT)
    kv.allocate_slots(r, 10)
    computed(r, 10)
    r.append_token(100)
    assert kv.allocate_slots(r, 1) == []  # token 11 fits block 2
    computed(r, 1)
    r.append_token(101)
    assert kv.allocate_slots(r, 1) == []  # token 12 fills block 2, which is now cached
    assert kv.pool.blocks[2].block_hash is not None
    computed(r, 1)
    r.append_token(102)
    assert kv.allocate_slots(r, 1) == [3]  # token 13 needs a new block
    assert kv.block_ids("a") == [0, 1, 2, 3]


def test_shared_prefix_hits_the_cached_blocks_and_shares_them():
    kv = KVCacheManager(6, 4)
    a = make_request("a", PROMPT)
    kv.allocate_slots(a, 10)
    b = make_request("b", PROMPT[:8] + [7, 7])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [x.block_id for x in hits] == [0, 1] and num_hit == 8
    assert kv.allocate_slots(b, 2, hits) == [0, 1, 3]
    assert [x.ref_cnt for x in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 8)


def test_the_last_prompt_token_is_never_a_hit():
    kv = KVCacheManager(6, 4)
    kv.allocate_slots(make_request("a", PROMPT), 10)
    same8 = make_request("b", PROMPT[:8])
    hits, num_hit = kv.get_computed_blocks(same8)
    # Both blocks are cached, but a full hit would leave no token to compute logits from.
    assert [x.block_id for x in hits] == [0] and num_hit == 4


def test_free_is_tail_first_so_a_prefix_is_evicted_from_its_end():
    kv = KVCacheManager(6, 4)
    r = make_request("a", PROMPT)
    kv.allocate_slots(r, 10)
    kv.free(r)
    # Block 2 (partial, uncached) goes to the head; cached 1 then 0 go to the tail.
    assert list(kv.pool.free_queue) == [2, 3, 4, 5, 1, 0]
    assert kv.block_ids("a") == [] and "a" not in kv.num_cached_blocks
    assert kv.num_free_blocks == 6


def test_hits_in_the_free_queue_count_against_free_blocks():
    kv = KVCacheManager(4, 4)
    first = make_request("a", PROMPT)
    kv.allocate_slots(first, 10)
    kv.free(first)
    assert list(kv.pool.free_queue) == [2, 3, 1, 0]
    too_long = make_request("b", PROMPT[:8] + list(range(2000, 2012)))  # 20 tokens, 5 blocks
    hits, _ = kv.get_computed_blocks(too_long)
    assert [x.block_id for x in hits] == [0, 1]
    # 3 fresh blocks + 2 reclaimed hits > 4 free: refused, and nothing moved.
    assert kv.allocate_slots(too_long, 12, hits) is None
    assert list(kv.pool.free_queue) == [2, 3, 1, 0] and kv.block_ids("b") == []
    fits = make_request("c", PROMPT[:8] + list(range(3000, 3008)))  # 16 tokens, 4 blocks
    hits, _ = kv.get_computed_blocks(fits)
    assert kv.allocate_slots(fits, 8, hits) == [0, 1, 2, 3]
    assert kv.num_free_blocks == 0


def test_evicted_prefix_is_no_longer_a_hit():
    kv = KVCacheManager(3, 4)
    first = make_request("a", PROMPT[:8] + [5])
    kv.allocate_slots(first, 9)
    kv.free(first)
    assert list(kv.pool.free_queue) == [2, 1, 0]
    other = make_request("b", list(range(50, 59)))
    assert kv.allocate_slots(other, 9) == [2, 1, 0]  # evicts block 1, then block 0
    assert kv.get_computed_blocks(make_request("c", PROMPT)) == ([], 0)


def test_without_caching_nothing_is_published_or_hit():
    kv = KVCacheManager(6, 4, enable_caching=False)
    kv.allocate_slots(make_request("a", PROMPT), 10)
    assert kv.pool.cached == {}
    assert kv.get_computed_blocks(make_request("b", PROMPT)) == ([], 0)
    assert kv.allocate_slots(make_request("b", PROMPT), 10) == [3, 4, 5]
