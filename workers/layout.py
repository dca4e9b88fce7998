"""StepLayout: where each token of one forward step sits, computed once for all layers.

Shape legend
    T  tokens in the step (sequences flattened)    B  decode sequences (one new token each)
    M  blocks gathered per decode sequence         bs tokens per KV block

For every token: its absolute position and its KV row (`slot_mapping`: block * bs + offset).
Decode spans (one token) are batched: their block tables [B, M] (null-padded) and an additive
key mask [B, 1, 1, M * bs]. Prefill spans (several tokens) run one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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
class StepLayout:
    spans: tuple[SeqSpan, ...]
    positions: torch.Tensor  # [T] absolute position of every token
    slot_mapping: torch.Tensor  # [T] KV row of every token
    decode: tuple[int, ...]  # indices of single-token spans (batched paths)
    prefill: tuple[int, ...]  # indices of the other spans (one at a time)
    batch: DecodeBatch | None  # the decode spans' tables and mask

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @classmethod
    def build(cls, slots_and_lengths: list[tuple[int, int]], cache: HybridCache) -> StepLayout:
        """[(slot, new tokens)] -> layout; the slots must hold blocks for the new tokens."""
        spans, offset = [], 0
        for slot, n in slots_and_lengths:
            if n <= 0:
                raise ValueError(f"slot {slot}: a span needs at least one token")
            if not cache.is_allocated(slot):
                raise ValueError(f"slot {slot} is not allocated")
            spans.append(SeqSpan(slot, cache.lengths[slot], n, offset))
            offset += n
        if len({s.slot for s in spans}) != len(spans):
            raise ValueError("a slot appears twice in one step")
        counts = torch.tensor([s.length for s in spans])
        token_slot = torch.tensor([s.slot for s in spans]).repeat_interleave(counts)  # [T]
        starts = torch.tensor([s.start - s.offset for s in spans]).repeat_interleave(counts)
        positions = starts + torch.arange(offset)  # [T]
        bs = cache.block_size
        slot_mapping = cache.block_table[token_slot, positions // bs] * bs + positions % bs
        decode = tuple(i for i, s in enumerate(spans) if s.length == 1)
        prefill = tuple(i for i, s in enumerate(spans) if s.length > 1)
        batch = _decode_batch([spans[i] for i in decode], cache) if decode else None
        return cls(tuple(spans), positions, slot_mapping, decode, prefill, batch)


def _decode_batch(spans: list[SeqSpan], cache: HybridCache) -> DecodeBatch:
    bs = cache.block_size
    slots = torch.tensor([s.slot for s in spans])
    lengths = torch.tensor([s.end for s in spans])  # keys each new token attends to
    width = int(lengths.max() + bs - 1) // bs  # M
    blocks = cache.block_table[slots, :width].reshape(-1)
    keys = torch.arange(width * bs)
    mask = torch.zeros(len(spans), 1, 1, width * bs, dtype=cache.dtype)
    mask.masked_fill_((keys[None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))
    return DecodeBatch(torch.tensor([s.offset for s in spans]), slots, blocks, mask)
