"""KV-cache manager: which blocks each request holds, prefix-cache lookups, allocation and free."""

from __future__ import annotations

from llmserve.engine.block_pool import BlockPool, KVBlock, hash_block
from llmserve.engine.request import Request


class KVCacheManager:
    """Maps requests to block lists on top of a BlockPool.

    `allocate_slots` returns None when the pool cannot hold the request's next tokens: the
    scheduler decides what to do (preempt). Prefix-cache hits are full blocks whose chained hash
    and tokens match; the last prompt token is always recomputed so there are logits to sample.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
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
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, as (blocks, number of tokens they hold)."""
        if not self.enable_caching:
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
        hold them. The model runner mirrors the tables from these deltas.
        """
        held = self.req_blocks.get(request.request_id)
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
        # Hits that currently sit in the free queue stop being available once we take them.
        num_reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_reclaimed > self.pool.num_free_blocks:
            return None
        self.pool.touch(new_computed_blocks)
        blocks = self.req_blocks.setdefault(request.request_id, [])
        first_added = len(blocks)
        blocks.extend(new_computed_blocks)
        blocks.extend(self.pool.allocate(num_new_blocks))
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return [b.block_id for b in blocks[first_added:]]

    def free(self, request: Request) -> None:
        """Return every block the request holds (tail first, so its prefix stays cached longest)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

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
            if block.block_hash is None:
                self.pool.cache_block(
                    block, request.block_hashes[i], request.all_token_ids[i * bs : (i + 1) * bs]
                )
        self.num_cached_blocks[request.request_id] = max(start, num_full)
