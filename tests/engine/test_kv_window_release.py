"""KVCacheManager with a sliding window, without a model: blocks behind the window go back to
the pool as the request advances, prefix hits behind it are never taken, -1 marks them."""

from __future__ import annotations

import numpy as np

from llmserve.engine.input_batch import InputBatch
from llmserve.engine.kv_cache_manager import KVCacheManager, released_blocks
from llmserve.engine.request import Request
from llmserve.engine.scheduler import SchedulerOutput
from llmserve.sampling_params import SamplingParams

BS, WINDOW = 4, 6


def make_request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=100), max_tokens=100)


def advance(kv: KVCacheManager, r: Request, n: int) -> list[int] | None:
    """What the scheduler does for one step of `n` tokens."""
    new = kv.allocate_slots(r, n)
    r.num_computed_tokens += n
    return new


def test_release_rule_matches_the_window_convention():
    # The next query is at position c; it sees keys > c - window, so key c - window and all
    # before it are gone: with window 6 and c = 10, keys 0..4 (block 0 = keys 0..3) are.
    assert released_blocks(10, 6, 4) == 1
    assert released_blocks(9, 6, 4) == 1
    assert released_blocks(8, 6, 4) == 0
    assert released_blocks(100, None, 4) == 0


def test_decode_past_the_window_holds_a_window_of_blocks():
    kv = KVCacheManager(8, BS, sliding_window=WINDOW)
    r = make_request("a", list(range(100, 110)))
    assert advance(kv, r, 10) == [0, 1, 2]
    held = []
    for t in range(30):
        r.append_token(200 + t)
        assert advance(kv, r, 1) is not None
        held.append(kv.num_held_blocks("a"))
        first_live = released_blocks(r.num_computed_tokens - 1, WINDOW, BS)
        assert kv.block_ids("a")[:first_live] == [-1] * first_live
        assert -1 not in kv.block_ids("a")[first_live:]
    # window / block_size + 1, plus the block the window edge cuts.
    assert max(held) <= -(-WINDOW // BS) + 1
    assert kv.num_free_blocks == 8 - kv.num_held_blocks("a")
    kv.free(r)
    assert kv.num_free_blocks == 8
    kv.pool.check_integrity()


def test_without_a_window_every_block_is_kept():
    kv = KVCacheManager(16, BS)
    r = make_request("a", list(range(100, 110)))
    advance(kv, r, 10)
    for t in range(20):
        r.append_token(200 + t)
        advance(kv, r, 1)
    assert kv.num_held_blocks("a") == 8 and -1 not in kv.block_ids("a")


def test_prefix_hits_behind_the_window_are_not_taken():
    kv = KVCacheManager(8, BS, sliding_window=WINDOW)
    prompt = list(range(100, 121))  # 21 tokens: 5 full blocks
    first = make_request("a", prompt)
    advance(kv, first, 21)
    kv.free(first)  # everything cached and free
    second = make_request("b", prompt)
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 20
    # Computing from position 20 needs keys >= 15: blocks 0-2 stay free, 3-4 are taken.
    added = kv.allocate_slots(second, 1, hits)
    assert added[:3] == [-1, -1, -1]
    assert [b.ref_cnt for b in hits] == [0, 0, 0, 1, 1]
    assert kv.num_held_blocks("b") == 3
    kv.free(second)
    kv.pool.check_integrity()


def test_a_cached_prefix_longer_than_the_window_fits_a_small_pool():
    # 5 cached blocks, hit again by a 29-token prompt (8 blocks, more than the 6-block pool).
    # Taking every hit plus 3 fresh blocks would need 8 free blocks: it would wait forever.
    kv = KVCacheManager(6, BS, sliding_window=WINDOW)
    prompt = list(range(100, 121))
    r = make_request("a", prompt)
    advance(kv, r, 21)
    kv.free(r)
    again = make_request("b", prompt + list(range(300, 308)))
    hits, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 20
    assert kv.allocate_slots(again, 9, hits) is not None
    assert kv.num_held_blocks("b") == 5
    kv.pool.check_integrity()


def test_runner_table_marks_the_same_entries():
    batch = InputBatch(2, 16, BS, release_window=WINDOW)
    r = make_request("a", list(range(100, 130)))
    sched = SchedulerOutput()
    sched.add(r, 30, list(range(8)))
    batch.update(sched)
    assert batch.block_ids("a") == list(range(8))  # a fresh prompt: nothing released yet
    r.num_computed_tokens = 30
    sched = SchedulerOutput()
    sched.add(r, 1, [])
    batch.update(sched)
    n = released_blocks(30, WINDOW, BS)
    assert n == 6
    assert batch.block_ids("a") == [-1] * n + [6, 7]
    assert np.all(batch.block_table[0, n:8] >= 0)
