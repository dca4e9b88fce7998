"""BlockPool: the ids of fixed-size KV blocks, their reference counts and the prefix index.

A block holds `block_size` consecutive tokens' keys and values in every full-attention layer
(the tensors live in workers/cache.py; this file only does the bookkeeping). Block 0 is the
null block: never handed out, always zero, the padding of gathered block tables.

A block is free (refcount 0, no content worth keeping), in use (refcount > 0), or cached
(refcount 0 but holding a full prompt block registered under its chain hash, see
workers/prefix_cache.py). Cached blocks are reused by a later request with the same prefix,
or evicted least-recently-released first when the free list runs dry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

NULL_BLOCK = 0


class CacheFullError(RuntimeError):
    """No free slot or KV block is left."""


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[bytes], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: need >= 2 (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed; LRU first
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.on_evict = on_evict
        self.evictions = 0

    @property
    def num_available(self) -> int:
        """Blocks that `allocate` can hand out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            raise CacheFullError(f"all {self.num_usable} KV blocks are in use")
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.refcount[block] == 0:
            self._cached.pop(block)  # a cached block comes back into use
        self.refcount[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; tail first, so a sequence's last blocks are the
        first evicted (its prefix stays cached longest)."""
        for block in reversed(blocks):
            if block == NULL_BLOCK:
                continue
            if self.refcount[block] <= 0:
                raise ValueError(f"block {block} released more often than taken")
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self.hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------- prefix index
    def register(self, block: int, block_hash: bytes) -> bool:
        """Index an in-use full prompt block under its chain hash; False when another block
        already holds that content (this one then stays private)."""
        if block_hash in self.by_hash or block in self.hash_of:
            return False
        self.by_hash[block_hash] = block
        self.hash_of[block] = block_hash
        return True

    def lookup(self, block_hash: bytes) -> int | None:
        return self.by_hash.get(block_hash)

    def _forget(self, block: int) -> None:
        block_hash = self.hash_of.pop(block)
        del self.by_hash[block_hash]
        if self.on_evict is not None:
            self.on_evict(block_hash)
