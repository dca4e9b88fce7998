"""Fused C++ ops of the dense decode path (workers/csrc/dense_ops.cpp): build, cache, load.

The ops (`torch.ops.expertmesh_dense.*`): `rms_norm`, `add_rms_norm` (residual + norm),
`route_topk` (router softmax + top-k + renormalise), `silu_mul`, `moe_combine_norm` (routed +
gated shared expert + residual + next norm), `deltanet_decode` (conv step, SiLU, L2 norm,
gated delta rule on the state in place, gated RMSNorm, for B sequences at once), `attn_prep`
(q/k norm, partial RoPE, K/V written into the paged cache) and `paged_decode` (decode
attention reading the KV blocks in place, sigmoid output gate). Each replaces a chain of
small torch ops whose reference stays in the model modules (the eager path, used where the
library cannot be built or `EXPERTMESH_DENSE_KERNEL=torch` is set); tests hold the two to the
same numbers. Built like the expert kernel (workers/native.py), with it at install time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers import native

ENV = "EXPERTMESH_DENSE_KERNEL"  # "torch": never use the fused dense ops
LIBRARY = native.NativeLibrary(
    "expertmesh_dense_ops", native.CSRC / "dense_ops.cpp", "dense_ops", ENV, "expertmesh_dense",
    "paged_decode",
)  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load(verbose: bool = False) -> bool:
    """True when the ops are registered (built or loaded from the cache)."""
    return LIBRARY.load(verbose)


def supports(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether a model computing in `dtype` on `device` can take the fused ops."""
    return torch.device(device).type == "cpu" and dtype in DTYPES and load()


def status() -> dict[str, object]:
    return LIBRARY.status()


def ops():
    """The op namespace (`torch.ops.expertmesh_dense`); call `load()` first."""
    return torch.ops.expertmesh_dense


def linear(x: torch.Tensor, weight: torch.Tensor, native: bool) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T. Native with fp32 activations: the fused kernel (faster than
    torch's GEMM here at every M measured; a token's result independent of the batch)."""
    if native and x.dtype == torch.float32:
        return torch.ops.expertmesh_dense.linear(x, weight)
    return F.linear(x, weight)


if __name__ == "__main__":  # python -m workers.dense_kernel: build (or load) and report
    import json
    import logging

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(status()))
