"""Gated full attention (GQA, per-head q/k RMSNorm, partial RoPE, sigmoid output gate).

Shape legend
    T  tokens in the step     H  hidden      Hq query heads    Hkv KV heads    D head dim
    n  new tokens of one sequence            L  its cached + new tokens

q_proj emits, per head, [query (D) | gate (D)]; the gate multiplies the attention output
through a sigmoid before o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.cache import HybridCache, SeqSpan, StepLayout
from workers.config import ModelConfig
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
        self.q_proj = nn.Linear(c.hidden_size, 2 * self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.rope = PartialRope(self.head_dim, c.rotary_dim, c.rope_theta)

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: HybridCache) -> torch.Tensor:
        """x [T, H] -> [T, H]; appends this step's keys/values to each sequence's cache."""
        t = x.shape[0]
        q_gate = self.q_proj(x).view(t, self.heads, 2 * self.head_dim)  # [T, Hq, 2D]
        q, gate = q_gate.split(self.head_dim, dim=-1)  # [T, Hq, D] each
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(t, self.kv_heads, self.head_dim))  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(layout.positions, x.dtype)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)

        out = torch.empty_like(q)  # [T, Hq, D]
        if layout.decode:
            self._decode(q, k, v, [layout.spans[i] for i in layout.decode], cache, out)
        for i in layout.prefill:
            span = layout.spans[i]
            keys, values = cache.kv_buffer(self.layer, span.slot).append(k[span.rows], v[span.rows])
            out[span.rows] = self._attend(q[span.rows], keys, values, span.start)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))

    def _decode(self, q, k, v, spans: list[SeqSpan], cache: HybridCache, out) -> None:
        """All single-token spans in one attention call over their padded caches."""
        rows = torch.tensor([sp.offset for sp in spans])
        cached = [cache.kv_buffer(self.layer, sp.slot).append(k[r : r + 1], v[r : r + 1])
                  for sp, r in zip(spans, rows.tolist(), strict=True)]  # fmt: skip
        keys, values = _pad(cached)  # [B, Lmax, Hkv, D] each
        lengths = torch.tensor([kv[0].shape[0] for kv in cached])
        mask = torch.arange(keys.shape[1])[None, :] < lengths[:, None]  # [B, Lmax]
        o = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2),  # [B, Hq, 1, D]
            keys.transpose(1, 2),  # [B, Hkv, Lmax, D]
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],  # [B, 1, 1, Lmax]
            scale=self.head_dim**-0.5,
            enable_gqa=self.heads != self.kv_heads,
        )
        out[rows] = o.squeeze(2)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """q [n, Hq, D] at positions start..start+n-1 over keys/values [L, Hkv, D] -> [n, Hq, D]."""
        n, total = q.shape[0], keys.shape[0]
        mask = None
        if n > 1:  # query i sees keys 0..start+i
            mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=start)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [Hq, n, D]
            keys.transpose(0, 1),  # [Hkv, L, D]
            values.transpose(0, 1),
            attn_mask=mask,
            scale=self.head_dim**-0.5,
            enable_gqa=self.heads != self.kv_heads,
        )
        return o.transpose(0, 1)


def _pad(cached: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence keys/values [L_i, Hkv, D] -> zero-padded [B, Lmax, Hkv, D] (the padding
    must be finite: masked scores are -inf, but NaN garbage would poison the softmax)."""
    longest = max(k.shape[0] for k, _ in cached)
    first = cached[0][0]
    keys = first.new_empty(len(cached), longest, *first.shape[1:])
    values = torch.empty_like(keys)
    for i, (k, v) in enumerate(cached):
        n = k.shape[0]
        keys[i, :n], values[i, :n] = k, v
        keys[i, n:], values[i, n:] = 0, 0
    return keys, values
