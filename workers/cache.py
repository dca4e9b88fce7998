"""Hybrid cache: fixed-size DeltaNet state per linear layer, growing KV per full-attention layer.

Shape legend
    S  slots (max concurrent sequences)     C  conv channels (2*key_dim + value_dim)
    Kc conv kernel - 1                      Hv value heads, Dk/Dv DeltaNet head dims
    L  cached tokens of one sequence        Hkv KV heads, D attention head dim

A sequence owns one slot from `allocate()` until `free(slot)`. The DeltaNet state of a slot is
zeroed on allocation, so a reused slot starts exactly like a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import ModelConfig


class CacheFullError(RuntimeError):
    """No free slot is left."""


class KVBuffer:
    """Keys and values of one sequence in one attention layer; capacity doubles as it grows."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.empty(0, kv_heads, head_dim, dtype=dtype, device=device)  # [cap, Hkv, D]
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [n, Hkv, D]; return all cached keys and values [L, Hkv, D]."""
        need = self.length + k.shape[0]
        if need > self.k.shape[0]:
            cap = max(need, 2 * self.k.shape[0], 16)
            self.k = _grow(self.k, cap, self.length)
            self.v = _grow(self.v, cap, self.length)
        self.k[self.length : need] = k
        self.v[self.length : need] = v
        self.length = need
        return self.k[:need], self.v[:need]


def _grow(buf: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    new = buf.new_empty(cap, *buf.shape[1:])
    new[:used] = buf[:used]
    return new


class HybridCache:
    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        c = config
        self.config = c
        self.max_seqs = max_seqs
        self.dtype = dtype
        self.device = torch.device(device)
        k = c.linear_conv_kernel_dim - 1
        state = (max_seqs, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
        self.conv = {i: torch.zeros(max_seqs, c.conv_dim, k, dtype=dtype) for i in c.linear_layers}
        self.ssm = {i: torch.zeros(state, dtype=torch.float32) for i in c.linear_layers}  # fp32
        self.kv: dict[int, list[KVBuffer | None]] = {i: [None] * max_seqs for i in c.full_layers}
        self.lengths = [0] * max_seqs
        self._free = list(range(max_seqs - 1, -1, -1))

    # ------------------------------------------------------------------ slots
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.max_seqs} cache slots are in use")
        slot = self._free.pop()
        for layer in self.conv:
            self.conv[layer][slot].zero_()
            self.ssm[layer][slot].zero_()
        c = self.config
        for layer in self.kv:
            self.kv[layer][slot] = KVBuffer(
                c.num_key_value_heads, c.head_dim, self.dtype, self.device
            )
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.max_seqs:
            raise ValueError(f"slot {slot} is not allocated")
        for layer in self.kv:
            self.kv[layer][slot] = None  # release KV memory now
        self.lengths[slot] = 0
        self._free.append(slot)

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.max_seqs and slot not in self._free

    def kv_buffer(self, layer: int, slot: int) -> KVBuffer:
        buf = self.kv[layer][slot]
        if buf is None:
            raise ValueError(f"slot {slot} is not allocated")
        return buf

    def kv_bytes(self) -> int:
        return sum(
            b.k.numel() * b.k.element_size() * 2 for bufs in self.kv.values() for b in bufs if b
        )


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


@dataclass(frozen=True)
class StepLayout:
    spans: tuple[SeqSpan, ...]
    positions: torch.Tensor  # [T] absolute position of every token
    decode: tuple[int, ...]  # indices of single-token spans (batched recurrent path)
    prefill: tuple[int, ...]  # indices of the other spans (chunked path, one at a time)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @classmethod
    def build(cls, slots_and_lengths: list[tuple[int, int]], cache: HybridCache) -> StepLayout:
        """[(slot, new tokens)] -> layout, reading each slot's cached length from the cache."""
        spans, positions, offset = [], [], 0
        for slot, n in slots_and_lengths:
            if n <= 0:
                raise ValueError(f"slot {slot}: a span needs at least one token")
            if not cache.is_allocated(slot):
                raise ValueError(f"slot {slot} is not allocated")
            start = cache.lengths[slot]
            spans.append(SeqSpan(slot, start, n, offset))
            positions.append(torch.arange(start, start + n))
            offset += n
        if len({s.slot for s in spans}) != len(spans):
            raise ValueError("a slot appears twice in one step")
        decode = tuple(i for i, s in enumerate(spans) if s.length == 1)
        prefill = tuple(i for i, s in enumerate(spans) if s.length > 1)
        return cls(tuple(spans), torch.cat(positions), decode, prefill)
