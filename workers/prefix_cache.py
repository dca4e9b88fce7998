"""Exact prefix caching for the hybrid model: shared KV blocks + DeltaNet state snapshots.

Shape legend (snapshot store)
    R  snapshot rows     C  conv channels    Kc conv kernel - 1    Hv, Dk, Dv DeltaNet dims

Full prompt blocks are named by chained hashes (sha256 of the parent hash and the block's
token ids; the root is salted with the model config, dtype and block size) and indexed in the
BlockPool, so a later prompt with the same prefix reuses their KV. The DeltaNet layers cannot
be restarted from KV: their conv + recurrent state is kept only at boundaries (every
`prefix_snapshot_every` tokens of a prompt, and at the last block boundary before each prompt's
end), and prefill chunks are cut to end on them. A hit resumes from the deepest snapshot
inside the matched prefix, shares the blocks before it and recomputes the rest of the prompt
(at least its last token, whose logits are needed). Snapshots live in a fixed budget of rows,
evicted least recently used; a snapshot goes when its block is evicted from the pool.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from workers.cache import HybridCache
from workers.config import ModelConfig
from workers.requests import Request


@dataclass(frozen=True)
class PrefixHit:
    tokens: int  # prompt tokens whose KV and DeltaNet state come from the cache
    blocks: tuple[int, ...]  # their blocks
    snapshot_hash: bytes | None
    idle: int  # of those blocks, how many are unreferenced (they leave the free count)

    @classmethod
    def none(cls) -> PrefixHit:
        return cls(0, (), None, 0)


def prefix_salt(model: ModelConfig, dtype: torch.dtype, block_size: int) -> bytes:
    return hashlib.sha256(repr((model, str(dtype), block_size)).encode()).digest()


def chain_hashes(tokens: list[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Hash of every full block of `tokens`, each covering the whole prefix up to its end."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    width = 4 * block_size
    out, parent = [], salt
    for i in range(len(tokens) // block_size):
        parent = hashlib.sha256(parent + data[i * width : (i + 1) * width]).digest()
        out.append(parent)
    return out


class PrefixCache:
    def __init__(self, cache: HybridCache) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.every = cache.settings.prefix_snapshot_every
        self.salt = prefix_salt(cache.config, cache.dtype, self.block_size)
        rows = cache.plan.num_snapshots
        self.conv = {i: cache.conv[i].new_empty(rows, *cache.conv[i].shape[1:]) for i in cache.conv}
        self.ssm = {i: cache.ssm[i].new_empty(rows, *cache.ssm[i].shape[1:]) for i in cache.ssm}
        self.rows: OrderedDict[bytes, int] = OrderedDict()  # boundary hash -> row, LRU first
        self._free_rows = list(range(rows - 1, -1, -1))
        cache.pool.on_evict = self.drop
        self.queried_tokens = 0  # prompt tokens of admitted requests
        self.hit_tokens = 0  # of those, tokens served from the cache
        self.snapshots_taken = 0

    # --------------------------------------------------------------- admission
    def match(self, req: Request) -> PrefixHit:
        """The deepest snapshot boundary inside the request's cached prompt prefix."""
        hashes = self._hashes(req)
        pool, last = self.cache.pool, len(req.prompt_ids) - 1
        blocks, best = [], 0
        for i, h in enumerate(hashes):
            block = pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
            if (i + 1) * self.block_size <= last and h in self.rows:
                best = i + 1
        if not best:
            return PrefixHit.none()
        kept = tuple(blocks[:best])
        idle = sum(1 for b in kept if pool.refcount[b] == 0)
        return PrefixHit(best * self.block_size, kept, hashes[best - 1], idle)

    def apply(self, req: Request, hit: PrefixHit) -> None:
        """Start the newly admitted request's slot from the hit."""
        if req.cached_tokens is None:  # first admission (not a resume after preemption)
            req.cached_tokens = hit.tokens
            self.queried_tokens += len(req.prompt_ids)
            self.hit_tokens += hit.tokens
        req.num_registered = len(hit.blocks)
        if not hit.tokens:
            return
        self.cache.adopt(req.slot, list(hit.blocks), hit.tokens)
        row = self.rows[hit.snapshot_hash]
        self.rows.move_to_end(hit.snapshot_hash)
        for layer in self.conv:
            self.cache.conv[layer][req.slot] = self.conv[layer][row]
            self.cache.ssm[layer][req.slot] = self.ssm[layer][row]
        req.num_computed = hit.tokens

    # ---------------------------------------------------------------- prefill
    def cut(self, req: Request, n: int) -> int:
        """Shorten a prefill chunk of n tokens so it ends on the next snapshot boundary."""
        start = req.num_computed
        boundary = self._next_boundary(req, start)
        return boundary - start if start < boundary < start + n else n

    def after_step(self, req: Request) -> None:
        """Index the request's newly completed prompt blocks; snapshot at a boundary."""
        hashes = self._hashes(req)
        done = min(req.num_computed, len(req.prompt_ids)) // self.block_size
        table = self.cache.tables[req.slot]
        for i in range(req.num_registered, done):
            self.cache.pool.register(table[i], hashes[i])
        req.num_registered = max(req.num_registered, done)
        pos = req.num_computed
        if self._is_boundary(req, pos) and hashes[pos // self.block_size - 1] not in self.rows:
            self._demote_shallower(req, pos)
            self._save(req.slot, hashes[pos // self.block_size - 1])

    def drop(self, block_hash: bytes) -> None:
        row = self.rows.pop(block_hash, None)
        if row is not None:
            self._free_rows.append(row)

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_snapshots": len(self.rows),
        }

    # ----------------------------------------------------------------- helpers
    def _hashes(self, req: Request) -> list[bytes]:
        if req.block_hashes is None:
            req.block_hashes = chain_hashes(req.prompt_ids, self.block_size, self.salt)
        return req.block_hashes

    def _last_boundary(self, req: Request) -> int:
        """The last block boundary strictly before the prompt's last token."""
        return (len(req.prompt_ids) - 1) // self.block_size * self.block_size

    def _is_boundary(self, req: Request, pos: int) -> bool:
        last = self._last_boundary(req)
        return 0 < pos <= last and (pos % self.every == 0 or pos == last)

    def _next_boundary(self, req: Request, start: int) -> int:
        last = self._last_boundary(req)
        if start >= last:  # past the prompt's snapshots: no cut
            return start + (1 << 40)
        return min((start // self.every + 1) * self.every, last)

    def _demote_shallower(self, req: Request, pos: int) -> None:
        """A deeper snapshot of this prompt is about to be taken: its shallower snapshots
        become the first to evict (a later turn of the same conversation resumes from the
        deepest one), so that LRU keeps every live conversation's deepest snapshot before
        anyone's shallower ones. A shallower one another request uses again moves back to
        the end (`apply`)."""
        hashes, step = self._hashes(req), self.block_size
        for boundary in range(pos - step, 0, -step):
            h = hashes[boundary // step - 1]
            if h in self.rows:
                self.rows.move_to_end(h, last=False)

    def _save(self, slot: int, block_hash: bytes) -> None:
        if not self._free_rows:
            if not self.rows:
                return  # no snapshot budget
            _, row = self.rows.popitem(last=False)
            self._free_rows.append(row)
        row = self._free_rows.pop()
        for layer in self.conv:
            self.conv[layer][row] = self.cache.conv[layer][slot]
            self.ssm[layer][row] = self.cache.ssm[layer][slot]
        self.rows[block_hash] = row
        self.snapshots_taken += 1
