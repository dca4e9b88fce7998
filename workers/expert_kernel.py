"""The fused CPU expert kernel (workers/csrc/moe_swiglu.cpp): build once, cache on disk, load.

`load()` JIT-builds the C++ op with torch.utils.cpp_extension (a TORCH_LIBRARY op, no
pybind11) into `$EXPERTMESH_CACHE/kernels/<source+torch+cpu hash>/` the first time (~1 min on
2 cores) and loads the cached library afterwards (milliseconds). Where it cannot be built (no
compiler, no headers) or `EXPERTMESH_EXPERT_KERNEL=torch` is set, `load()` returns False once,
logs why, and callers use the torch path (`workers.experts`), which gives the same results.
`python -m workers.expert_kernel` builds it ahead of time (`python -m workers.native`, which the
Makefile's install runs, builds every op library).
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers import native
from workers.quant import KIND_CODES, ExpertPack

SOURCE = native.CSRC / "moe_swiglu.cpp"
ENV = "EXPERTMESH_EXPERT_KERNEL"  # "torch": never use the fused kernel
LIBRARY = native.NativeLibrary(
    "expertmesh_moe_swiglu", SOURCE, "moe_swiglu", ENV, "expertmesh", "moe_swiglu"
)


def build_dir() -> Path:
    """Cache directory of this source, torch version and CPU (the build is -march=native)."""
    return native.build_dir(LIBRARY.stem, LIBRARY.source)


def load(verbose: bool = False) -> bool:
    """True when the fused op is registered (built or loaded from the cache)."""
    return LIBRARY.load(verbose)


def status() -> dict[str, object]:
    s = LIBRARY.status()
    return {"fused_kernel": s["ok"], "reason": s["reason"], "dir": s["dir"]}


def supports(hidden: torch.Tensor, w13: ExpertPack | torch.Tensor) -> bool:
    """The fused op takes fp32 activations on the CPU with rows a multiple of 16 inputs."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return False
    if isinstance(w13, torch.Tensor) and w13.dtype not in (torch.float32, torch.bfloat16):
        return False
    _, two_i, h = w13.shape
    return h % 16 == 0 and (two_i // 2) % 16 == 0 and load()


def moe_swiglu(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: ExpertPack | torch.Tensor,
    w2: ExpertPack | torch.Tensor,
) -> torch.Tensor:
    """The fused op (callers check `supports` first); same contract as grouped_swiglu."""
    if not load():
        raise RuntimeError(f"the fused expert kernel is unavailable: {LIBRARY.state.get('why')}")
    p13, p2 = _as_pack(w13), _as_pack(w2)
    if p13.kind != p2.kind:
        raise ValueError(f"w13 is {p13.kind} but w2 is {p2.kind}")
    group = p13.group or p2.group
    if p13.group != p2.group and p13.group and p2.group:
        raise ValueError(f"int4 groups differ: {p13.group} vs {p2.group}")
    return torch.ops.expertmesh.moe_swiglu(
        hidden.contiguous(), ids.long().contiguous(), weights.float().contiguous(),
        p13.data, _scales(p13), p2.data, _scales(p2), KIND_CODES[p13.kind], group,
    )  # fmt: skip


_EMPTY = torch.empty(0)


def _scales(p: ExpertPack) -> torch.Tensor:
    return _EMPTY if p.scales is None else p.scales


def _as_pack(w: ExpertPack | torch.Tensor) -> ExpertPack:
    if isinstance(w, ExpertPack):
        return w
    kind = "bfloat16" if w.dtype == torch.bfloat16 else "float32"
    return ExpertPack(kind, w.contiguous())


if __name__ == "__main__":  # python -m workers.expert_kernel: build (or load) and report
    import json
    import logging

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(status()))
