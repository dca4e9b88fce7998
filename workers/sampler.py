"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Shape legend: B sequences in the step, V vocab.
Logprobs are of the model's raw distribution (log_softmax of the logits), as vLLM reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """An invalid sampling parameter; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    n: int = 1  # choices sampled from one prefill; choice i draws like seed + i
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens > 0, "max_tokens", "> 0"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                "temperature",
                "a finite number >= 0",
            ),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k", ">= -1 (0/-1 = off)"),
            (isinstance(self.n, int) and not isinstance(self.n, bool) and self.n >= 1, "n",
             ">= 1"),
        ]  # fmt: skip
        for ok, name, rule in checks:
            if not ok:
                raise SamplingError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 -> (tokens [B] int64, logprobs of those tokens [B])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_one(logits[i], p, generators[i])
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    scaled = logits / p.temperature  # [V]
    if p.top_k > 0:
        kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
