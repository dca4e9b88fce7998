"""ModelRunner: one forward step over a batch of sequences in their cache slots.

Shape legend: T tokens in the step, B sequences, V vocab.
It owns the dense model, the hybrid cache and an expert backend; it knows nothing about
requests or scheduling (cluster/engine.py does that) nor about where experts live.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.cache import HybridCache, StepLayout
from workers.config import ModelConfig
from workers.experts import ExpertBackend
from workers.model import Qwen3NextLM


class ModelRunner:
    def __init__(
        self,
        lm: Qwen3NextLM,
        experts: ExpertBackend,
        max_seqs: int = 64,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.lm = lm
        self.config: ModelConfig = lm.config
        self.experts = experts
        self.cache = HybridCache(self.config, max_seqs, dtype=dtype)

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    @torch.inference_mode()
    def step(
        self, batch: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """[(slot, new token ids)] -> logits of each sequence's last token [B, V] (fp32), or
        with all_logits, a list of [n_i, V] for every new position."""
        layout = StepLayout.build([(slot, len(ids)) for slot, ids in batch], self.cache)
        self._check_vocab(batch)
        input_ids = torch.tensor([t for _, ids in batch for t in ids], dtype=torch.long)  # [T]
        hidden = self.lm.hidden_states(input_ids, layout, self.cache, self.experts)  # [T, H]
        if all_logits:
            return [self.lm.logits(hidden[s.rows]) for s in layout.spans]
        last = torch.tensor([s.offset + s.length - 1 for s in layout.spans])
        return self.lm.logits(hidden[last])  # [B, V]

    def _check_vocab(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        vocab = self.config.vocab_size
        for slot, ids in batch:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"slot {slot}: token id {bad[0]} outside the vocabulary [0, {vocab})"
                )
