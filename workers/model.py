"""Qwen3-Next causal LM without its routed experts (those sit behind the expert backend).

Shape legend: T tokens in the step (all sequences flattened), H hidden, V vocab, B sequences.
Parameter names equal the HF checkpoint's, so `load_state_dict` takes the loader's dict as is.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
from torch import nn

from workers.attention import GatedAttention
from workers.cache import HybridCache
from workers.config import LINEAR, ModelConfig
from workers.deltanet import GatedDeltaNet
from workers.experts import ExpertBackend
from workers.layout import StepLayout
from workers.linear import Linear, storage_dtype
from workers.moe import Router, SparseMoE
from workers.norms import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.is_linear = config.layer_types[layer] == LINEAR
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer)
        else:
            self.self_attn = GatedAttention(config, layer)
        self.mlp = SparseMoE(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def steps(
        self, x: torch.Tensor, layout: StepLayout, cache: HybridCache, experts: ExpertBackend
    ) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator: it yields while its routed experts are in flight, so a
        driver can run another micro-batch's dense compute meanwhile."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        x = x + mixer(self.input_layernorm(x), layout, cache)
        finish = self.mlp.begin(self.post_attention_layernorm(x), experts)
        yield
        return x + finish()


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3NextLM(nn.Module):
    """Dense path of the model: embedding, token mixers, norms, router, shared experts, LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        lossless: bool = False,
    ) -> Qwen3NextLM:
        """Build without allocating twice: parameters are the loaded tensors themselves, cast
        to `dtype`; with `lossless`, matmul weights keep a narrower dtype that holds them
        exactly (bf16 under fp32 compute: workers/linear.py)."""
        with torch.device("meta"):
            lm = cls(config)
        weights = dict(weights)
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        narrow = lm.matmul_weights() if lossless else frozenset()
        if config.tie_word_embeddings:  # the embedding's dtype is the activations'
            narrow -= {"lm_head.weight"}
        cast = {
            k: v.to(storage_dtype(v.dtype, dtype) if k in narrow else dtype)
            for k, v in weights.items()
        }
        lm.load_state_dict(cast, strict=True, assign=True)
        return lm.eval().requires_grad_(False)

    def matmul_weights(self) -> frozenset[str]:
        """Names of the projection (and router) weights: the parameters that may be stored
        narrower than the activations."""
        return frozenset(
            f"{name}.weight"
            for name, module in self.named_modules()
            if isinstance(module, (nn.Linear, Router))
        )

    def compute_dtypes(self) -> set[torch.dtype]:
        """The dtypes of every parameter but the matmul weights (those may be narrower)."""
        matmul = self.matmul_weights()
        return {p.dtype for name, p in self.named_parameters() if name not in matmul}

    def hidden_states(
        self,
        input_ids: Sequence[torch.Tensor],
        layouts: Sequence[StepLayout],
        cache: HybridCache,
        experts: ExpertBackend,
    ) -> list[torch.Tensor]:
        """Micro-batches (input_ids [T_i], layout_i over disjoint slots) -> final-normed hidden
        states [T_i, H] each; advances the cache. With several micro-batches the layers run
        ping-pong: while one waits for its experts, the next computes its dense part."""
        runs = [
            self._run(i, lay, cache, experts) for i, lay in zip(input_ids, layouts, strict=True)
        ]
        return _interleave(runs)

    def _run(
        self,
        input_ids: torch.Tensor,
        layout: StepLayout,
        cache: HybridCache,
        experts: ExpertBackend,
    ) -> Generator[None, None, torch.Tensor]:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = yield from layer.steps(x, layout, cache, experts)
        for span in layout.spans:
            cache.lengths[span.slot] += span.length
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[.., H] -> [.., V] in fp32."""
        return self.lm_head(hidden).float()


def _interleave(runs: list[Generator[None, None, torch.Tensor]]) -> list[torch.Tensor]:
    """Advance each generator in turn until all have returned; their return values in order."""
    results: list[torch.Tensor | None] = [None] * len(runs)
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            try:
                next(runs[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results  # type: ignore[return-value]
