"""Sparse MoE block: softmax router, top-k (renormalised), routed experts via the expert
backend, plus a shared SwiGLU expert scaled by sigmoid(shared_expert_gate).

Shape legend: T tokens, H hidden, E experts, K top-k, Is shared-expert intermediate size.
The routed experts are not parameters of this module: they live behind `ExpertBackend`
(in process or on remote shards). The shared expert runs while the routed work is in flight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.experts import ExpertBackend
from workers.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, K] int64, weights [T, K] in x's dtype)."""
        probs = torch.softmax(F.linear(x, self.weight.to(x.dtype)).float(), dim=-1)  # [T, E]
        top_w, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        return top_ids, top_w.to(x.dtype)


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate = Router(config)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, experts: ExpertBackend) -> torch.Tensor:
        return self.begin(x, experts)()

    def begin(self, x: torch.Tensor, experts: ExpertBackend) -> Callable[[], torch.Tensor]:
        """Send the routed work, compute the shared expert meanwhile; the returned function
        waits for the routed result and gives the block's output [T, H]."""
        ids, weights = self.gate(x)
        pending = experts.submit(self.layer, x, ids, weights)  # routed work goes out first
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return lambda: pending.result() + shared
