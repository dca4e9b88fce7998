"""The forward step on the fused C++ dense ops, with every weight and constant bound once.

Shape legend: T tokens in the step, H hidden, B decode sequences, E routed experts, Is shared
expert intermediate, V vocab.

`NativeModel(lm)` is the same model as `Qwen3NextLM` (workers/model.py, the eager reference)
computed differently: projections that read the same input run as one matmul on fused
weights (workers/fused_rows.py: the parameters become views of the fused tensor, so memory
is not doubled), and the chains of small torch ops become single ops of
workers/dense_kernel.py: residual + RMSNorm, DeltaNet decode (conv, gates, delta rule,
gated norm) for all decode rows at once, q/k norm + RoPE + KV write, decode attention over
the paged blocks in place, router top-k, shared-expert activation and the MoE residual + next
norm. Prefill spans keep the modules' own code (chunked delta rule, SDPA); a decode-only step
runs no per-sequence Python. The model's weights are bound when this object is made (make a
new one after replacing parameters). The routed experts stay behind the `ExpertBackend`,
and the layers still yield while they are in flight (micro-batch ping-pong).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
import torch.nn.functional as F

from workers import dense_kernel
from workers.attention import GatedAttention
from workers.cache import HybridCache
from workers.deltanet import GatedDeltaNet
from workers.experts import ExpertBackend
from workers.fused_rows import fused_rows
from workers.layout import StepLayout
from workers.model import Qwen3NextLM, _interleave
from workers.moe import SparseMoE

_MOE_ROWS = (
    "gate.weight",
    "shared_expert.gate_proj.weight",
    "shared_expert.up_proj.weight",
    "shared_expert_gate.weight",
)


class _DeltaNet:
    def __init__(self, m: GatedDeltaNet) -> None:
        self.m, self.layer = m, m.layer
        self.w_in = fused_rows(m, ("in_proj_qkvz.weight", "in_proj_ba.weight"))  # [qkvz|ba, H]
        self.w_out = m.out_proj.weight
        self.split = 2 * m.key_dim + 2 * m.value_dim
        self.args = (m.conv1d.weight, m.A_log, m.dt_bias, m.norm.weight)
        self.dims = (m.hk, m.hv, m.dk, m.dv, m.norm.eps)

    def __call__(self, x: torch.Tensor, layout: StepLayout, cache: HybridCache) -> torch.Tensor:
        ops, m = dense_kernel.ops(), self.m
        proj = dense_kernel.linear(x, self.w_in, True)  # [T, qkvz | ba]
        out = torch.empty(x.shape[0], m.value_dim, dtype=x.dtype)  # gated-normed [T, Hv*Dv]
        if layout.decode:
            conv_w, a_log, dt_bias, norm_w = self.args
            ops.deltanet_decode(
                proj, layout.decode_rows, layout.decode_slots, cache.conv[self.layer], conv_w,
                cache.ssm[self.layer], a_log, dt_bias, norm_w, out, *self.dims,
            )  # fmt: skip
        if layout.prefill:
            mixed, z, b, a = m.regroup(proj[:, : self.split], proj[:, self.split :])
            beta, g = m.gates(b, a)
            core = torch.empty(x.shape[0], m.hv, m.dv, dtype=torch.float32)
            for i in layout.prefill:
                rows = layout.spans[i].rows
                m.prefill(mixed, g, beta, layout.spans[i], cache, core)
                out[rows] = m.norm(core[rows].to(x.dtype), z[rows]).reshape(-1, m.value_dim)
        return dense_kernel.linear(out, self.w_out, True)


class _Attention:
    def __init__(self, m: GatedAttention) -> None:
        self.m, self.layer = m, m.layer
        self.w_qkv = fused_rows(m, ("q_proj.weight", "k_proj.weight", "v_proj.weight"))
        self.w_o = m.o_proj.weight
        self.norms = (m.q_norm.weight, m.k_norm.weight, m.rope.inv_freq)
        self.dims = (m.heads, m.kv_heads, m.head_dim, m.rope.rotary_dim, m.q_norm.eps)

    def __call__(self, x: torch.Tensor, layout: StepLayout, cache: HybridCache) -> torch.Tensor:
        ops, m = dense_kernel.ops(), self.m
        hq, d = m.heads, m.head_dim
        qkv = dense_kernel.linear(x, self.w_qkv, True)  # [T, Hq*2D | Hkv*D | Hkv*D]
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        q = ops.attn_prep(  # [T, Hq, D] normed + rotated; every token's K/V now in the cache
            qkv, layout.positions, layout.slot_mapping, *self.norms, k_cache, v_cache, *self.dims
        )
        out = torch.empty(x.shape[0], hq * d, dtype=x.dtype)
        if layout.decode:
            window = cache.window
            ops.paged_decode(
                q, qkv, layout.decode_rows, layout.decode_slots, layout.positions,
                cache.block_table, k_cache, v_cache, out, d**-0.5, window.sinks,
                -1 if window.window is None else window.window,
            )  # fmt: skip
        for i, keys in zip(layout.prefill, layout.prefill_keys, strict=True):
            rows = layout.spans[i].rows
            gate = qkv[rows, : 2 * hq * d].view(-1, hq, 2 * d)[..., d:]
            o = m._prefill(q[rows], keys, cache) * torch.sigmoid(gate)
            out[rows] = o.reshape(-1, hq * d)
        return dense_kernel.linear(out, self.w_o, True)


class _MoE:
    def __init__(self, m: SparseMoE) -> None:
        self.layer = m.layer
        self.w = fused_rows(m, _MOE_ROWS)  # [E | Is | Is | 1, H]
        self.w_down = m.shared_expert.down_proj.weight
        self.e, self.k, self.renorm = m.gate.weight.shape[0], m.gate.top_k, m.gate.renormalize
        self.inter = m.shared_expert.gate_proj.weight.shape[0]


class _Layer:
    def __init__(self, lm: Qwen3NextLM, i: int) -> None:
        layers = lm.model.layers
        layer = layers[i]
        self.mixer = (
            _DeltaNet(layer.linear_attn) if layer.is_linear else _Attention(layer.self_attn)
        )
        post = layer.post_attention_layernorm
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else lm.model.norm
        self.post, self.next, self.eps = post.weight, nxt.weight, post.eps
        self.moe = _MoE(layer.mlp)


class NativeModel:
    """`Qwen3NextLM.hidden_states` / `logits` on the fused ops (see the module docstring)."""

    def __init__(self, lm: Qwen3NextLM) -> None:
        if not dense_kernel.load():
            raise RuntimeError(f"native dense ops unavailable: {dense_kernel.status()['reason']}")
        self.lm = lm
        self.embed = lm.model.embed_tokens.weight
        first = lm.model.layers[0].input_layernorm
        self.first_norm, self.eps = first.weight, first.eps
        self.layers = [_Layer(lm, i) for i in range(len(lm.model.layers))]
        self.lm_head = lm.lm_head.weight

    def hidden_states(
        self,
        input_ids: Sequence[torch.Tensor],
        layouts: Sequence[StepLayout],
        cache: HybridCache,
        experts: ExpertBackend,
    ) -> list[torch.Tensor]:
        """Same contract as `Qwen3NextLM.hidden_states`."""
        runs = [
            self._run(i, lay, cache, experts) for i, lay in zip(input_ids, layouts, strict=True)
        ]
        return _interleave(runs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] in fp32."""
        return dense_kernel.linear(hidden, self.lm_head, True).float()

    def _run(
        self,
        input_ids: torch.Tensor,
        layout: StepLayout,
        cache: HybridCache,
        experts: ExpertBackend,
    ) -> Generator[None, None, torch.Tensor]:
        ops, linear = dense_kernel.ops(), dense_kernel.linear
        x = F.embedding(input_ids, self.embed)  # [T, H] residual stream
        h = ops.rms_norm(x, self.first_norm, self.eps)  # its norm, the next block's input
        for lay in self.layers:
            x, h = ops.add_rms_norm(x, lay.mixer(h, layout, cache), lay.post, lay.eps)
            moe = lay.moe
            proj = linear(h, moe.w, True)  # [T, E | Is | Is | 1]
            ids, weights = ops.route_topk(proj, moe.e, moe.k, moe.renorm)
            pending = experts.submit(moe.layer, h, ids, weights)  # routed work goes out first
            shared = linear(ops.silu_mul(proj[:, moe.e :], moe.inter), moe.w_down, True)
            yield
            gate = proj[:, moe.e + 2 * moe.inter]  # shared-expert gate logit [T]
            x, h = ops.moe_combine_norm(x, pending.result(), shared, gate, lay.next, lay.eps)
        for span in layout.spans:
            cache.lengths[span.slot] += span.length
        return h
