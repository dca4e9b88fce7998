"""Gated DeltaNet token mixer (the linear-attention layers of Qwen3-Next).

Shape legend
    T  tokens in the step    H  hidden      Hk key heads   Hv value heads   r = Hv / Hk
    Dk key head dim          Dv value head dim              C  conv channels = 2*Hk*Dk + Hv*Dv
    W  conv kernel size      B  decode sequences            n  new tokens of one sequence

Checkpoint layout: in_proj_qkvz rows are grouped per key head as [q (Dk), k (Dk), v (r*Dv),
z (r*Dv)], in_proj_ba per key head as [b (r), a (r)]. After regrouping, q/k/v go through a
causal depthwise conv (state: the last W-1 inputs) and silu, then the gated delta rule; the
output goes through a gated RMSNorm (gate z) and out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.cache import HybridCache
from workers.config import ModelConfig
from workers.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from workers.layout import SeqSpan, StepLayout
from workers.linear import Linear
from workers.norms import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.hk, self.hv = c.linear_num_key_heads, c.linear_num_value_heads
        self.dk, self.dv = c.linear_key_head_dim, c.linear_value_head_dim
        self.r = self.hv // self.hk
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        conv_dim = c.conv_dim
        self.in_proj_qkvz = Linear(c.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(c.hidden_size, 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, c.linear_conv_kernel_dim, groups=conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, c.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: HybridCache) -> torch.Tensor:
        """x [T, H] -> [T, H]; advances each sequence's conv and recurrent state."""
        t = x.shape[0]
        mixed, z, b, a = self._project(x)  # [T, C], [T, Hv, Dv], [T, Hv], [T, Hv]
        beta, g = self.gates(b, a)
        core = torch.empty(t, self.hv, self.dv, dtype=torch.float32)
        if layout.decode:
            self._decode(mixed, g, beta, [layout.spans[i] for i in layout.decode], cache, core)
        for i in layout.prefill:
            self.prefill(mixed, g, beta, layout.spans[i], cache, core)
        out = self.norm(core.to(x.dtype), z)  # [T, Hv, Dv]
        return self.out_proj(out.reshape(t, self.value_dim))

    def gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b, a [T, Hv] -> beta (write strength) and g (log decay, fp32) [T, Hv]."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return torch.sigmoid(b), g

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.regroup(self.in_proj_qkvz(x), self.in_proj_ba(x))

    def regroup(self, qkvz: torch.Tensor, ba: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projections [T, Hk*(2Dk + 2rDv)], [T, 2Hv] -> mixed [T, C], z [T, Hv, Dv], b, a."""
        t = qkvz.shape[0]
        qkvz = qkvz.view(t, self.hk, 2 * self.dk + 2 * self.r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, self.r * self.dv, self.r * self.dv], dim=-1)
        b, a = ba.reshape(t, self.hk, 2 * self.r).split([self.r, self.r], dim=-1)
        # [T, Hk, r*Dv] -> [T, Hv, Dv]: value head j belongs to key head j // r
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)  # [T, C]
        z = z.reshape(t, self.hv, self.dv)
        return mixed, z, b.reshape(t, self.hv), a.reshape(t, self.hv)

    def _split_heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[.., C] conv output -> q, k [.., Hv, Dk] (repeated from Hk), v [.., Hv, Dv]."""
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = mixed.shape[:-1]
        q = q.reshape(*lead, self.hk, self.dk).repeat_interleave(self.r, dim=-2)
        k = k.reshape(*lead, self.hk, self.dk).repeat_interleave(self.r, dim=-2)
        return q, k, v.reshape(*lead, self.hv, self.dv)

    def _conv(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, C, n], state [B, C, W-1] -> silu(conv) [B, C, n], new state [B, C, W-1]."""
        full = torch.cat([state, inputs.to(state.dtype)], dim=-1)  # [B, C, W-1+n]
        out = F.conv1d(full, self.conv1d.weight, groups=full.shape[1])  # [B, C, n]
        return F.silu(out), full[..., -state.shape[-1] :]

    def _decode(self, mixed, g, beta, spans: list[SeqSpan], cache: HybridCache, core) -> None:
        rows = torch.tensor([s.offset for s in spans])
        slots = torch.tensor([s.slot for s in spans])
        conv_state, ssm_state = cache.conv[self.layer], cache.ssm[self.layer]
        conv_out, conv_state[slots] = self._conv(mixed[rows].unsqueeze(-1), conv_state[slots])
        q, k, v = self._split_heads(conv_out.squeeze(-1))  # [B, Hv, D*]
        o, ssm_state[slots] = recurrent_gated_delta_rule(
            q, k, v, g[rows], beta[rows], ssm_state[slots]
        )
        core[rows] = o

    def prefill(self, mixed, g, beta, span: SeqSpan, cache: HybridCache, core) -> None:
        """One prefill span: conv over its tokens, chunked delta rule; core[rows] (fp32)."""
        conv_state, ssm_state = cache.conv[self.layer], cache.ssm[self.layer]
        s = span.slot
        seq = mixed[span.rows].t().unsqueeze(0)  # [1, C, n]
        conv_out, conv_state[s : s + 1] = self._conv(seq, conv_state[s : s + 1])
        q, k, v = self._split_heads(conv_out[0].t())  # [n, Hv, D*]
        o, ssm_state[s] = chunk_gated_delta_rule(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [Hv, n, D*]
            g[span.rows].t(), beta[span.rows].t(), ssm_state[s],
        )  # fmt: skip
        core[span.rows] = o.transpose(0, 1)
