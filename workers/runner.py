"""ModelRunner: one forward step over a batch of sequences in their cache slots.

Shape legend: T tokens in the step, B sequences, V vocab.
It owns the dense model, the hybrid cache and an expert backend; it knows nothing about
requests or scheduling (workers/engine.py does that) nor about where experts live.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers import dense_kernel
from workers.blocks import CacheFullError
from workers.cache import HybridCache
from workers.cache_config import CacheConfig
from workers.config import ModelConfig
from workers.experts import ExpertBackend
from workers.layout import StepLayout
from workers.model import Qwen3NextLM
from workers.native_step import NativeModel


class ModelRunner:
    def __init__(
        self,
        lm: Qwen3NextLM,
        experts: ExpertBackend,
        max_seqs: int = 64,
        dtype: torch.dtype = torch.float32,
        micro_batches: int = 1,
        cache_config: CacheConfig | None = None,
        max_model_len: int = 4096,
        native: bool | None = None,
    ) -> None:
        self.lm = lm
        self.config: ModelConfig = lm.config
        self.experts = experts
        self.cache = HybridCache(self.config, max_seqs, dtype, cache_config, max_model_len)
        # >1: ping-pong layers so dense compute hides remote expert calls; pays when the
        # shards run on other nodes, costs extra calls when they share this node's cores
        self.micro_batches = micro_batches
        # fused C++ dense ops (workers/dense_kernel.py): None = wherever they load and the
        # model and cache share a dtype they take; False = the eager torch reference
        dtypes = lm.compute_dtypes() | {dtype}  # matmul weights may be bf16 under fp32
        possible = len(dtypes) == 1 and dense_kernel.supports(dtype)
        if native and not possible:
            raise ValueError(
                f"native dense ops unavailable for {sorted(map(str, dtypes))}: "
                f"{dense_kernel.status()['reason'] or 'model and cache dtypes differ'}"
            )
        self.native = possible if native is None else bool(native)
        # the step's model: NativeModel binds the weights now (make a new runner after
        # replacing parameters); the eager modules read them at every call
        self.model = NativeModel(lm) if self.native else lm

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    @torch.inference_mode()
    def step(
        self,
        batch: Sequence[tuple[int, Sequence[int]]],
        all_logits: bool = False,
        full: Sequence[int] = (),
    ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """[(slot, new token ids)] -> logits of each sequence's last token [B, V] (fp32), or
        with all_logits, a list of [n_i, V] for every new position; with `full` (batch
        indices), (last-token logits [B, V], {index: [n_i, V] of every new position}) for
        prompt logprobs. Takes the KV blocks the new tokens need (CacheFullError, before
        anything moves, when the pool is short)."""
        parts = split_batch(batch, self.micro_batches)
        input_ids = [
            torch.tensor([t for _, ids in p for t in ids], dtype=torch.long) for p in parts
        ]
        self._check_vocab(input_ids)
        self._reserve(batch)
        layouts = [
            StepLayout.build([(slot, len(ids)) for slot, ids in p], self.cache, not self.native)
            for p in parts
        ]
        hiddens = self.model.hidden_states(input_ids, layouts, self.cache, self.experts)  # [T_i, H]
        if all_logits:
            pairs = zip(hiddens, layouts, strict=True)
            return [self.model.logits(h[s.rows]) for h, lay in pairs for s in lay.spans]
        if not full and len(hiddens) == 1 and not layouts[0].prefill:  # decode: all last tokens
            return self.model.logits(hiddens[0])
        pairs = list(zip(hiddens, layouts, strict=True))
        last = [h[[s.offset + s.length - 1 for s in lay.spans]] for h, lay in pairs]
        logits = self.model.logits(torch.cat(last))  # [B, V] in batch order
        if not full:
            return logits
        spans = [(h, s) for h, lay in pairs for s in lay.spans]  # batch order
        return logits, {i: self.model.logits(spans[i][0][spans[i][1].rows]) for i in full}

    def _reserve(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        cache = self.cache
        need = sum(cache.blocks_needed(slot, len(ids)) for slot, ids in batch)
        if need > cache.num_free_blocks:
            raise CacheFullError(f"the step needs {need} KV blocks, {cache.num_free_blocks} free")
        for slot, ids in batch:
            cache.reserve(slot, len(ids))

    def _check_vocab(self, input_ids: list[torch.Tensor]) -> None:
        """The engine validates prompts at admission; this guards direct callers (one check)."""
        ids = torch.cat(input_ids)
        vocab = self.config.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"token id {int(bad[0])} outside the vocabulary [0, {vocab})")


def split_batch(batch: Sequence[tuple[int, Sequence[int]]], parts: int) -> list[list]:
    """Cut the batch into up to `parts` contiguous pieces of roughly equal token counts."""
    batch = list(batch)
    parts = max(1, min(parts, len(batch)))
    total = sum(len(ids) for _, ids in batch)
    pieces: list[list] = [[]]
    seen = 0
    for item in batch:
        boundary = total * len(pieces) / parts
        if pieces[-1] and seen >= boundary and len(pieces) < parts:
            pieces.append([])
        pieces[-1].append(item)
        seen += len(item[1])
    return pieces
