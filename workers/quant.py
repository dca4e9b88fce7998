"""Expert weight storage formats: fp32, bf16, and weight-only int8 / int4 with fp32 scales.

Shape legend: E experts, O output rows, In inputs of a row, G = In / group (int4 groups).

`ExpertPack` holds one projection of a layer's experts ([E, O, In] logically) in one format:
  float32   data f32 [E, O, In]
  bfloat16  data bf16 [E, O, In]
  int8      data int8 [E, O, In], scales f32 [E, O]: w = q * scale (symmetric, per output row)
  int4      data uint8 [E, O, In / 2], scales f32 [E, O, G]: w = (q - 8) * scale (symmetric,
            per row and group of `group` inputs); in every block of 32 inputs, byte b holds
            input b in its low nibble and input 16 + b in its high nibble (the kernel reads
            16 contiguous inputs from each half)
Activations stay fp32; the fused kernel (workers/expert_kernel.py) dequantises in registers.
Which format a deployment uses is `experts.dtype` (cluster YAML) / `--expert-dtype`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

EXPERT_DTYPES = ("float32", "bfloat16", "int8", "int4")
KIND_CODES = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}  # the kernel's `kind`
INT4_GROUP = 64  # inputs per int4 scale (llama.cpp's Q4 uses 32; 64 halves scale traffic)
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def bytes_per_param(kind: str, group: int = INT4_GROUP) -> float:
    """Stored bytes per weight, scales included (int8: one fp32 per row of In, counted apart)."""
    if kind == "int4":
        return 0.5 + 4.0 / group
    return BYTES_PER_PARAM[kind]


@dataclass(frozen=True)
class ExpertPack:
    kind: str
    data: torch.Tensor
    scales: torch.Tensor | None = None
    group: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        e, o, n = self.data.shape
        return (e, o, 2 * n if self.kind == "int4" else n)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (what the pack computes in)."""
        return torch.float32

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + extra

    def __len__(self) -> int:
        return self.data.shape[0]

    def select(self, rows: Sequence[int] | torch.Tensor) -> ExpertPack:
        """The pack of experts `rows` (in that order)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        scales = None if self.scales is None else self.scales[idx].contiguous()
        return ExpertPack(self.kind, self.data[idx].contiguous(), scales, self.group)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [E', O, In] of experts `rows` (all when None)."""
        data = self.data if rows is None else self.data[rows]
        scales = self.scales if rows is None or self.scales is None else self.scales[rows]
        if self.kind in ("float32", "bfloat16"):
            return data.float()
        if self.kind == "int8":
            return data.float() * scales.unsqueeze(-1)
        lo, hi = (data & 15).float() - 8, (data >> 4).float() - 8  # [E, O, In/2] each
        e, o, half = data.shape
        q = torch.cat([lo.view(e, o, half // 16, 16), hi.view(e, o, half // 16, 16)], -1)
        q = q.view(e, o, 2 * half // self.group, self.group)
        return (q * scales.unsqueeze(-1)).view(e, o, 2 * half)


def pack(w: torch.Tensor, kind: str, group: int = INT4_GROUP) -> ExpertPack:
    """Store w [E, O, In] (any float dtype) as `kind` (round to nearest, symmetric scales)."""
    if kind not in EXPERT_DTYPES:
        raise ValueError(f"expert dtype: expected one of {list(EXPERT_DTYPES)}, got {kind!r}")
    if w.dim() != 3:
        raise ValueError(f"expected expert weights [E, out, in], got shape {tuple(w.shape)}")
    if kind == "float32":
        return ExpertPack(kind, w.float().contiguous())
    if kind == "bfloat16":
        return ExpertPack(kind, w.to(torch.bfloat16).contiguous())
    w = w.float()
    if kind == "int8":
        scale = w.abs().amax(-1).clamp(min=1e-12) / 127.0  # [E, O]
        q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return ExpertPack(kind, q.contiguous(), scale.contiguous())
    e, o, n = w.shape
    if group % 32 or n % group:
        raise ValueError(f"int4: the input size {n} must be a multiple of the group {group} "
                         "(itself a multiple of 32)")  # fmt: skip
    g = w.view(e, o, n // group, group)
    scale = _int4_scales(g)  # [E, O, G]
    q = (torch.round(g / scale.unsqueeze(-1)).clamp(-8, 7) + 8).to(torch.uint8).view(e, o, n)
    blocks = q.view(e, o, n // 32, 2, 16)
    packed = blocks[..., 0, :] | (blocks[..., 1, :] << 4)  # [E, O, In/32, 16]
    return ExpertPack(kind, packed.reshape(e, o, n // 2).contiguous(), scale.contiguous(), group)


def int4_group(hidden: int, inter: int) -> int:
    """The int4 group of a layer: INT4_GROUP, or 32 when a size is not a multiple of it."""
    return INT4_GROUP if hidden % INT4_GROUP == 0 and inter % INT4_GROUP == 0 else 32


def _int4_scales(g: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Per-group scales minimising the squared error over a few candidates: amax / 7 shrunk
    by up to 30% (clipping the largest weight a little often lowers the total error), and
    -min / 8 (uses the -8 level when the largest magnitude is negative)."""
    flat = g.reshape(-1, g.shape[-1])
    out = torch.empty(flat.shape[0])
    for lo in range(0, flat.shape[0], chunk):
        x = flat[lo : lo + chunk]
        amax = x.abs().amax(-1).clamp(min=1e-12)
        cands = [amax * f / 7.0 for f in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)]
        cands.append((-x.amin(-1)).clamp(min=1e-12) / 8.0)
        best, err = cands[0], None
        for s in cands:
            q = torch.round(x / s.unsqueeze(-1)).clamp(-8, 7)
            e = ((q * s.unsqueeze(-1) - x) ** 2).sum(-1)
            if err is None:
                err = e
            else:
                take = e < err
                best, err = torch.where(take, s, best), torch.where(take, e, err)
        out[lo : lo + chunk] = best
    return out.view(g.shape[:-1])


def packable(kind: str, hidden: int, inter: int) -> str | None:
    """Why `kind` cannot store experts of these sizes, or None when it can."""
    if kind not in EXPERT_DTYPES:
        return f"expected one of {list(EXPERT_DTYPES)}, got {kind!r}"
    if kind == "int4" and (hidden % 32 or inter % 32):
        return f"int4 needs hidden ({hidden}) and intermediate ({inter}) sizes divisible by 32"
    return None
