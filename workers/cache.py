"""Hybrid cache: fixed-size DeltaNet state per slot, paged KV blocks for the attention layers.

Shape legend
    S  slots (max concurrent sequences)     C  conv channels (2*key_dim + value_dim)
    Kc conv kernel - 1                      Hv value heads, Dk/Dv DeltaNet head dims
    N  KV blocks (block 0: the null block)  bs tokens per block
    Hkv KV heads, D attention head dim      M  most blocks one sequence may hold

A sequence owns one slot from `allocate()` until `free(slot)`: its DeltaNet state (zeroed on
allocation) and a block table, `tables[slot]` (logical block i -> block id; mirrored in the
tensor `block_table` [S, M] so a step gathers tables without a per-sequence loop). Token p of
a sequence lives in block `tables[slot][p // bs]`, row `p % bs`. Full prompt blocks may be
shared between sequences (prefix cache, n > 1 forks): they are reference-counted by the
BlockPool and never written again. Pool memory is reserved up front (see cache_config.py) and
each block is zeroed the first time it is handed out, so untouched memory stays virtual.
"""

from __future__ import annotations

import math

import torch

from workers.blocks import NULL_BLOCK, BlockPool, CacheFullError
from workers.cache_config import CacheConfig, CachePlan, plan_cache
from workers.config import ModelConfig
from workers.layout import SeqSpan, StepLayout

__all__ = ["CacheFullError", "HybridCache", "SeqSpan", "StepLayout"]


class HybridCache:
    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        dtype: torch.dtype = torch.float32,
        cache_config: CacheConfig | None = None,
        max_model_len: int = 4096,
    ) -> None:
        c = config
        self.config = c
        self.settings = cache_config or CacheConfig()
        self.plan: CachePlan = plan_cache(c, dtype, max_seqs, max_model_len, self.settings)
        self.max_seqs = max_seqs
        self.dtype = dtype
        self.block_size = bs = self.plan.block_size
        self.window = self.settings.window  # which keys attention keeps (all, or sinks + window)
        k = c.linear_conv_kernel_dim - 1
        state = (max_seqs, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
        self.conv = {i: torch.zeros(max_seqs, c.conv_dim, k, dtype=dtype) for i in c.linear_layers}
        self.ssm = {i: torch.zeros(state, dtype=torch.float32) for i in c.linear_layers}  # fp32
        kv = (self.plan.num_blocks, bs, c.num_key_value_heads, c.head_dim)
        self.k = {i: torch.empty(kv, dtype=dtype) for i in c.full_layers}  # [N, bs, Hkv, D]
        self.v = {i: torch.empty(kv, dtype=dtype) for i in c.full_layers}
        self._zeroed = [False] * self.plan.num_blocks
        self._zero_block(NULL_BLOCK)
        self.pool = BlockPool(self.plan.num_blocks)
        max_blocks = math.ceil(min(max_model_len, c.max_position_embeddings) / bs) + 1
        self.block_table = torch.full((max_seqs, max_blocks), NULL_BLOCK, dtype=torch.long)
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]
        self.lengths = [0] * max_seqs
        self._evicted = [0] * max_seqs  # logical blocks [sink_blocks, _evicted) are released
        self._free = list(range(max_seqs - 1, -1, -1))
        self._workspace = (torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype))

    # ------------------------------------------------------------------ slots
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_available

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.max_seqs} cache slots are in use")
        slot = self._free.pop()
        for layer in self.conv:
            self.conv[layer][slot].zero_()
            self.ssm[layer][slot].zero_()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if not self.is_allocated(slot):
            raise ValueError(f"slot {slot} is not allocated")
        self.pool.release(self.tables[slot])
        self.tables[slot] = []
        self.block_table[slot].fill_(NULL_BLOCK)
        self.lengths[slot] = 0
        self._evicted[slot] = 0
        self._free.append(slot)

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.max_seqs and slot not in self._free

    # ----------------------------------------------------------------- blocks
    def blocks_needed(self, slot: int, new_tokens: int) -> int:
        """Blocks `reserve(slot, new_tokens)` would take from the pool."""
        total = math.ceil((self.lengths[slot] + new_tokens) / self.block_size)
        return max(0, total - len(self.tables[slot]))

    def reserve(self, slot: int, new_tokens: int) -> None:
        """Give the slot blocks for `new_tokens` more tokens (all or none)."""
        need = self.blocks_needed(slot, new_tokens)
        if need > self.pool.num_available:
            raise CacheFullError(
                f"slot {slot} needs {need} more KV blocks, {self.pool.num_available} are free"
            )
        for _ in range(need):
            self._append_block(slot, self._new_block())

    def adopt(self, slot: int, blocks: list[int], length: int) -> None:
        """Start an empty slot's table with shared blocks holding its first `length` tokens."""
        if self.tables[slot] or self.lengths[slot]:
            raise ValueError(f"slot {slot} already holds tokens")
        for block in blocks:
            if block != NULL_BLOCK:  # (evicted entries of a windowed sequence stay null)
                self.pool.incref(block)
            self._append_block(slot, block)
        self.lengths[slot] = length

    def fork(self, src: int, dst: int) -> None:
        """Make empty slot `dst` a copy of `src`: DeltaNet state copied, full blocks shared,
        the partly filled last block copied (both sequences will write to it)."""
        for layer in self.conv:
            self.conv[layer][dst] = self.conv[layer][src]
            self.ssm[layer][dst] = self.ssm[layer][src]
        length, blocks = self.lengths[src], self.tables[src]
        full = length // self.block_size
        self.adopt(dst, blocks[:full], full * self.block_size)
        if full < len(blocks):
            block = self._new_block()
            for layer in self.k:
                self.k[layer][block] = self.k[layer][blocks[full]]
                self.v[layer][block] = self.v[layer][blocks[full]]
            self._append_block(dst, block)
        self.lengths[dst] = length
        self._evicted[dst] = self._evicted[src]

    def evict(self, slot: int) -> int:
        """Under a window policy, release the blocks no later query of the slot can see;
        returns how many were released."""
        table, dead = self.tables[slot], self.window.first_dead(self.lengths[slot])
        start = max(self._evicted[slot], self.window.sink_blocks)
        gone = [b for b in table[start:dead] if b != NULL_BLOCK]
        if start < dead:
            self.pool.release(gone)
            table[start:dead] = [NULL_BLOCK] * (dead - start)
            self.block_table[slot, start:dead] = NULL_BLOCK
            self._evicted[slot] = dead
        return len(gone)

    def _new_block(self) -> int:
        block = self.pool.allocate()
        if not self._zeroed[block]:
            self._zero_block(block)
        return block

    def _zero_block(self, block: int) -> None:
        for layer in self.k:
            self.k[layer][block].zero_()
            self.v[layer][block].zero_()
        self._zeroed[block] = True

    def _append_block(self, slot: int, block: int) -> None:
        table = self.tables[slot]
        if len(table) >= self.block_table.shape[1]:
            raise CacheFullError(f"slot {slot}: longer than the model length")
        self.block_table[slot, len(table)] = block
        table.append(block)

    # ------------------------------------------------------------- layer I/O
    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v [T, Hkv, D] -> rows `slot_mapping` [T] (block * bs + offset) of the pool."""
        c = self.config
        self.k[layer].view(-1, c.num_key_value_heads, c.head_dim).index_copy_(0, slot_mapping, k)
        self.v[layer].view(-1, c.num_key_value_heads, c.head_dim).index_copy_(0, slot_mapping, v)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks [n] -> keys, values [n, bs, Hkv, D]: copies into a reused workspace (a fresh
        tensor per call would page-fault its whole size every step); valid until the next call."""
        shape = (blocks.numel(), *self.k[layer].shape[1:])
        size = math.prod(shape)
        wk, wv = self._workspace
        if wk.numel() < size:
            wk, wv = torch.empty(size, dtype=self.dtype), torch.empty(size, dtype=self.dtype)
            self._workspace = (wk, wv)
        keys, values = wk[:size].view(shape), wv[:size].view(shape)
        torch.index_select(self.k[layer], 0, blocks, out=keys)
        torch.index_select(self.v[layer], 0, blocks, out=values)
        return keys, values

    def usage(self) -> dict[str, int]:
        return {
            "kv_blocks_total": self.pool.num_usable,
            "kv_blocks_free": self.pool.num_available,
            "kv_block_evictions": self.pool.evictions,
        }
