"""Projection weights stored narrower than the activations, without changing a number.

A bf16 checkpoint's projection weights hold bf16 values; fp32 compute needs nothing wider to
store them exactly. Kept in bf16 (`Qwen3NextLM.from_weights(..., lossless=True)`), a decode
step reads half the bytes: the native `linear` widens them in registers with the same fp32
arithmetic as for fp32 weights (bit-identical results), and the eager `Linear` below widens
the weight to the input's dtype at each call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype than its input (widened)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def storage_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """Where a matmul weight stored as `stored` lives for `compute`: bf16 when that holds every
    value exactly (bf16 storage, fp32 compute), else the compute dtype."""
    if stored == torch.bfloat16 and compute == torch.float32:
        return torch.bfloat16
    return compute
