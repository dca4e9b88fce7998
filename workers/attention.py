"""Gated full attention (GQA, per-head q/k RMSNorm, partial RoPE, sigmoid output gate).

Shape legend
    T  tokens in the step     H  hidden      Hq query heads    Hkv KV heads    D head dim
    n  new tokens of one sequence            L  its cached + new tokens (keys attended)
    B  decode sequences      G = Hq / Hkv query heads per KV head

q_proj emits, per head, [query (D) | gate (D)]; the gate multiplies the attention output
through a sigmoid before o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.cache import HybridCache
from workers.config import ModelConfig
from workers.layout import DecodeBatch, PrefillKeys, StepLayout
from workers.linear import Linear
from workers.norms import RMSNorm
from workers.rope import PartialRope


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = Linear(c.hidden_size, 2 * self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.rope = PartialRope(self.head_dim, c.rotary_dim, c.rope_theta)

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: HybridCache) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes this step's keys/values into the sequences' blocks."""
        t = x.shape[0]
        q_gate = self.q_proj(x).view(t, self.heads, 2 * self.head_dim)  # [T, Hq, 2D]
        q, gate = q_gate.split(self.head_dim, dim=-1)  # [T, Hq, D] each
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(t, self.kv_heads, self.head_dim))  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(layout.positions, x.dtype)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)

        cache.write(self.layer, layout.slot_mapping, k, v)  # every new token, in place
        out = torch.empty_like(q)  # [T, Hq, D]
        if layout.batch is not None:
            out[layout.batch.rows] = self._decode(q[layout.batch.rows], layout.batch, cache)
        for i, keys in zip(layout.prefill, layout.prefill_keys, strict=True):
            rows = layout.spans[i].rows
            out[rows] = self._prefill(q[rows], keys, cache)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))

    def _decode(self, q: torch.Tensor, batch: DecodeBatch, cache: HybridCache) -> torch.Tensor:
        """q [B, Hq, D], one new token per sequence -> [B, Hq, D] over the gathered blocks.
        The G = Hq / Hkv query heads of one KV head ride as G query rows of that head."""
        b = q.shape[0]
        keys, values = cache.gather(self.layer, batch.blocks)  # [B*M, bs, Hkv, D] each
        keys = keys.view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        values = values.view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.view(b, self.kv_heads, -1, self.head_dim),  # [B, Hkv, G, D]
            keys,
            values,
            attn_mask=batch.mask,  # [B, 1, 1, L]
            scale=self.head_dim**-0.5,
        )
        return o.reshape(b, self.heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, keys: PrefillKeys, cache: HybridCache) -> torch.Tensor:
        """q [n, Hq, D], one sequence's new tokens -> [n, Hq, D] over its gathered blocks.
        4-D inputs take torch's fused CPU kernel, which never materialises the [Hq, n, L]
        scores (a 32K-token context stays within a few MB per chunk)."""
        k, v = cache.gather(self.layer, keys.blocks)  # [M, bs, Hkv, D]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, Hq, n, D]
            k.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)[None],  # [1, Hkv, L, D]
            v.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)[None],
            attn_mask=keys.mask[None, None],  # [1, 1, n, L]
            scale=self.head_dim**-0.5,
            enable_gqa=self.heads != self.kv_heads,
        )
        return o[0].transpose(0, 1)
