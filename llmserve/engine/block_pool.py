"""The KV block pool: ref-counted blocks, an LRU queue of free blocks, and the prefix cache.

A block with ref_cnt 0 sits in the free queue. If it holds a full, hashed block of tokens it stays
findable in the prefix cache until it is handed out again (evicted). Freed requests put their
blocks in tail-first, so a request's last (least shareable) blocks are evicted before its first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class KVBlock:
    """One block of `block_size` token slots in every layer's KV cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of a full block: it identifies the block together with everything before it."""
    return hash((parent_hash, tuple(token_ids)))


class BlockPool:
    """Owns every block; hands them out and takes them back."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Ordered oldest-first: the head is evicted first. OrderedDict gives O(1) removal from
        # the middle when a cached block is hit.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        """Return the cached block for this chained hash if its tokens really match."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def allocate(self, n: int) -> list[KVBlock]:
        """Take `n` blocks from the head of the free queue, evicting their cached contents."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference on each block, in the given order (callers pass tail-first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"{block} freed more often than it was taken")
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    # Nothing to reuse: put it at the head so it is handed out first.
                    self.free_queue[block.block_id] = None
                    self.free_queue.move_to_end(block.block_id, last=False)
                else:
                    self.free_queue[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: int, token_ids: Sequence[int]) -> None:
        """Publish a full block in the prefix cache (the first block with a hash wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
            block.token_ids = None
        self.cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None

    def check_integrity(self) -> None:
        """Raise if free + in-use does not add up to the pool (an idle-time sanity check)."""
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        free = sum(1 for b in self.blocks if b.ref_cnt == 0)
        if free != len(self.free_queue) or in_use + free != self.num_blocks:
            raise RuntimeError(
                f"KV pool corrupt: {in_use} in use + {len(self.free_queue)} queued != {self.num_blocks}"
            )
