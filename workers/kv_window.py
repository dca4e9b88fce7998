"""Which keys the full-attention layers keep: all of them (exact, the default), or an opt-in
attention-sink + recent-window policy (StreamingLLM-style) that caps each sequence's KV.

Shape legend
    B  sequences     M  logical blocks gathered per sequence     bs tokens per block
    Q  queries of a sequence in the step                         K = M * bs gathered keys

Under the policy, the query at position p attends to keys k <= p with k < sinks or
k > p - window (keys keep the RoPE of their original positions). Blocks no later query can
see are released after each step, so a sequence holds at most the sink blocks plus
window + one prefill chunk of tokens. The exact policy is the same code with no sinks and
an unbounded window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVWindow:
    block_size: int
    sinks: int = 0  # tokens always kept at the start of a sequence
    window: int | None = None  # most recent tokens kept; None = every token (exact)

    @property
    def exact(self) -> bool:
        return self.window is None

    @property
    def sink_blocks(self) -> int:
        return 0 if self.exact else math.ceil(self.sinks / self.block_size)

    def max_blocks(self, tokens: int, chunk: int) -> int:
        """Blocks one sequence of `tokens` tokens holds at most, prefilling `chunk` at a time."""
        full = math.ceil(tokens / self.block_size)
        if self.exact:
            return full
        live = self.sink_blocks + math.ceil((self.window + chunk) / self.block_size) + 1
        return min(full, live)

    def first_dead(self, length: int) -> int:
        """Logical blocks [sink_blocks, first_dead) of a sequence of `length` tokens are never
        attended again (the next query, at position `length`, sees keys > length - window)."""
        if self.exact:
            return 0
        return max(self.sink_blocks, (length - self.window + 1) // self.block_size)

    def live_blocks(self, first: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries at positions first..end-1 of B sequences -> logical block indices to gather
        [B, M] (0 where unused) and whether each is used [B, M]."""
        bs, sinks = self.block_size, self.sink_blocks
        count = (end + bs - 1) // bs  # [B] blocks holding keys
        start = torch.zeros_like(first)
        if not self.exact:
            start = ((first - self.window + 1).clamp(min=0) // bs).clamp(min=sinks)
        width = sinks + int((count - start).clamp(min=0).max())
        col = torch.arange(width)[None, :]  # [1, M]
        idx = torch.where(col < sinks, col, start[:, None] + col - sinks)  # [B, M]
        used = idx < count[:, None]  # sinks [0, sinks) and window [start, count) never overlap
        return idx.masked_fill(~used, 0), used

    def key_mask(
        self, key_pos: torch.Tensor, used: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """key_pos, used [.., K], query_pos [.., Q] -> may query q see key k [.., Q, K]."""
        k, q = key_pos[..., None, :], query_pos[..., :, None]
        ok = used[..., None, :] & (k <= q)
        if not self.exact:
            ok &= (k < self.sinks) | (k > q - self.window)
        return ok
