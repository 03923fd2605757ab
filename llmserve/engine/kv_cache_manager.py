"""KV-cache manager: which blocks each request holds, prefix-cache lookups, allocation and free.

Sliding windows: when every layer of the model is windowed (`sliding_window` set here, see
`llmserve.attention.windows.kv_release_window`), a block that no query of the request can see
any more (every position in it is <= the next query's position - window) goes back to the pool
while the request runs; its slot in the request's list becomes None and the runner's block
table holds -1 there, which no kernel reads. A long request then holds about
window / block_size + 1 blocks. A released block keeps its prefix-cache hash while it sits in
the free queue: its contents stay valid until the pool hands it out again, which evicts the
hash, so a hit only ever finds intact blocks (and chained hashes stop at the first evicted one).
Models with any full-attention layer keep every block (one block table serves all layers).
"""

from __future__ import annotations

from llmserve.engine.block_pool import BlockPool, KVBlock, hash_block
from llmserve.engine.request import Request


class KVCacheManager:
    """Maps requests to block lists on top of a BlockPool.

    `allocate_slots` returns None when the pool cannot hold the request's next tokens: the
    scheduler decides what to do (preempt). Prefix-cache hits are full blocks whose chained hash
    and tokens match; the last prompt token is always recomputed so there are logits to sample.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        # None marks a block released because it fell out of the sliding window.
        self.req_blocks: dict[str, list[KVBlock | None]] = {}
        # How many leading entries of each request's list were released (sliding window only).
        self.num_released: dict[str, int] = {}
        # How many leading blocks of each request were already offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table; -1 where a block was released (out of the window)."""
        return [-1 if b is None else b.block_id for b in self.req_blocks.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        return sum(b is not None for b in self.req_blocks.get(request_id, ()))

    def peak_blocks(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` tokens holds at once, when no step
        computes more than `max_step_tokens` of its tokens: all of them, or under a sliding
        window the blocks of its last window plus one step (and one partly outside)."""
        needed = self.blocks_needed(num_tokens)
        if self.sliding_window is None:
            return needed
        return min(needed, self.blocks_needed(self.sliding_window - 1 + max_step_tokens) + 1)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, as (blocks, number of tokens they hold)."""
        # A request that wants its prompt's logprobs computes every prompt position (as vLLM
        # does): a hit would skip the rows they are read from. Its blocks are still cached.
        if not self.enable_caching or request.prompt_logprobs_pending:
            return [], 0
        self._update_block_hashes(request)
        # Never the whole sequence: the last token is recomputed so there are logits to sample.
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        bs = self.block_size
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, request.all_token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * bs
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        Returns the ids of the blocks this call added to the request's table (prefix hits
        first, then fresh blocks; empty when it already had room), or None if the pool cannot
        hold them. The model runner mirrors the tables from these deltas. Under a sliding
        window, blocks behind it are released first, and prefix hits behind it are not taken
        (-1 in the returned ids).
        """
        held = self.req_blocks.get(request.request_id)
        if held is not None and self.sliding_window is not None:
            self._release_outside_window(request.request_id, held, request.num_computed_tokens)
        if held is not None and not new_computed_blocks:
            # The usual decode: room in the last block and no block filled up this step.
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= len(held) * self.block_size and (
                not self.enable_caching
                or num_tokens // self.block_size <= self.num_cached_blocks.get(request.request_id, 0)
            ):
                return []
        new_computed_blocks = new_computed_blocks or []
        held = held or []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_needed = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, total_needed - len(held) - len(new_computed_blocks))
        # Hits already behind the window are not taken at all (they stay cached and free), so
        # a long cached prompt never needs more free blocks than its window.
        skip = 0
        if not held:
            skip = min(released_blocks(num_computed, self.sliding_window, self.block_size),
                       len(new_computed_blocks))
        hits = new_computed_blocks[skip:]
        # Hits that currently sit in the free queue stop being available once we take them.
        num_reclaimed = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks + num_reclaimed > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        blocks = self.req_blocks.setdefault(request.request_id, [])
        first_added = len(blocks)
        blocks.extend([None] * skip)
        if skip:
            self.num_released[request.request_id] = skip
        blocks.extend(hits)
        blocks.extend(self.pool.allocate(num_new_blocks))
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return [-1 if b is None else b.block_id for b in blocks[first_added:]]

    def free(self, request: Request) -> None:
        """Return every block the request holds (tail first, so its prefix stays cached longest)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self.num_released.pop(request.request_id, None)
        if blocks:
            self.pool.free(b for b in reversed(blocks) if b is not None)

    def _release_outside_window(
        self, request_id: str, blocks: list[KVBlock | None], num_computed: int
    ) -> None:
        """Give back the blocks no query from position `num_computed` on can see."""
        end = min(released_blocks(num_computed, self.sliding_window, self.block_size), len(blocks))
        start = self.num_released.get(request_id, 0)
        if end <= start:
            return
        gone = [b for b in blocks[start:end] if b is not None]
        blocks[start:end] = [None] * (end - start)
        self.num_released[request_id] = end
        self.pool.free(reversed(gone))

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        """Publish blocks that are full once this step's tokens are written."""
        self._update_block_hashes(request)
        bs = self.block_size
        num_full = min(num_tokens // bs, len(request.block_hashes), len(blocks))
        start = self.num_cached_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            block = blocks[i]
            if block is not None and block.block_hash is None:
                self.pool.cache_block(
                    block, request.block_hashes[i], request.all_token_ids[i * bs : (i + 1) * bs]
                )
        self.num_cached_blocks[request.request_id] = max(start, num_full)


def released_blocks(num_computed: int, window: int | None, block_size: int) -> int:
    """How many leading blocks of a sequence no query at position >= `num_computed` can see
    under a sliding `window` (0 without one). The KV manager releases exactly these, and the
    model runner marks exactly these -1 in its block table: both must use this rule."""
    if window is None:
        return 0
    return max(0, num_computed - window + 1) // block_size
