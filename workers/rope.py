"""Partial rotary position embedding (the first `rotary_dim` dims of each head rotate).

Shape legend: T tokens, Hh heads, D head dim, R rotary dim (= D * partial_rotary_factor).
"""

from __future__ import annotations

import torch


class PartialRope:
    def __init__(self, head_dim: int, rotary_dim: int, theta: float) -> None:
        self.rotary_dim = rotary_dim
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
        self.inv_freq = 1.0 / (theta**exponents)  # [R/2]

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, R]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, Hh, D] rotated on its first R dims; cos/sin [T, R]."""
        r = self.rotary_dim
        rot, keep = x[..., :r], x[..., r:]
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R] broadcast over heads
        half = r // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, keep), dim=-1)
