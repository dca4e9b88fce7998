"""StepLayout: where each token of one forward step sits, computed once for all layers.

Shape legend
    T  tokens in the step (sequences flattened)    B  decode sequences (one new token each)
    M  blocks gathered per decode sequence         bs tokens per KV block

For every token: its absolute position and its KV row (`slot_mapping`: block * bs + offset).
Decode spans (one token) are batched: the blocks they attend to [B, M] (null-padded) and an
additive key mask [B, 1, 1, M * bs]. Prefill spans (several tokens) run one at a time, each
with its blocks [M] and a boolean mask [n, M * bs]. Which blocks and keys a query sees comes
from the cache's KVWindow (all earlier keys, or sinks + a recent window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.blocks import NULL_BLOCK

if TYPE_CHECKING:
    from workers.cache import HybridCache


@dataclass(frozen=True)
class SeqSpan:
    """`length` new tokens of the sequence in `slot`, after `start` cached ones, at
    rows [offset, offset + length) of the step's flattened tokens."""

    slot: int
    start: int
    length: int
    offset: int

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class DecodeBatch:
    rows: torch.Tensor  # [B] rows of the step's tokens
    slots: torch.Tensor  # [B]
    blocks: torch.Tensor  # [B * M] block ids to gather (null block as padding)
    mask: torch.Tensor  # [B, 1, 1, M * bs] 0 for keys to attend, -inf for padding


@dataclass(frozen=True)
class PrefillKeys:
    blocks: torch.Tensor  # [M] block ids to gather
    mask: torch.Tensor  # [n, M * bs] True where the query may see the key


@dataclass(frozen=True)
class StepLayout:
    spans: tuple[SeqSpan, ...]
    positions: torch.Tensor  # [T] absolute position of every token
    slot_mapping: torch.Tensor  # [T] KV row of every token
    decode: tuple[int, ...]  # indices of single-token spans (batched paths)
    prefill: tuple[int, ...]  # indices of the other spans (one at a time)
    batch: DecodeBatch | None  # the decode spans' gathered tables and mask (eager path)
    prefill_keys: tuple[PrefillKeys, ...]  # per prefill span (same order as `prefill`)
    decode_rows: torch.Tensor  # [B] rows of the decode spans' tokens
    decode_slots: torch.Tensor  # [B] their slots

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @classmethod
    def build(
        cls, slots_and_lengths: list[tuple[int, int]], cache: HybridCache, tables: bool = True
    ) -> StepLayout:
        """[(slot, new tokens)] -> layout; the slots must hold blocks for the new tokens.
        tables=False skips the decode spans' gathered block lists and key mask (`batch`):
        the fused decode attention reads the block table itself."""
        spans, offset = [], 0
        lengths = cache.lengths
        for slot, n in slots_and_lengths:
            if n <= 0:
                raise ValueError(f"slot {slot}: a span needs at least one token")
            if not cache.is_allocated(slot):
                raise ValueError(f"slot {slot} is not allocated")
            spans.append(SeqSpan(slot, lengths[slot], n, offset))
            offset += n
        if len({s.slot for s in spans}) != len(spans):
            raise ValueError("a slot appears twice in one step")
        decode = tuple(i for i, s in enumerate(spans) if s.length == 1)
        prefill = tuple(i for i, s in enumerate(spans) if s.length > 1)
        bs = cache.block_size
        if not prefill:  # decode only: one token per span, no repeats to build
            token_slot = torch.tensor([s.slot for s in spans])
            positions = torch.tensor([s.start for s in spans])
            rows = torch.arange(len(spans))
            decode_slots = token_slot
            tables_ = cache.tables
            slot_mapping = torch.tensor(
                [tables_[s.slot][s.start // bs] * bs + s.start % bs for s in spans]
            )
        else:
            counts = torch.tensor([s.length for s in spans])
            token_slot = torch.tensor([s.slot for s in spans]).repeat_interleave(counts)  # [T]
            starts = torch.tensor([s.start - s.offset for s in spans]).repeat_interleave(counts)
            positions = starts + torch.arange(offset)  # [T]
            rows = torch.tensor([spans[i].offset for i in decode], dtype=torch.long)
            decode_slots = torch.tensor([spans[i].slot for i in decode], dtype=torch.long)
            slot_mapping = cache.block_table[token_slot, positions // bs] * bs + positions % bs
        batch = _decode_batch([spans[i] for i in decode], cache) if decode and tables else None
        keys = tuple(_prefill_keys(spans[i], cache) for i in prefill)
        return cls(
            tuple(spans), positions, slot_mapping, decode, prefill, batch, keys, rows,
            decode_slots,
        )  # fmt: skip


def _gathered(
    slots: torch.Tensor, first: torch.Tensor, end: torch.Tensor, cache: HybridCache
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences `slots` with queries at first..end-1 -> blocks to gather [B, M], and the
    position [B, M * bs] and presence [B, M * bs] of every gathered key."""
    bs = cache.block_size
    idx, used = cache.window.live_blocks(first, end)  # [B, M]
    blocks = cache.block_table[slots[:, None], idx].masked_fill(~used, NULL_BLOCK)
    key_pos = (idx[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [B, M*bs]
    present = used.repeat_interleave(bs, dim=1) & (key_pos < end[:, None])
    return blocks, key_pos, present


def _decode_batch(spans: list[SeqSpan], cache: HybridCache) -> DecodeBatch:
    slots = torch.tensor([s.slot for s in spans])
    end = torch.tensor([s.end for s in spans])  # the new token is at end - 1
    blocks, key_pos, present = _gathered(slots, end - 1, end, cache)
    sees = cache.window.key_mask(key_pos, present, (end - 1)[:, None])  # [B, 1, K]
    mask = torch.zeros(len(spans), 1, 1, key_pos.shape[1], dtype=cache.dtype)
    mask.masked_fill_(~sees[:, None], float("-inf"))
    return DecodeBatch(torch.tensor([s.offset for s in spans]), slots, blocks.reshape(-1), mask)


def _prefill_keys(span: SeqSpan, cache: HybridCache) -> PrefillKeys:
    first, end = torch.tensor([span.start]), torch.tensor([span.end])
    blocks, key_pos, present = _gathered(torch.tensor([span.slot]), first, end, cache)
    queries = torch.arange(span.start, span.end)[None, :]  # [1, n]
    return PrefillKeys(blocks[0], cache.window.key_mask(key_pos, present, queries)[0])
