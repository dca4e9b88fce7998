"""Test helpers: a perturbed transformers Qwen3Next model and our weights taken from it."""

from __future__ import annotations

import re

import torch

from workers.config import ModelConfig
from workers.experts import ExpertWeights

TINY_HF = dict(
    model_type="qwen3_next", vocab_size=300, hidden_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, rms_norm_eps=1e-6,
    max_position_embeddings=2048, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    layer_types=["linear_attention"] * 3 + ["full_attention"],
)  # fmt: skip


def perturbed_hf_model(raw: dict, seed: int = 0):
    """transformers' Qwen3NextForCausalLM with every parameter perturbed (fp32, eval)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    model = Qwen3NextForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_perturbed(name, p, gen))
    return model


def _perturbed(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(p.shape, generator=gen)
    if name.endswith("A_log"):
        return torch.log(torch.rand(p.shape, generator=gen) * 15 + 1)
    if name.endswith("dt_bias"):  # slow decay (median ~0.9), so the state carries far
        return noise * 0.5 - 4.0
    if "linear_attn.norm" in name:
        return 1 + 0.2 * noise
    if p.dim() == 1:  # zero-centred RMSNorm weights
        return 0.2 * noise
    if "embed_tokens" in name:
        return noise
    if "lm_head" in name:
        return noise * (2.5 / p.shape[-1] ** 0.5)
    if "mlp.gate.weight" in name:
        return noise * (4.0 / p.shape[-1] ** 0.5)
    return noise / p.shape[-1] ** 0.5  # fan-in scaled


def split_hf_state(model) -> tuple[dict[str, torch.Tensor], ExpertWeights]:
    """HF state dict -> (our dense weights, ExpertWeights of all experts)."""
    dense, w13, w2 = {}, {}, {}
    for key, value in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
        if m:
            (w13 if m.group(2) == "gate_up_proj" else w2)[int(m.group(1))] = value.clone()
        else:
            dense[key] = value.clone()
    n = next(iter(w13.values())).shape[0]
    return dense, ExpertWeights(tuple(range(n)), w13, w2)


def our_model(raw: dict, hf_model):
    from workers.experts import LocalExpertBackend
    from workers.model import Qwen3NextLM

    config = ModelConfig.from_hf(raw)
    dense, experts = split_hf_state(hf_model)
    return Qwen3NextLM.from_weights(config, dense, torch.float32), LocalExpertBackend(experts)
