"""BlockPool without a model: exact block ids, free-queue order, prefix-cache entries, eviction."""

from __future__ import annotations

import pytest

from llmserve.engine.block_pool import BlockPool, hash_block


def queue(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def test_fresh_pool_hands_out_blocks_in_id_order():
    pool = BlockPool(5)
    assert [b.block_id for b in pool.allocate(3)] == [0, 1, 2]
    assert queue(pool) == [3, 4]
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 0, 0]
    assert pool.usage() == pytest.approx(3 / 5)


def test_uncached_blocks_freed_tail_first_return_to_the_head_in_id_order():
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    pool.free(reversed(blocks))
    # Each uncached block goes to the head: 2, then 1 in front of it, then 0.
    assert queue(pool) == [0, 1, 2, 3, 4]
    assert [b.block_id for b in pool.allocate(2)] == [0, 1]


def test_cached_blocks_go_to_the_tail_and_are_evicted_last():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    h0 = hash_block(None, [1, 2])
    h1 = hash_block(h0, [3, 4])
    pool.cache_block(a, h0, [1, 2])
    pool.cache_block(b, h1, [3, 4])
    pool.free([b, a])  # tail first
    assert queue(pool) == [2, 3, 1, 0]
    assert pool.lookup(h0, [1, 2]) is a and pool.lookup(h1, [3, 4]) is b
    # Two allocations take the never-used blocks; the third evicts b (the tail of the prefix).
    assert [x.block_id for x in pool.allocate(2)] == [2, 3]
    assert [x.block_id for x in pool.allocate(1)] == [1]
    assert pool.lookup(h1, [3, 4]) is None and b.block_hash is None
    assert pool.lookup(h0, [1, 2]) is a  # the first block of the prefix outlives its tail
    assert queue(pool) == [0]


def test_touch_takes_a_free_cached_block_out_of_the_queue():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    h = hash_block(None, [5, 6])
    pool.cache_block(a, h, [5, 6])
    pool.free([a])
    assert queue(pool) == [1, 2, 0]
    pool.touch([a])
    assert a.ref_cnt == 1 and queue(pool) == [1, 2]
    pool.touch([a])  # a second holder: no queue change
    assert a.ref_cnt == 2
    pool.free([a])
    assert a.ref_cnt == 1 and queue(pool) == [1, 2]
    pool.free([a])
    assert queue(pool) == [1, 2, 0]  # back at the tail, still cached
    assert pool.lookup(h, [5, 6]) is a


def test_freeing_a_block_more_often_than_taken_raises():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a])


def test_allocating_more_than_free_raises():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3 blocks with 2 free"):
        pool.allocate(3)


def test_first_block_with_a_hash_wins_and_the_duplicate_stays_private():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = hash_block(None, [9, 9])
    pool.cache_block(a, h, [9, 9])
    pool.cache_block(b, h, [9, 9])
    assert pool.cached == {h: a} and b.block_hash is None
    pool.free([b])
    assert queue(pool) == [1, 2]  # uncached: to the head, handed out first


def test_lookup_checks_tokens_not_only_the_hash():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    h = hash_block(None, [1, 2])
    pool.cache_block(a, h, [1, 2])
    assert pool.lookup(h, [1, 2]) is a
    assert pool.lookup(h, [1, 3]) is None  # a hash collision is not a hit


def test_caching_disabled_never_publishes():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, hash_block(None, [1]), [1])
    assert pool.cached == {} and a.block_hash is None


def test_reset_prefix_cache_forgets_every_hash():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    h = hash_block(None, [1, 2])
    pool.cache_block(a, h, [1, 2])
    pool.reset_prefix_cache()
    assert pool.lookup(h, [1, 2]) is None and a.block_hash is None


def test_integrity_check_catches_a_lost_block():
    pool = BlockPool(3)
    pool.check_integrity()
    pool.free_queue.popitem(last=False)  # a block vanishes from the queue with ref_cnt 0
    with pytest.raises(RuntimeError, match="KV pool corrupt"):
        pool.check_integrity()


def test_a_pool_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
